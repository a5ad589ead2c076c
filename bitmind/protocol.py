"""Wire protocol of subnet 34, compatible with the reference `ImageSynapse`."""

import functools
import typing

import bittensor as bt
import pydantic

from bitmind import __version__, spec_version

__all__ = ["DECISION_THRESHOLD", "ImageSynapse", "NO_ANSWER", "__version__", "is_generated", "spec_version"]

# A miner that cannot answer leaves the prediction at this value.
NO_ANSWER = -1.0
# The subnet's decision rule, used by the validator's reward, the arena, training and the export score alike.
DECISION_THRESHOLD = 0.5


def is_generated(probability: typing.Any) -> typing.Any:
    """Strictly above 0.5 means "AI-generated"; 0.5 itself is "real". Works on a float or a numpy array."""
    return probability > DECISION_THRESHOLD


class ImageSynapse(bt.Synapse):
    """A validator's challenge: one base64-encoded image; the miner fills in `prediction`.

    `prediction` is the probability that the image is AI-generated (> 0.5 means generated);
    it stays at -1 when the miner gives no answer.
    """

    image: str = pydantic.Field(
        default="",
        title="image",
        description="Base64-encoded JPEG or PNG image.",
    )
    prediction: float = pydantic.Field(
        default=NO_ANSWER,
        title="prediction",
        description="Probability in [0, 1] that the image is AI-generated; -1 means no answer.",
    )

    # Every request field is covered by the body hash the signature protects.
    required_hash_fields: typing.ClassVar[tuple[str, ...]] = ("image",)

    def deserialize(self) -> float:
        return self.prediction

    def get_required_fields(self) -> list[str]:
        # bittensor rebuilds the pydantic JSON schema for every request header (5-10 ms, both ends); the schema
        # of a class never changes, so compute it once.
        return list(_required_fields(type(self)))


@functools.cache
def _required_fields(cls: type[bt.Synapse]) -> tuple[str, ...]:
    return tuple(cls.model_json_schema().get("required", []))
