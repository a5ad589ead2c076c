"""The held-out protocol every model choice is judged by: whole generator families and whole real collections that
training never sees, reported per group.

Why whole groups: a random row split puts images of the same generator and the same photo collection on both
sides, and a detector that learnt "this generator" or "this topic" looks excellent (the project once reported MCC
0.49 this way and scored 0.14 on generators it had never seen). Holding out entire families and collections is
the closest offline stand-in for the generators and photos validators will send tomorrow.

The groups are fixed (version `PROTOCOL`) so numbers stay comparable across runs; change them only with a new
version. Per generator family, MCC is computed on that family's images plus every held-out real image, so each
family is judged against the same real photos. Calibration (Brier, ECE) is reported because the subnet scores it.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from base_miner.arena.metrics import binary_metrics
from bitmind.protocol import is_generated

__all__ = [
    "HELDOUT_FAMILIES",
    "HELDOUT_REAL",
    "PROTOCOL",
    "heldout_sources",
    "holdout_selectors",
    "markdown_table",
    "protocol_report",
    "protocol_spec",
]

PROTOCOL = "diverse-v1"

# Generator families (by `source` column of ../shared/data/diverse/*.parquet) never trained on.
HELDOUT_FAMILIES: dict[str, tuple[str, ...]] = {
    "sdxl/sd1.5 community checkpoints (AI-Horde)": ("ai-horde-styles",),
    "2024-25 DiT/flow models (SD3.5, HiDream, Qwen-Image, Chroma, ComfyUI examples)": (
        "artists-sd35l",
        "comfyui-examples",
    ),
    "Hunyuan / Kolors / CogView": ("hunyuandit", "hunyuanimage-3", "kolors", "cogview4"),
    "class-conditional and GAN (DiT, SiT, LightningDiT, StyleGAN2, taming)": (
        "dit-samples",
        "sit-samples",
        "lightningdit",
        "stylegan2-church",
        "taming-samples",
    ),
}
# Real collections never trained on: two of faces, three of other photos.
HELDOUT_REAL: dict[str, tuple[str, ...]] = {
    "faces: LFW": ("lfw-deepfunneled-150", "lfw"),
    "faces: selfies": ("selfie-dataset",),
    "photos: Urban100 + Sun-Hays80": ("urban100-sun80",),
    "photos: PolyU real noisy camera": ("polyu-real-noisy",),
    "photos: CamVid street": ("camvid",),
}


def heldout_sources() -> set[str]:
    """Every `source` value the protocol keeps out of training."""
    return {s for group in (*HELDOUT_FAMILIES.values(), *HELDOUT_REAL.values()) for s in group}


def holdout_selectors() -> list[str]:
    """The protocol as `--holdout source=X` selectors for bitmind-train and the probe fitter."""
    return [f"source={source}" for source in sorted(heldout_sources())]


def protocol_spec(folder: str) -> str:
    """The dataset spec (bitmind-train / arena syntax) selecting the protocol's held-out rows of a `diverse` folder."""
    return folder + "?" + "&".join(f"source={source}" for source in sorted(heldout_sources()))


def _rate(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def protocol_report(
    labels: Sequence[int], probabilities: Sequence[float], sources: Sequence[str]
) -> dict[str, Any]:
    """Per-group and summary figures for predictions on held-out rows (rows of other sources are ignored)."""
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    src = np.asarray(sources, dtype=object)
    if not (len(y) == len(p) == len(src)):
        raise ValueError(f"{len(y)} labels, {len(p)} probabilities and {len(src)} sources differ in length")
    real_mask = np.isin(src, [s for group in HELDOUT_REAL.values() for s in group]) & (y == 0)
    families: dict[str, Any] = {}
    for name, group in HELDOUT_FAMILIES.items():
        fakes = np.isin(src, group) & (y == 1)
        both = fakes | real_mask
        metrics = binary_metrics(y[both], p[both]) if fakes.any() and real_mask.any() else None
        families[name] = {
            "n": int(fakes.sum()),
            "caught": _rate(is_generated(p[fakes])),
            "mcc": metrics["mcc"] if metrics else None,
            "auc": metrics["auc"] if metrics else None,
            "brier": float(np.mean((p[fakes] - 1.0) ** 2)) if fakes.any() else None,
        }
    reals = {
        name: {"n": int(mask.sum()), "answered_real": _rate(~is_generated(p[mask]))}
        for name, group in HELDOUT_REAL.items()
        for mask in [np.isin(src, group) & (y == 0)]
    }
    family_mcc = [f["mcc"] for f in families.values() if f["mcc"] is not None]
    held = real_mask | np.isin(src, [s for group in HELDOUT_FAMILIES.values() for s in group]) & (y == 1)
    overall = binary_metrics(y[held], p[held])
    return {
        "protocol": PROTOCOL,
        "families": families,
        "reals": reals,
        "summary": {
            "mean_family_mcc": float(np.mean(family_mcc)) if family_mcc else None,
            "min_family_mcc": float(np.min(family_mcc)) if family_mcc else None,
            **{key: overall[key] for key in ("n", "mcc", "auc", "brier", "ece", "accuracy")},
        },
    }


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """One column per detector: every held-out group, then the summary (what README and TRAINING.md show)."""
    names = list(reports)
    first = next(iter(reports.values()))
    lines = [f"| group ({PROTOCOL}) | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    summary_keys = ("mean_family_mcc", "min_family_mcc", "mcc", "auc", "brier", "ece")
    for key in summary_keys:
        cells = [_fmt(reports[name]["summary"][key]) for name in names]
        lines.append(f"| all held-out: {key.replace('_', ' ')} | {first['summary']['n']} | " + " | ".join(cells) + " |")
    for family, stats in first["families"].items():
        cells = [f"{_fmt(reports[n]['families'][family]['caught'])} / {_fmt(reports[n]['families'][family]['mcc'])}"
                 for n in names]  # fmt: skip
        lines.append(f"| {family} — caught / MCC | {stats['n']} | " + " | ".join(cells) + " |")
    for real, stats in first["reals"].items():
        cells = [_fmt(reports[n]["reals"][real]["answered_real"]) for n in names]
        lines.append(f"| {real} — answered real | {stats['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
