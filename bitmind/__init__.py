"""Shared core of the subnet-34 node: protocol, image codec, chain layer, transport, config.

Kept free of torch/diffusers imports so that `import bitmind` stays fast.
"""

__version__ = "2.2.0"


def _spec_version(version: str) -> int:
    major, minor, patch = (int(part) for part in version.split("."))
    return 1000 * major + 10 * minor + patch


# Used as the weights `version_key`; the chain rejects keys below the subnet's required version.
spec_version = _spec_version(__version__)
