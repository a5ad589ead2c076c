"""Export for subnet 34's model-submission benchmark (gasbench): the package writer (`writer`), its fixed model code
(`gas_model`), the static and sandboxed checker (`check`, `sandbox`), the benchmark's input pipeline and degradation
chain (`bench`), its score (`score`), and exported packages as detectors (`package_detector`).
"""
