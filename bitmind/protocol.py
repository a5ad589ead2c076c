"""Wire protocol of subnet 34: `ImageSynapse`, compatible with the reference, and `VideoSynapse`."""

import functools
import typing

import bittensor as bt
import pydantic

from bitmind import __version__, spec_version

__all__ = [
    "DECISION_THRESHOLD",
    "ImageSynapse",
    "NO_ANSWER",
    "VideoSynapse",
    "__version__",
    "is_generated",
    "spec_version",
]

# A miner that cannot answer leaves the prediction at this value.
NO_ANSWER = -1.0
# The subnet's decision rule, used by the validator's reward, the arena, training and the export score alike.
DECISION_THRESHOLD = 0.5


def is_generated(probability: typing.Any) -> typing.Any:
    """Strictly above 0.5 means "AI-generated"; 0.5 itself is "real". Works on a float or a numpy array."""
    return probability > DECISION_THRESHOLD


class _Challenge(bt.Synapse):
    """What every challenge synapse shares: the miner's answer and the cached request schema.

    Like the subnet's own classes, no field is listed in `required_hash_fields`: a miner's axon recomputes the body
    hash with its own class, so a miner that hashed `image` would answer every request of the subnet's validators
    (which hash no field) with a hash mismatch (500). The signature covers the caller (hotkey, nonce, uuid) only.
    """

    prediction: float = pydantic.Field(
        default=NO_ANSWER,
        title="prediction",
        description="Probability in [0, 1] that the challenge is AI-generated; -1 means no answer.",
    )

    @pydantic.field_validator("prediction", mode="before")
    @classmethod
    def _generated_share(cls, value: typing.Any) -> typing.Any:
        """The subnet's 2.x classes carry [real, synthetic, semi-synthetic] (default [-1, -1, -1]): read as the
        probability that the image is generated (synthetic + semi-synthetic), so those validators' requests parse
        and those miners' answers score. Any other list is left for pydantic to refuse."""
        if isinstance(value, (list, tuple)) and len(value) == 3:
            try:
                real, synthetic, semi_synthetic = (float(part) for part in value)
            except (TypeError, ValueError):
                return value
            return NO_ANSWER if real == synthetic == semi_synthetic == NO_ANSWER else synthetic + semi_synthetic
        return value

    def deserialize(self) -> float:
        return self.prediction

    def get_required_fields(self) -> list[str]:
        # bittensor rebuilds the pydantic JSON schema for every request header (5-10 ms, both ends); the schema
        # of a class never changes, so compute it once.
        return list(_required_fields(type(self)))


class ImageSynapse(_Challenge):
    """A validator's challenge: one base64-encoded image; the miner fills in `prediction`.

    `prediction` is the probability that the image is AI-generated (> 0.5 means generated);
    it stays at -1 when the miner gives no answer.
    `mask` is optional: a miner that segments may return which pixels it finds generated
    (`bitmind.mask_codec.encode_mask`). It is scored apart from the binary reward and never changes it; a miner
    that knows nothing of masks leaves it empty, and its exchange parses and scores as before the field existed.
    """

    image: str = pydantic.Field(
        default="",
        title="image",
        description="Base64-encoded JPEG or PNG image.",
    )
    mask: str = pydantic.Field(
        default="",
        title="mask",
        description="Optional answer: base64 8-bit grayscale PNG, the size of the image, of per-pixel probabilities "
        "that the pixel is AI-generated; empty means no mask.",
    )

    @pydantic.field_validator("mask", mode="before")
    @classmethod
    def _mask_or_nothing(cls, value: typing.Any) -> str:
        """A mask that is not a string (null, a number, a list) counts as no mask instead of failing the whole
        answer: a broken optional field must not cost the miner its prediction."""
        return value if isinstance(value, str) else ""


class VideoSynapse(_Challenge):
    """A validator's video challenge: one clip (`bitmind.video_codec.encode_clip`); the miner fills in `prediction`.

    Same answer semantics as `ImageSynapse`: the probability that the clip is AI-generated (> 0.5 means
    generated), -1 when the miner gives no answer. The clip's format is versioned by the payload's own prefix
    (`bmv1:`), not by the reference's JPEG + zlib + base85 frames, which this is not compatible with.
    """

    video: str = pydantic.Field(
        default="",
        title="video",
        description="A clip: 'bmv1:' + base64 of an AV1 IVF stream (bitmind.video_codec).",
    )


@functools.cache
def _required_fields(cls: type[bt.Synapse]) -> tuple[str, ...]:
    return tuple(cls.model_json_schema().get("required", []))
