"""Inference copies of frozen convolutional networks with their batch norms folded into the convolutions.

Why: on CPU an EfficientNet-Lite spends a good part of its time on separate batch-norm passes over every feature map
and on channels-first depthwise convolutions. A frozen network in eval mode computes the same features (within float
rounding) with the norms folded into the preceding convolutions and channels-last tensors, at about two thirds of
the eager cost (measured on the retrieval descriptor's trunk). Used wherever a frozen ImageNet trunk serves: the
probe experts (TorchDetector folds any `FoldedInference` model once it is loaded), the segmenter's encoder and the
retrieval descriptor.
"""

import copy

import torch
from torch import nn

__all__ = ["FoldedInference", "fold_batch_norms", "folded_copy"]


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """Fold every batch norm that directly follows a convolution (in registration order, as timm's EfficientNet
    blocks run them) into that convolution, in place, keeping the norm's activation; returns `module`."""
    from timm.layers import BatchNormAct2d
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    children = list(module.named_children())
    for (conv_name, conv), (name, norm) in zip(children, children[1:]):
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
            setattr(module, conv_name, fuse_conv_bn_eval(conv, norm))
            after = nn.Sequential(norm.drop, norm.act) if isinstance(norm, BatchNormAct2d) else nn.Identity()
            setattr(module, name, after)
    for _, child in children:
        fold_batch_norms(child)
    return module


def folded_copy(module: nn.Module) -> nn.Module:
    """A folded, channels-last, eval-mode copy of a frozen `module` (which is left as it is), on its device.
    Callers feed it channels-last batches (`x.contiguous(memory_format=torch.channels_last)`)."""
    folded = fold_batch_norms(copy.deepcopy(module).eval()).requires_grad_(False)
    return folded.to(memory_format=torch.channels_last)


class FoldedInference(nn.Module):
    """A network whose frozen part can serve from a folded copy (`fold_for_inference`). The copy is not a submodule
    (kept out of `state_dict` and `.to()`) and is dropped whenever the weights or the device change, after which the
    plain frozen part serves until `fold_for_inference` is called again."""

    def frozen_part(self) -> nn.Module:
        """The frozen layers to fold (never trained, eval mode)."""
        raise NotImplementedError

    def fold_for_inference(self) -> None:
        self.__dict__["_folded"] = folded_copy(self.frozen_part())

    def folded(self) -> nn.Module | None:
        return self.__dict__.get("_folded")

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        self.__dict__.pop("_folded", None)  # moved or cast: the copy is stale
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: ANN001, ANN201
        self.__dict__.pop("_folded", None)  # new weights: the copy is stale
        return super().load_state_dict(state_dict, strict, assign)
