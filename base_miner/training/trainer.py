"""The training loop: class-balanced sampling, augmentation, AdamW with warm-up + cosine, mixed precision on GPU,
per-epoch validation with the arena's metrics, best/last checkpoints and exact resume.

Determinism: the model is initialised from `seed`; epoch `e` draws its sample plan from `(seed, e)` and sample
`k` of it is augmented from `(seed, e, k)`, so a run is reproduced by its seed, and a resumed run (which restores
weights, optimizer, scheduler, scaler and torch's RNG) continues exactly where the interrupted one stopped.
"""

import inspect
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm.auto import tqdm

from base_miner.arena.metrics import binary_metrics
from base_miner.checkpoint import save_checkpoint
from base_miner.detectors.torch_detector import TorchDetector, fit_image
from base_miner.registry import ConfigError, build_detector, build_gate, load_config
from base_miner.training.augment import TrainAugment
from base_miner.training.data import (
    DataError,
    DatasetSpec,
    balanced_weights,
    decode_row_image,
    face_crops,
    load_spec,
    parse_selector,
    select,
    stratified_subset,
)
from bitmind.atomic import atomic_writer
from bitmind.image_codec import ImageDecodeError

__all__ = ["STATE_FILE", "TrainConfig", "Trainer", "random_crop"]

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Everything a run needs; `bitmind-train` fills it from its flags (see `cli.py` for each one's meaning)."""

    detector: str
    train: list[str]
    out: str
    val: list[str] = field(default_factory=list)
    holdout: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    epochs: int = 5
    samples_per_epoch: int | None = None
    batch_size: int = 32
    crop_size: int | None = None
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup: float = 0.1
    augment: float = 0.5
    augment_ops: list[str] | None = None
    face_crops: bool = False
    gate_config: str = "camo"
    val_max: int | None = 1000
    seed: int = 0
    device: str | None = None
    amp: bool = True
    save_every: int = 200
    save_dtype: str = "float32"
    resume: bool = False
    max_steps: int | None = None
    threads: int | None = None
    workers: int = 0


def random_crop(image: Image.Image, size: int, rng: np.random.Generator, mode: str) -> Image.Image:
    """A random `size`² crop; images smaller than `size` are first brought up to it exactly as inference does."""
    if min(image.size) < size:
        return fit_image(image, size, mode)
    width, height = image.size
    left, top = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
    return image.crop((left, top, left + size, top + size))


class _PlannedSamples(torch.utils.data.Dataset):
    """Sample `k` of an epoch plan: decoded, augmented from `(seed, epoch, k)`, cropped and normalised."""

    def __init__(self, trainer: "Trainer", plan: np.ndarray, epoch: int, offset: int) -> None:
        self.trainer, self.plan, self.epoch, self.offset = trainer, plan, epoch, offset

    def __len__(self) -> int:
        return len(self.plan) - self.offset

    def __getitem__(self, k: int):
        position = self.offset + k
        row = int(self.plan[position])
        return self.trainer.training_sample(row, np.random.default_rng([self.trainer.config.seed, self.epoch, position]))


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """Stack the readable samples; unreadable ones (None) are dropped and counted."""
    good = [item for item in items if item is not None]
    if not good:
        return None
    tensors, labels, methods = zip(*good)
    return torch.stack(tensors), torch.tensor(labels), torch.tensor(methods), len(items) - len(good)


class Trainer:
    """Train one `TorchDetector` from its config on the datasets of a `TrainConfig`."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.out = Path(config.out)
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.detector = self._build_detector()
        self.device = self.detector.torch_device
        self.crop_size = config.crop_size or self.detector.settings.image_size
        self.augment = TrainAugment(config.augment, config.augment_ops)
        self._mean = torch.tensor(self.detector.settings.mean).view(3, 1, 1)
        self._std = torch.tensor(self.detector.settings.std).view(3, 1, 1)
        self.gate = build_gate(load_config(config.gate_config).get("gate") or "face") if config.face_crops else None
        self.train_rows, self.val_sets = self._load_data()
        self._index = self._row_index(self.train_rows)
        self.weights = balanced_weights(zip(self._index["dataset"], self._index["label"]))
        self.methods = self._method_indices()
        samples = config.samples_per_epoch or len(self.weights)
        self.steps_per_epoch = max(1, math.ceil(samples / config.batch_size))
        self.total_steps = self.steps_per_epoch * config.epochs
        self.optimizer = torch.optim.AdamW(
            self.detector.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.warmup_steps = round(config.warmup * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.amp = config.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.step = 0
        self.best_score = -math.inf
        self.losses: list[float] = []
        self.unreadable = 0
        self._val_cache: dict[str, tuple[list[Image.Image], list[int], int]] = {}
        if config.resume:
            self._load_state()

    # --- setup -------------------------------------------------------------------------------------------------
    def _build_detector(self) -> TorchDetector:
        detector = build_detector(self.config.detector, device=self.config.device, **self.config.overrides)
        if not isinstance(detector, TorchDetector):
            raise ConfigError(
                f"{detector.name} is not a trainable (torch) detector; train its experts' configs instead"
            )
        return detector

    def _prepare(self, ds, name: str):
        if self.gate is None:
            return ds
        crops, _ = face_crops(ds, self.gate, desc=f"face crops {name}")
        if not len(crops):
            raise DataError(f"the face gate found no face in {name!r}; the face expert has nothing to train on")
        return crops

    def _load_data(self):
        from datasets import concatenate_datasets

        selectors = [parse_selector(text) for text in self.config.holdout]
        train_parts, val_sets, held = [], [], []
        for index, text in enumerate(self.config.train):
            spec = DatasetSpec.parse(text)
            ds = load_spec(spec)
            kept = select(ds, selectors, keep_matching=False)
            if selectors:
                held.append(select(ds, selectors, keep_matching=True))
            if not len(kept):
                raise DataError(f"training dataset {spec.name!r} has no rows left after the hold-out")
            kept = self._prepare(kept, spec.name)
            train_parts.append(kept.add_column("dataset", [index] * len(kept)))
            log.info("train %s: %d rows (%d real, %d fake)", spec.name, len(kept), *self._counts(kept))
        for text in self.config.val:
            spec = DatasetSpec.parse(text)
            val_sets.append((spec.name, load_spec(spec)))
        held = [ds for ds in held if len(ds)]
        if held:
            val_sets.append(("holdout", concatenate_datasets(held)))
        prepared = []
        for name, ds in val_sets:
            ds = self._prepare(stratified_subset(ds, self.config.val_max, self.config.seed), name)
            log.info("val %s: %d rows (%d real, %d fake)", name, len(ds), *self._counts(ds))
            prepared.append((name, ds))
        return concatenate_datasets(train_parts), prepared

    @staticmethod
    def _counts(ds) -> tuple[int, int]:
        labels = np.asarray(ds["label"])
        return int((labels == 0).sum()), int((labels == 1).sum())

    @staticmethod
    def _row_index(ds) -> dict[str, np.ndarray]:
        return {
            "dataset": np.asarray(ds["dataset"]),
            "label": np.asarray(ds["label"]),
            "generator": np.asarray([g or "" for g in ds["generator"]]),
        }

    def _method_indices(self) -> np.ndarray:
        """UCF's method labels: 0 for real, then one per training generator (folded when there are more)."""
        classes = getattr(self.detector.settings, "num_methods", 2)
        fakes = sorted(set(self._index["generator"][self._index["label"] == 1]))
        ids = {generator: 1 + i % (classes - 1) for i, generator in enumerate(fakes)}
        return np.array(
            [ids[g] if label == 1 else 0 for g, label in zip(self._index["generator"], self._index["label"])]
        )

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up to the base rate, then cosine decay towards zero over the remaining steps."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    # --- samples -----------------------------------------------------------------------------------------------
    def _to_tensor(self, image: Image.Image) -> torch.Tensor:
        return (pil_to_tensor(image).float().div_(255.0) - self._mean) / self._std

    def training_sample(self, row: int, rng: np.random.Generator):
        """(tensor, label, method) for one training row, or None when its image is unreadable."""
        try:
            image = decode_row_image(self.train_rows[row]["image"])
        except ImageDecodeError as exc:
            log.warning("skipping unreadable training row %d: %s", row, exc)
            return None
        image = random_crop(self.augment(image, rng), self.crop_size, rng, self.detector.settings.resize_mode)
        return self._to_tensor(image), int(self._index["label"][row]), int(self.methods[row])

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """The rows epoch `epoch` trains on, drawn with class- and dataset-balanced weights from `(seed, epoch)`."""
        rng = np.random.default_rng([self.config.seed, epoch])
        return rng.choice(len(self.weights), size=self.steps_per_epoch * self.config.batch_size, p=self.weights)

    # --- training ----------------------------------------------------------------------------------------------
    def _loss(self, batch: torch.Tensor, labels: torch.Tensor, methods: torch.Tensor) -> torch.Tensor:
        extras = {}
        if "methods" in inspect.signature(self.detector.training_loss).parameters:
            extras["methods"] = methods
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            return self.detector.training_loss(batch, labels, **extras)

    def train_step(self, batch: torch.Tensor, labels: torch.Tensor, methods: torch.Tensor) -> float:
        """One optimisation step; returns the loss."""
        self.detector.model.train()
        batch = batch.to(self.device, non_blocking=True)
        loss = self._loss(batch, labels.to(self.device), methods.to(self.device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at step {self.step}; lower --lr or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def fit(self) -> dict[str, Any]:
        """Train until `epochs` are done (or `max_steps`, an interruption on purpose); returns the last metrics."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.json").write_text(json.dumps(asdict(self.config), indent=2))
        log.info(
            "training %s: %d rows, %d steps/epoch x %d epochs, batch %d, crop %d², lr %g, augment %.2f, device %s",
            self.detector.name, len(self.weights), self.steps_per_epoch, self.config.epochs, self.config.batch_size,
            self.crop_size, self.config.lr, self.config.augment, self.device,
        )  # fmt: skip
        metrics: dict[str, Any] = {}
        while self.step < self.total_steps:
            if self.config.max_steps is not None and self.step >= self.config.max_steps:
                self.save_state()
                log.info("stopped at step %d (max_steps); resume with --resume", self.step)
                return metrics
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            self._train_epoch(epoch, in_epoch)
            if self.step % self.steps_per_epoch == 0:
                metrics = self._end_epoch(epoch)
        return metrics

    def _train_epoch(self, epoch: int, in_epoch: int) -> None:
        size = self.config.batch_size
        samples = _PlannedSamples(self, self.epoch_plan(epoch), epoch, in_epoch * size)
        loader = DataLoader(samples, batch_size=size, collate_fn=_collate, num_workers=self.config.workers)
        bar = tqdm(
            loader, total=self.steps_per_epoch, initial=in_epoch, desc=f"epoch {epoch + 1}/{self.config.epochs}",
            leave=False, unit="step",
        )  # fmt: skip
        started, seen = time.perf_counter(), 0
        for item in bar:
            if item is not None:
                batch, labels, methods, dropped = item
                self.unreadable += dropped
                loss = self.train_step(batch, labels, methods)
                seen += len(batch)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{seen / (time.perf_counter() - started):.1f}")
            else:
                self.unreadable += size
                self.step += 1  # a batch of only unreadable images still counts, so plans stay aligned
                self.scheduler.step()
            if self.step % self.config.save_every == 0:
                self.save_state()
            if self.config.max_steps is not None and self.step >= self.config.max_steps:
                break
        bar.close()

    def _end_epoch(self, epoch: int) -> dict[str, Any]:
        window = self.losses[-self.steps_per_epoch :]
        metrics = {"epoch": epoch + 1, "step": self.step, "loss": float(np.mean(window)) if window else None,
                   "lr": self.scheduler.get_last_lr()[0], "unreadable_train": self.unreadable,
                   "val": self.validate()}  # fmt: skip
        scores = [m["mcc"] for m in metrics["val"].values() if m.get("mcc") is not None]
        score = float(np.mean(scores)) if scores else -float(metrics["loss"] or 0.0)
        self.save_weights(self.out / "last")
        if score > self.best_score:
            self.best_score = score
            self.save_weights(self.out / "best")
        metrics["best_score"] = self.best_score
        with (self.out / METRICS_FILE).open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        summary = " | ".join(
            f"{name}: acc {m['accuracy']:.3f} mcc {m['mcc']:.3f} auc {m['auc'] if m['auc'] is None else round(m['auc'], 3)}"
            for name, m in metrics["val"].items()
            if m["n"]
        )
        log.info("epoch %d/%d step %d loss %.4f lr %.2e | %s", epoch + 1, self.config.epochs, self.step,
                 metrics["loss"] or float("nan"), metrics["lr"], summary or "no validation set")  # fmt: skip
        self.save_state()
        return metrics

    # --- validation --------------------------------------------------------------------------------------------
    def _val_images(self, name: str, ds) -> tuple[list[Image.Image], list[int], int]:
        if name not in self._val_cache:
            images, labels, unreadable = [], [], 0
            for cell, label in zip(ds["image"], ds["label"]):
                try:
                    images.append(decode_row_image(cell))
                    labels.append(int(label))
                except ImageDecodeError:
                    unreadable += 1
            self._val_cache[name] = (images, labels, unreadable)
        return self._val_cache[name]

    def validate(self) -> dict[str, dict[str, Any]]:
        """Arena metrics of the current model on every validation set."""
        results = {}
        self.detector.model.eval()
        for name, ds in self.val_sets:
            images, labels, unreadable = self._val_images(name, ds)
            probabilities = self.detector.predict(images)
            results[name] = {**binary_metrics(labels, probabilities), "unreadable": unreadable}
        self.detector.model.train()
        return results

    # --- checkpoints -------------------------------------------------------------------------------------------
    def save_weights(self, folder: Path) -> Path:
        """`model.safetensors` + `config.yaml` loadable by `build_detector`; floats stored as `save_dtype`."""
        dtype = getattr(torch, self.config.save_dtype)
        state = {
            key: tensor.to(dtype) if tensor.is_floating_point() else tensor
            for key, tensor in self.detector.model.state_dict().items()
        }
        return save_checkpoint(folder, self.detector.export_config(), state)

    def save_state(self) -> None:
        """Everything a resume needs, written atomically (a crash mid-write keeps the previous state)."""
        state = {
            "step": self.step,
            "model": self.detector.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "best_score": self.best_score,
            "losses": self.losses,
            "unreadable": self.unreadable,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
        }
        with atomic_writer(self.out / STATE_FILE) as handle:
            torch.save(state, handle)

    def _load_state(self) -> None:
        path = self.out / STATE_FILE
        if not path.is_file():
            log.info("no %s in %s; starting a fresh run", STATE_FILE, self.out)
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say so instead of a pickle traceback
            raise ConfigError(f"cannot resume from {str(path)!r}: {type(exc).__name__}: {exc}") from exc
        if (state["steps_per_epoch"], state["total_steps"]) != (self.steps_per_epoch, self.total_steps):
            raise ConfigError(
                f"cannot resume from {str(path)!r}: it was made with {state['steps_per_epoch']} steps/epoch and "
                f"{state['total_steps']} steps, this run has {self.steps_per_epoch} and {self.total_steps}; "
                "use the same data, batch size, samples per epoch and epochs"
            )
        self.detector.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.best_score = int(state["step"]), float(state["best_score"])
        self.losses, self.unreadable = list(state["losses"]), int(state["unreadable"])
        log.info("resumed %s at step %d of %d", self.out, self.step, self.total_steps)
