"""Inference copies of frozen convolutional networks with their batch norms folded into the convolutions.

Why: on CPU an EfficientNet-Lite spends a good part of its time on separate batch-norm passes over every feature map
and on channels-first depthwise convolutions. A frozen network in eval mode computes the same features (within float
rounding) with the norms folded into the preceding convolutions and channels-last tensors, at about two thirds of
the eager cost (measured on the retrieval descriptor's trunk). Used wherever a frozen ImageNet trunk serves: the
probe experts (TorchDetector folds any `FoldedInference` model once it is loaded), the segmenter's encoder and the
retrieval descriptor.

A model whose frozen part maps a batch to one tensor (`serves_onnx`) can also serve that part through ONNX Runtime on
the CPU (`onnx_serving.py`), faster still; `run_frozen` picks the fastest copy that exists.
"""

import copy

import torch
from torch import nn

from base_miner.detectors.onnx_serving import OnnxTrunk

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

    serves_onnx: bool = False  # the frozen part maps a batch to one tensor, so ONNX Runtime can serve it

    def frozen_part(self) -> nn.Module:
        """The frozen layers to fold (never trained, eval mode)."""
        raise NotImplementedError

    def fold_for_inference(self, onnx: bool = False) -> None:
        """Build the folded copy and, with `onnx` (models with `serves_onnx` only), an ONNX Runtime server of it
        that exports on first use."""
        if onnx and not self.serves_onnx:
            raise ValueError(f"{type(self).__name__}'s frozen part cannot be served through ONNX Runtime")
        folded = folded_copy(self.frozen_part())
        self.__dict__["_folded"] = folded
        self.__dict__["_onnx"] = OnnxTrunk(folded) if onnx else None

    def folded(self) -> nn.Module | None:
        return self.__dict__.get("_folded")

    def onnx_trunk(self) -> OnnxTrunk | None:
        return self.__dict__.get("_onnx")

    def run_frozen(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen part's output from the fastest copy there is: ONNX Runtime (inference only), the folded copy,
        or the frozen part itself."""
        onnx = self.onnx_trunk()
        if onnx is not None and not torch.is_grad_enabled():
            served = onnx(x)
            if served is not None:
                return served
        folded = self.folded()
        if folded is not None:
            return folded(x.contiguous(memory_format=torch.channels_last))
        return self.frozen_part()(x)

    def _drop_copies(self) -> None:
        self.__dict__.pop("_folded", None)
        self.__dict__.pop("_onnx", None)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        self._drop_copies()  # moved or cast: the copies are stale
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: ANN001, ANN201
        self._drop_copies()  # new weights: the copies are stale
        return super().load_state_dict(state_dict, strict, assign)
