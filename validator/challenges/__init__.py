"""Challenge sources: real images (datasets + local cache) and synthetic ones (the generator's cache).

Each source's `sample(rng)` yields `(RGB image, label, metadata)` or None when it has nothing cached;
`ChallengeSampler` picks a source, samples and augments.
"""

from validator.challenges.cache import ImageCache
from validator.challenges.dataset_spec import (
    DEFAULT_REAL_DATASETS,
    PACKAGED,
    DatasetSpec,
    packaged_real_sample,
    parse_dataset_list,
)
from validator.challenges.real import RealImageSource
from validator.challenges.sampler import Challenge, ChallengeSampler
from validator.challenges.synthetic import SyntheticImageSource

__all__ = [
    "DEFAULT_REAL_DATASETS",
    "Challenge",
    "ChallengeSampler",
    "DatasetSpec",
    "PACKAGED",
    "ImageCache",
    "RealImageSource",
    "SyntheticImageSource",
    "packaged_real_sample",
    "parse_dataset_list",
]
