"""The training loop: class-balanced sampling, augmentation, AdamW with warm-up + cosine, mixed precision on GPU,
per-epoch validation with the arena's metrics, best/last checkpoints and exact resume.

Determinism: the model is initialised from `seed`; epoch `e` draws its sample plan from `(seed, e)` and sample
`k` of it is augmented from `(seed, e, k)`, so a run is reproduced by its seed, and a resumed run (which restores
weights, optimizer, scheduler, scaler and torch's RNG) continues exactly where the interrupted one stopped.

Several processes (`accelerate launch`, see `distributed.py`) share every global step of that same plan, so the
samples and the averaged gradient do not depend on how many processes train, and a run resumes on any number.
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
from accelerate.utils import gather_object
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
from base_miner.training.distributed import (
    DEFAULT_TIMEOUT_S,
    LossModule,
    check_consistent,
    make_accelerator,
    micro_batch_size,
    process_positions,
)
from base_miner.training.mask_pairs import PairedAugment, accepts_masks, align_mask_columns, row_mask
from base_miner.training.streaming import StreamReader, StreamSamples, method_index, open_stream, process_part
from bitmind.atomic import atomic_write_bytes, atomic_writer
from bitmind.image_codec import ImageDecodeError
from bitmind.stream_shuffle import shuffle_stream

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
    accumulation: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S
    streaming: bool = False
    shuffle_buffer: int = 1000


def random_crop(image: Image.Image, size: int, rng: np.random.Generator, mode: str) -> Image.Image:
    """A random `size`² crop; images smaller than `size` are first brought up to it exactly as inference does."""
    if min(image.size) < size:
        return fit_image(image, size, mode)
    width, height = image.size
    left, top = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
    return image.crop((left, top, left + size, top + size))


class _PlannedSamples(torch.utils.data.Dataset):
    """Sample `k` of an epoch plan: decoded, augmented from `(seed, epoch, k)`, cropped and normalised."""

    def __init__(self, trainer: "Trainer", plan: np.ndarray, epoch: int, positions: np.ndarray) -> None:
        self.trainer, self.plan, self.epoch, self.positions = trainer, plan, epoch, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int):
        position = int(self.positions[k])
        row = int(self.plan[position])
        return self.trainer.training_sample(row, np.random.default_rng([self.trainer.config.seed, self.epoch, position]))


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor | None] | None:
    """Stack the readable samples (and their masks, when samples carry one); unreadable ones (None) are dropped
    and counted."""
    good = [item for item in items if item is not None]
    if not good:
        return None
    tensors, labels, methods, *masks = zip(*good)
    masks = torch.stack([torch.from_numpy(mask) for mask in masks[0]]) if masks else None
    return torch.stack(tensors), torch.tensor(labels), torch.tensor(methods), len(items) - len(good), masks


class Trainer:
    """Train one `TorchDetector` from its config on the datasets of a `TrainConfig`."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.out = Path(config.out)
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.accelerator = make_accelerator(config.device, config.amp, config.accumulation, config.timeout_s)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        if self.world > 1 and config.device:
            raise ConfigError("--device is set by the launcher under accelerate launch / torchrun; drop it")
        self.micro_batch = micro_batch_size(config.batch_size, self.world, config.accumulation)
        self.detector = self._build_detector()
        self.device = self.detector.torch_device
        self.crop_size = config.crop_size or self.detector.settings.image_size
        self.augment = TrainAugment(config.augment, config.augment_ops)
        # Detectors that learn a generated-pixel map get each image with its mask, transformed together.
        self.paired = PairedAugment(config.augment, config.augment_ops) if accepts_masks(self.detector) else None
        self._mean = torch.tensor(self.detector.settings.mean).view(3, 1, 1)
        self._std = torch.tensor(self.detector.settings.std).view(3, 1, 1)
        self.gate = build_gate(load_config(config.gate_config).get("gate") or "face") if config.face_crops else None
        self.streams = None  # with --streaming: [(name, this process's shuffled part of the stream)]
        self._reader: StreamReader | None = None  # reads self.streams for the whole run
        self._reader_state: dict | None = None  # where a resumed run's reader starts
        if config.streaming:
            self.streams, self.val_sets = self._open_streams()
            samples = config.samples_per_epoch
        else:
            self.train_rows, self.val_sets = self._load_everywhere()
            self._index = self._row_index(self.train_rows)
            self.weights = balanced_weights(zip(self._index["dataset"], self._index["label"]))
            self.methods = self._method_indices()
            samples = config.samples_per_epoch or len(self.weights)
        self.steps_per_epoch = max(1, math.ceil(samples / config.batch_size))
        self.total_steps = self.steps_per_epoch * config.epochs
        optimizer = torch.optim.AdamW(self.detector.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.warmup_steps = round(config.warmup * self.total_steps)
        # The schedule counts global steps itself (accelerate's prepared scheduler would step once per process).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        # Wrapped for data parallelism (DDP when launched on several processes; checkpoints read the unwrapped
        # detector, so sharded FSDP is not supported), fp16 autocast and loss scaling on CUDA.
        self.train_model, self.optimizer = self.accelerator.prepare(LossModule(self.detector), optimizer)
        self.step = 0
        self._micro_losses: list[float] = []
        self.best_score = -math.inf
        self.epochs_ended = 0  # epochs whose validation, checkpoints and metrics line are written
        self.losses: list[float] = []
        self.unreadable = 0
        self._val_cache: dict[str, tuple[list[Image.Image], list[int], int]] = {}
        if config.resume:
            self._resume_everywhere()
        else:
            self._refuse_an_existing_run()

    # --- setup -------------------------------------------------------------------------------------------------
    def _build_detector(self) -> TorchDetector:
        device = self.config.device or (str(self.accelerator.device) if self.world > 1 else None)
        detector = build_detector(self.config.detector, device=device, **self.config.overrides)
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

    def _load_everywhere(self):
        """`_load_data` on every process (the main one first, so a hub dataset is downloaded once into the shared
        cache); a process that cannot read its data stops all of them with its reason instead of leaving the
        others waiting, and processes that see different rows (other files on another machine) are refused."""
        loaded, error = None, None
        with self.accelerator.main_process_first():
            try:
                loaded = self._load_data()
            except (DataError, ConfigError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        summary = None
        if loaded is not None:
            train, val_sets = loaded
            summary = (len(train), int(np.sum(train["label"])), [(name, len(ds)) for name, ds in val_sets])
        check_consistent(self.accelerator, error, summary, "the data (training rows, fakes, validation rows)")
        return loaded

    def _load_data(self):
        from datasets import concatenate_datasets

        selectors = [parse_selector(text) for text in self.config.holdout]
        train_parts, held = [], []
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
        return concatenate_datasets(align_mask_columns(train_parts)), self._val_sets(held)

    def _val_sets(self, held: list) -> list:
        """The --val sets and (as `holdout`) the held-out rows, each capped at --val-max (stratified, seeded)."""
        from datasets import concatenate_datasets

        val_sets = [(DatasetSpec.parse(text).name, load_spec(text)) for text in self.config.val]
        held = [ds for ds in held if len(ds)]
        if held:
            val_sets.append(("holdout", concatenate_datasets(align_mask_columns(held))))
        prepared = []
        for name, ds in val_sets:
            ds = self._prepare(stratified_subset(ds, self.config.val_max, self.config.seed), name)
            log.info("val %s: %d rows (%d real, %d fake)", name, len(ds), *self._counts(ds))
            prepared.append((name, ds))
        return prepared

    def _open_streams(self):
        """--streaming: every process opens its part of each training stream and checks it holds a row; the
        validation sets load as usual. A process whose part is empty or unreadable stops all with its reason."""
        config = self.config
        uses = {"--holdout": config.holdout, "--face-crops": config.face_crops,
                "a mask-learning detector": self.paired is not None}  # fmt: skip
        unsupported = [name for name, used in uses.items() if used]
        if unsupported:
            raise ConfigError(f"--streaming does not work with {', '.join(unsupported)}; train on map-style data")
        if not config.samples_per_epoch:
            raise ConfigError("--streaming needs --samples-per-epoch: a stream has no length to make an epoch of")
        streams, val_sets, error = [], [], None
        with self.accelerator.main_process_first():
            try:
                for text in config.train:
                    spec = DatasetSpec.parse(text)
                    part = process_part(open_stream(spec), self.rank, self.world)
                    if next(iter(part), None) is None:
                        raise DataError(f"its part of {spec.name!r} holds no row (fewer rows than processes?)")
                    streams.append((spec.name, shuffle_stream(part, config.seed, config.shuffle_buffer)))
                    log.info("train %s: streamed, this process's part of %d", spec.name, self.world)
                val_sets = self._val_sets([])
            except (DataError, ConfigError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        summary = [(name, len(ds)) for name, ds in val_sets]
        check_consistent(self.accelerator, error, summary, "the validation data")
        return streams, val_sets

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
        label = int(self._index["label"][row])
        if self.paired is not None:
            try:
                mask = row_mask(self.train_rows[row].get("mask"), image.size, label)
            except ImageDecodeError as exc:
                log.warning("skipping training row %d with an unusable mask: %s", row, exc)
                return None
            image, mask = self.paired(image, mask, self.crop_size, rng)
            return self._to_tensor(image), label, int(self.methods[row]), mask
        return self._augmented(image, rng), int(self._index["label"][row]), int(self.methods[row])

    def _augmented(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        image = random_crop(self.augment(image, rng), self.crop_size, rng, self.detector.settings.resize_mode)
        return self._to_tensor(image)

    def stream_sample(self, row: dict, rng: np.random.Generator):
        """(tensor, label, method) for one streamed row, or None when its image is unreadable."""
        try:
            image = decode_row_image(row["image"])
        except ImageDecodeError as exc:
            log.warning("skipping an unreadable streamed row of %s: %s", row["source"], exc)
            return None
        label = int(row["label"])
        classes = getattr(self.detector.settings, "num_methods", 2)
        return self._augmented(image, rng), label, method_index(row["generator"], label, classes)

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """The rows epoch `epoch` trains on, drawn with class- and dataset-balanced weights from `(seed, epoch)`."""
        rng = np.random.default_rng([self.config.seed, epoch])
        return rng.choice(len(self.weights), size=self.steps_per_epoch * self.config.batch_size, p=self.weights)

    # --- training ----------------------------------------------------------------------------------------------
    def _loss(
        self, batch: torch.Tensor, labels: torch.Tensor, methods: torch.Tensor, masks: torch.Tensor | None = None
    ) -> torch.Tensor:
        extras = {}
        if "methods" in inspect.signature(self.detector.training_loss).parameters:
            extras["methods"] = methods
        if masks is not None:
            extras["masks"] = masks
        with self.accelerator.autocast():  # fp16 on CUDA with --amp, a no-op on CPU
            return self.train_model(batch, labels, **extras)  # detector.training_loss, through the DDP wrapper

    def train_step(
        self, batch: torch.Tensor, labels: torch.Tensor, methods: torch.Tensor, masks: torch.Tensor | None = None,
        weight: float = 1.0, dropped: int = 0,
    ) -> float:
        """One micro-batch (the whole step unless --grad-accum): forward, backward, and the optimizer update once
        the step's micro-batches are in; returns the loss averaged over processes.

        `weight` 0 marks a stand-in for a micro-batch without one readable image: the process still joins the
        gradient exchange (others would wait for it) but adds nothing. `dropped` counts its unreadable samples.
        """
        self.detector.model.train()
        batch = batch.to(self.device, non_blocking=True)
        masks = masks.to(self.device) if masks is not None else None
        with self.accelerator.accumulate(self.train_model):
            loss = self._loss(batch, labels.to(self.device), methods.to(self.device), masks)
            local = torch.tensor([float(loss.detach()) * weight, weight, dropped], device=self.device)
            total = self.accelerator.reduce(local, "sum")  # every process gets the same sums: same decisions
            value = float(total[0] / total[1]) if total[1] > 0 else 0.0
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {self.step}; lower --lr or check the data")
            self.unreadable += int(total[2])
            self.accelerator.backward(loss * weight)
            self.optimizer.step()  # skipped by accelerate until the step's last micro-batch
            self.optimizer.zero_grad(set_to_none=True)
        self._micro_losses.append(value)
        if self.accelerator.sync_gradients:
            self.scheduler.step()
            self.step += 1
            value = float(np.mean(self._micro_losses))
            self._micro_losses.clear()
            self.losses.append(value)
        return value

    def fit(self) -> dict[str, Any]:
        """Train until `epochs` are done (or `max_steps`, an interruption on purpose); returns the last metrics."""
        if self.accelerator.is_main_process:
            atomic_write_bytes(self.out / "train_config.json", json.dumps(asdict(self.config), indent=2).encode())
        log.info(
            "training %s: %s rows, %d steps/epoch x %d epochs, batch %d (%d process(es) x %d accumulation x %d), "
            "crop %d², lr %g, augment %.2f, device %s",
            self.detector.name, "streamed" if self.streams else len(self.weights), self.steps_per_epoch,
            self.config.epochs, self.config.batch_size, self.world, self.config.accumulation, self.micro_batch,
            self.crop_size, self.config.lr, self.config.augment, self.device,
        )  # fmt: skip
        metrics: dict[str, Any] = {}
        while True:
            trained = self.step // self.steps_per_epoch
            if self.epochs_ended < trained:  # also an epoch whose end an interruption cut short before a resume
                metrics = self._end_epoch(trained - 1)
                continue
            if self.step >= self.total_steps:
                return metrics
            if self.config.max_steps is not None and self.step >= self.config.max_steps:
                self.save_state()
                log.info("stopped at step %d (max_steps); resume with --resume", self.step)
                return metrics
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            self._train_epoch(epoch, in_epoch)

    def _train_epoch(self, epoch: int, in_epoch: int) -> None:
        end = self.steps_per_epoch
        if self.config.max_steps is not None:
            end = min(end, self.config.max_steps - epoch * self.steps_per_epoch)
        positions = process_positions(in_epoch, end, self.config.batch_size, self.world, self.rank,
                                      self.config.accumulation)  # fmt: skip
        if self.streams is None:
            samples, workers = _PlannedSamples(self, self.epoch_plan(epoch), epoch, positions), self.config.workers
        else:  # one reader per process: DataLoader workers would each read the whole stream
            if self._reader is None:
                self._reader = StreamReader(self.streams, self.config.seed, self.rank, self._reader_state)
            samples, workers = StreamSamples(self, self._reader, epoch, positions), 0
        loader = DataLoader(samples, batch_size=self.micro_batch, collate_fn=_collate, num_workers=workers)
        bar = tqdm(
            total=self.steps_per_epoch, initial=in_epoch, desc=f"epoch {epoch + 1}/{self.config.epochs}",
            leave=False, unit="step", disable=not self.accelerator.is_main_process,
        )  # fmt: skip
        started, seen, first = time.perf_counter(), 0, self.step
        for item in loader:
            if item is None:  # no readable image: a weightless stand-in keeps this process in the exchange
                loss = self.train_step(*self._stand_in(), weight=0.0, dropped=self.micro_batch)
            else:
                batch, labels, methods, dropped, masks = item
                loss = self.train_step(batch, labels, methods, masks, dropped=dropped)
                seen += len(batch)
            if self.accelerator.sync_gradients:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{seen / (time.perf_counter() - started):.1f}")
                if self.step % self.config.save_every == 0:
                    self.save_state()
        bar.close()
        self._log_throughput(epoch, seen, time.perf_counter() - started, self.step - first)

    def _stand_in(self) -> tuple:
        """A one-image micro-batch (zeros) shaped like a real one, masks included when the detector takes them."""
        side = self.crop_size
        item = (torch.zeros(3, side, side), 0, 0, *((np.zeros((side, side), np.float32),) if self.paired else ()))
        batch, labels, methods, _, masks = _collate([item])
        return batch, labels, methods, masks

    def _log_throughput(self, epoch: int, seen: int, seconds: float, steps: int) -> None:
        """Images/s of every process and in total, one line (a collective: every process calls it)."""
        rates = gather_object([seen / seconds if seconds > 0 else 0.0])
        per_process = ", ".join(f"{rate:.1f}" for rate in rates)
        log.info("epoch %d: %d steps in %.1f s, %.1f images/s in total (per process: %s)",
                 epoch + 1, steps, seconds, sum(rates), per_process)  # fmt: skip

    def _end_epoch(self, epoch: int) -> dict[str, Any]:
        window = self.losses[-self.steps_per_epoch :]
        metrics = {"epoch": epoch + 1, "step": self.step, "loss": float(np.mean(window)) if window else None,
                   "lr": self.scheduler.get_last_lr()[0], "unreadable_train": self.unreadable,
                   "val": self.validate()}  # fmt: skip
        scores = [m["mcc"] for m in metrics["val"].values() if m.get("mcc") is not None]
        score = float(np.mean(scores)) if scores else -float(metrics["loss"] or 0.0)
        improved = score > self.best_score
        self.best_score = max(self.best_score, score)
        metrics["best_score"] = self.best_score
        if self.accelerator.is_main_process:  # one writer; every file replaced atomically
            self.save_weights(self.out / "last")
            if improved:
                self.save_weights(self.out / "best")
            path = self.out / METRICS_FILE
            # An epoch end run again after an interruption replaces its line instead of adding a second one.
            kept = [line for line in (path.read_text().splitlines() if path.is_file() else [])
                    if line.strip() and json.loads(line).get("epoch") != epoch + 1]  # fmt: skip
            atomic_write_bytes(path, "".join(line + "\n" for line in [*kept, json.dumps(metrics)]).encode())
        summary = " | ".join(
            f"{name}: acc {m['accuracy']:.3f} mcc {m['mcc']:.3f} auc {m['auc'] if m['auc'] is None else round(m['auc'], 3)}"
            for name, m in metrics["val"].items()
            if m["n"]
        )
        log.info("epoch %d/%d step %d loss %.4f lr %.2e | %s", epoch + 1, self.config.epochs, self.step,
                 metrics["loss"] or float("nan"), metrics["lr"], summary or "no validation set")  # fmt: skip
        self.epochs_ended = epoch + 1
        self.save_state()
        return metrics

    # --- validation --------------------------------------------------------------------------------------------
    def _val_images(self, name: str, ds) -> tuple[list[Image.Image], list[int], int]:
        if name not in self._val_cache:
            images, labels, unreadable = [], [], 0
            share = range(self.rank, len(ds), self.world)  # this process's shard; `validate` gathers them
            for cell, label in zip(ds[share]["image"], ds[share]["label"]):
                try:
                    images.append(decode_row_image(cell))
                    labels.append(int(label))
                except ImageDecodeError:
                    unreadable += 1
            self._val_cache[name] = (images, labels, unreadable)
        return self._val_cache[name]

    def validate(self) -> dict[str, dict[str, Any]]:
        """Arena metrics of the current model on every validation set, each process predicting its shard."""
        results = {}
        self.detector.model.eval()
        for name, ds in self.val_sets:
            images, labels, unreadable = self._val_images(name, ds)
            shards = gather_object([(labels, self.detector.predict(images), unreadable)])
            labels = [label for shard in shards for label in shard[0]]
            probabilities = [p for shard in shards for p in shard[1]]
            results[name] = {**binary_metrics(labels, probabilities), "unreadable": sum(s[2] for s in shards)}
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

    def save_state(self, collective: bool = True) -> None:
        """Everything a resume needs, written atomically by the main process (a crash mid-write keeps the previous
        state). Positions are global steps, so a run may resume on another number of processes. Streamed runs also
        keep every process's stream position, gathered unless `collective` is False (an interrupted run, whose
        processes may no longer answer; its streams then start over on resume)."""
        streams = None
        if self._reader is not None and collective:
            streams = gather_object([self._reader.state()])
        if not self.accelerator.is_main_process:
            return
        scaler = self.accelerator.scaler
        state = {
            "step": self.step,
            "model": self.detector.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "world_size": self.world,
            "streams": streams,
            "torch_rng": torch.get_rng_state(),
            "best_score": self.best_score,
            "epochs_ended": self.epochs_ended,
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
        try:
            self.detector.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"cannot resume from {str(path)!r}: it was made with another detector or config "
                              f"({first}); resume with the run's own --detector and --set") from exc
        if self.accelerator.scaler is not None and state["scaler"]:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.best_score = int(state["step"]), float(state["best_score"])
        # States written before this was recorded ended every epoch they reached.
        self.epochs_ended = int(state.get("epochs_ended", self.step // self.steps_per_epoch))
        self.losses, self.unreadable = list(state["losses"]), int(state["unreadable"])
        log.info("resumed %s at step %d of %d (saved by %s process(es), now %d)", self.out, self.step,
                 self.total_steps, state.get("world_size", 1), self.world)  # fmt: skip
        if self.streams is not None:
            positions = state.get("streams")
            if positions and len(positions) == self.world:
                self._reader_state = positions[self.rank]
            else:
                log.warning("the streams start over: the state holds no stream position for %d process(es)", self.world)

    def _refuse_an_existing_run(self) -> None:
        """A fresh run into a folder that holds one would mix their metrics lines and replace its checkpoints."""
        error = None
        if (self.out / STATE_FILE).is_file():
            error = (f"{str(self.out)!r} holds a run ({STATE_FILE}): continue it with --resume, or train into "
                     "another --out")  # fmt: skip
        check_consistent(self.accelerator, error, None, "the run folder")

    def _resume_everywhere(self) -> None:
        """`_load_state` on every process; all stop when one cannot read the state or finds another step (its
        machine does not see the run folder)."""
        error = None
        try:
            self._load_state()
        except ConfigError as exc:
            error = str(exc)
        check_consistent(self.accelerator, error, self.step, "the step to resume from (is --out on storage every "
                         "machine shares?)")  # fmt: skip
