"""The subnet's own wire classes as its validators and miners define them (BitMind's subnet 34, releases 1.x and 2.x:
field names, types and defaults as published, no `required_hash_fields`), to test that ours interoperate."""

import typing

import bittensor as bt
import pydantic


class ImageSynapse(bt.Synapse):  # noqa: D101 - 2.x: a three-class answer, [-1, -1, -1] when none
    testnet_label: int = -1
    image: str = pydantic.Field(default="")
    prediction: typing.Union[float, typing.List[float]] = pydantic.Field(default=[-1.0, -1.0, -1.0])


class ImageSynapseV1(bt.Synapse):  # noqa: D101 - 1.x: a float answer, -1 when none
    image: str = pydantic.Field(default="")
    prediction: float = pydantic.Field(default=-1.0)


ImageSynapseV1.__name__ = ImageSynapseV1.__qualname__ = "ImageSynapse"  # the route a Dendrite calls is the class name
