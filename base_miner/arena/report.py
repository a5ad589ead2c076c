"""Arena outputs: `results.json`, a markdown leaderboard, and PNG plots (ROC curves, robustness curves).

results.json:
    {"detectors": {name: {"config": str,
                          "datasets": {dataset: {"n", "accuracy", "precision", "recall", "f1", "mcc", "auc", "ap",
                                                 "brier", "ece", "sn34", "sn34_degraded", "sn34_blended",
                                                 "ms_per_image", "unreadable"}},
                          "robustness": {dataset: {sweep: [{"level", "n", "accuracy", "mcc", "auc", "brier", "sn34"},
                                                            ...]}}}},
     "datasets": {dataset: {"spec", "rows", "unreadable"}}}
"""

import json
import re
from pathlib import Path
from typing import Any

from base_miner.arena.metrics import METRIC_KEYS
from bitmind.atomic import atomic_write_bytes
from bitmind.json_safe import json_safe

__all__ = ["RESULT_KEYS", "SN34_KEYS", "write_json", "write_markdown", "write_plots"]

RESULT_KEYS = (*METRIC_KEYS, "ms_per_image")
# Subnet 34's benchmark score: clean pass, degraded pass (sn34_chain sweep, None when it did not run), blend.
SN34_KEYS = ("sn34", "sn34_degraded", "sn34_blended")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "dataset"


def write_json(results: dict[str, Any], out: Path) -> Path:
    """Write results.json atomically (floats that are not finite become null, as JSON has no NaN)."""
    return atomic_write_bytes(out / "results.json", json.dumps(json_safe(results), indent=2, allow_nan=False).encode())


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_markdown(results: dict[str, Any], out: Path) -> Path:
    """One leaderboard table per dataset (best MCC first), then the robustness curves as tables."""
    lines = ["# Arena leaderboard", ""]
    datasets = results.get("datasets", {})
    for dataset, info in datasets.items():
        lines += [f"## {dataset}", "", f"{info['rows']} rows, {info['unreadable']} unreadable (skipped).", ""]
        lines += [
            "| detector | n | accuracy | precision | recall | F1 | MCC | ROC-AUC | AP | Brier | ECE "
            "| sn34 | sn34 degraded | sn34 blended | ms/image |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        entries = [
            (name, detector["datasets"][dataset])
            for name, detector in results["detectors"].items()
            if dataset in detector["datasets"]
        ]
        entries.sort(key=lambda item: -(item[1]["mcc"] if item[1]["mcc"] is not None else -2.0))
        for name, m in entries:
            cells = [name, str(m["n"])] + [_fmt(m[k]) for k in RESULT_KEYS[1:-1]] + [_fmt(m.get(k)) for k in SN34_KEYS]
            cells.append(_fmt(m["ms_per_image"], 1))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for name, detector in results["detectors"].items():
            sweeps = detector.get("robustness", {}).get(dataset)
            if not sweeps:
                continue
            lines += [f"Robustness of {name} on {dataset} (accuracy / MCC / ROC-AUC per level):", ""]
            for sweep, points in sweeps.items():
                cells = [f"{_fmt(p['level'], 2)}: {_fmt(p['accuracy'])} / {_fmt(p['mcc'])} / {_fmt(p['auc'])}" for p in points]
                lines.append(f"- {sweep}: " + "; ".join(cells))
            lines.append("")
    path = out / "leaderboard.md"
    path.write_text("\n".join(lines))
    return path


def write_plots(results: dict[str, Any], roc: dict[str, dict[str, tuple[list, list] | None]], out: Path) -> list[Path]:
    """roc_<dataset>.png (one curve per detector) and robustness_<dataset>.png (MCC and AUC against each sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from base_miner.arena.robustness import SWEEPS

    written = []
    for dataset in results.get("datasets", {}):
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        plotted = 0
        for name, curves in roc.items():
            points = curves.get(dataset)
            if points is not None:
                auc = results["detectors"][name]["datasets"][dataset]["auc"]
                ax.plot(points[0], points[1], label=f"{name} (AUC {_fmt(auc)})")
                plotted += 1
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC — {dataset}", xlim=(0, 1), ylim=(0, 1))
        if plotted:
            ax.legend(loc="lower right", fontsize="small")
        else:
            ax.text(0.5, 0.5, "one class only: no ROC curve", ha="center", va="center")
        path = out / f"roc_{_slug(dataset)}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

        curves = {name: d.get("robustness", {}).get(dataset) for name, d in results["detectors"].items()}
        sweeps = [s for s in SWEEPS if any(c and s in c for c in curves.values())]
        if not sweeps:
            continue
        fig, axes = plt.subplots(2, len(sweeps), figsize=(4 * len(sweeps), 6.5), squeeze=False)
        for column, sweep in enumerate(sweeps):
            for row, metric in enumerate(("mcc", "auc")):
                ax = axes[row][column]
                for name, curve in curves.items():
                    if curve and sweep in curve:
                        levels = [p["level"] for p in curve[sweep]]
                        values = [p[metric] if p[metric] is not None else float("nan") for p in curve[sweep]]
                        ax.plot(levels, values, marker="o", label=name)
                ax.set(xlabel=SWEEPS[sweep].label, ylabel=metric.upper())
                if SWEEPS[sweep].levels[0] > SWEEPS[sweep].levels[-1]:
                    ax.invert_xaxis()  # left = clean, right = most degraded
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize="small")
        fig.suptitle(f"Robustness — {dataset}")
        path = out / f"robustness_{_slug(dataset)}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
