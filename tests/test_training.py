"""bitmind-train: every detector learns on cifake-mini, resume is exact, seeds reproduce, bad input fails cleanly."""

import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from base_miner.registry import ConfigError, build_detector
from base_miner.training import cli
from base_miner.training.augment import DEFAULT_OPERATIONS, OPERATIONS, TrainAugment
from base_miner.training.data import DataError, DatasetSpec, load_spec, parse_selector, select, stratified_subset
from base_miner.training.trainer import STATE_FILE, TrainConfig, Trainer
from tests._required import shared_data

TINY_UCF = {"backbone": "test_resnet", "feature_dim": 16, "hidden_dim": 16}


@pytest.fixture(scope="module")
def cifake_mini() -> Path:
    return shared_data("cifake-mini/train.parquet")  # missing: fails under CI, skips elsewhere


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_parquet(path: Path, rows: list[tuple[bytes, int, str, str]]) -> Path:
    """A parquet file in the shared layout (image struct {bytes, path}, label, source, generator)."""
    table = pa.table({
        "image": [{"bytes": b, "path": None} for b, *_ in rows],
        "label": [r[1] for r in rows],
        "source": [r[2] for r in rows],
        "generator": [r[3] for r in rows],
    })  # fmt: skip
    pq.write_table(table, path)
    return path


def make_config(train: list[str], out: Path, **keys) -> TrainConfig:
    base = dict(detector="npr", train=train, out=str(out), overrides={"image_size": 32}, epochs=1,
                samples_per_epoch=16, batch_size=8, lr=1e-3, warmup=0.0, augment=0.0, val_max=32, seed=0, threads=1)  # fmt: skip
    base.update(keys)
    return TrainConfig(**base)


def fixed_batch_losses(trainer: Trainer, steps: int) -> list[float]:
    """Train on one fixed batch (the first 8 planned samples, no augmentation) and return the step losses."""
    rng = np.random.default_rng(0)
    rows = trainer.epoch_plan(0)[:8]
    items = [trainer.training_sample(int(row), rng) for row in rows]
    batch = torch.stack([t for t, _, _ in items])
    labels, methods = torch.tensor([l for _, l, _ in items]), torch.tensor([m for _, _, m in items])
    return [trainer.train_step(batch, labels, methods) for _ in range(steps)]


# --- each detector learns ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "detector, overrides",
    [("npr", {"image_size": 32}), ("ucf", {**TINY_UCF, "image_size": 32}), ("generalist", {"image_size": 32})],
    ids=["npr", "ucf", "generalist"],
)
def test_loss_falls_on_a_fixed_cifake_batch(detector, overrides, cifake_mini, tmp_path):
    config = make_config([f"{cifake_mini}:train[:64]"], tmp_path, detector=detector, overrides=overrides, epochs=50)
    trainer = Trainer(config)
    losses = fixed_batch_losses(trainer, 12)
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
    if detector == "ucf":  # UCF trains with its multi-task loss, not plain BCE
        assert set(trainer.detector.last_loss_terms) == {"common", "specific", "reconstruction", "contrastive"}


def test_ucf_method_labels_follow_generators(tmp_path):
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    path = write_parquet(tmp_path / "g.parquet", [
        (_jpeg(red), 0, "a", ""), (_jpeg(blue), 1, "b", "gen-x"), (_jpeg(blue), 1, "c", "gen-y"), (_jpeg(red), 1, "c", "gen-z"),
    ])  # fmt: skip
    trainer = Trainer(make_config([str(path)], tmp_path / "run", detector="ucf", overrides={**TINY_UCF, "image_size": 32, "num_methods": 3}))
    # real -> 0; three generators fold onto the two fake classes 1, 2, 1
    assert trainer.methods.tolist() == [0, 1, 2, 1]


def test_face_expert_trains_on_the_gates_face_crops(tmp_path):
    astronaut = Image.fromarray(skdata.astronaut()).resize((400, 400))
    coffee = Image.fromarray(skdata.coffee()).resize((64, 48))
    # "fake": the same face with a 2x nearest up-sampling grid, a trace a detector can learn
    fake = astronaut.resize((200, 200)).resize((400, 400), Image.Resampling.NEAREST)
    path = write_parquet(tmp_path / "faces.parquet", [
        (_jpeg(astronaut), 0, "photos", ""), (_jpeg(fake), 1, "gen", "nearest"),
        (_jpeg(astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)), 0, "photos", ""),
        (_jpeg(fake.transpose(Image.Transpose.FLIP_LEFT_RIGHT)), 1, "gen", "nearest"),
        (_jpeg(coffee), 0, "photos", ""),  # no face: dropped by the gate
    ])  # fmt: skip
    config = make_config([str(path)], tmp_path / "run", detector="face_expert", overrides={"image_size": 32},
                         face_crops=True, epochs=50)  # fmt: skip
    trainer = Trainer(config)
    assert len(trainer.train_rows) == 4  # the four face images, as crops
    crop = trainer.train_rows[0]["image"]
    assert Image.open(io.BytesIO(crop["bytes"])).size == (256, 256)  # the gate's crop_size in camo.yaml
    losses = fixed_batch_losses(trainer, 8)
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


# --- the full loop: checkpoints, resume, determinism ------------------------------------------------------------
def _loop_config(cifake_mini: Path, out: Path, **keys) -> TrainConfig:
    settings = dict(val=[f"{cifake_mini}:train[-16:]"], epochs=3, samples_per_epoch=16, augment=0.5, save_every=1)
    return make_config([f"{cifake_mini}:train[:48]"], out, **{**settings, **keys})


def test_fit_writes_loadable_best_and_last_checkpoints(cifake_mini, tmp_path):
    trainer = Trainer(_loop_config(cifake_mini, tmp_path, save_dtype="float16"))
    metrics = trainer.fit()
    assert trainer.step == 6 and metrics["epoch"] == 3
    assert {"accuracy", "mcc", "auc", "n"} <= set(metrics["val"]["cifake-mini/train:train[-16:]"])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    for name in ("best", "last"):
        detector = build_detector(tmp_path / name / "config.yaml", device="cpu")
        assert next(detector.model.parameters()).dtype == torch.float32  # fp16 on disk, fp32 in memory
        assert len(detector.predict([Image.new("RGB", (32, 32))])) == 1
    # last/ holds the final weights (rounded to fp16)
    last = build_detector(tmp_path / "last" / "config.yaml", device="cpu").model.state_dict()
    for key, tensor in trainer.detector.model.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(last[key], tensor.half().float())


def test_resume_continues_from_the_saved_step_exactly(cifake_mini, tmp_path):
    straight = Trainer(_loop_config(cifake_mini, tmp_path / "straight"))
    straight.fit()

    interrupted = Trainer(_loop_config(cifake_mini, tmp_path / "resumed", max_steps=3))
    interrupted.fit()
    assert interrupted.step == 3 and (tmp_path / "resumed" / STATE_FILE).is_file()

    resumed = Trainer(_loop_config(cifake_mini, tmp_path / "resumed", resume=True))
    assert resumed.step == 3
    assert resumed.scheduler.last_epoch == 3
    state = next(iter(resumed.optimizer.state.values()))
    assert int(state["step"]) == 3  # AdamW moments restored, not restarted
    resumed.fit()
    assert resumed.step == 6
    assert resumed.losses == straight.losses  # same batches, same augmentation, same updates
    for key, tensor in straight.detector.model.state_dict().items():
        torch.testing.assert_close(resumed.detector.model.state_dict()[key], tensor)


def test_an_epoch_end_cut_short_is_finished_on_resume(cifake_mini, tmp_path, monkeypatch):
    """Ctrl-C during the last epoch's validation: the state is saved at the epoch's last step (as the CLI does), and
    the resumed run validates and writes that epoch's checkpoints and metrics line before it reports done."""
    out = tmp_path / "run"
    first = Trainer(_loop_config(cifake_mini, out, epochs=2))
    calls = {"n": 0}
    real_validate = first.validate

    def interrupted():
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_validate()

    monkeypatch.setattr(first, "validate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    first.save_state(collective=False)
    assert first.step == 4 and first.epochs_ended == 1
    resumed = Trainer(_loop_config(cifake_mini, out, epochs=2, resume=True))
    metrics = resumed.fit()
    assert metrics["epoch"] == 2 and resumed.step == 4
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert (out / "last" / "model.safetensors").is_file()
    assert Trainer(_loop_config(cifake_mini, out, epochs=2, resume=True)).fit() == {}  # finished: nothing again


def test_a_run_folder_is_never_mixed_with_another_run(cifake_mini, tmp_path):
    Trainer(_loop_config(cifake_mini, tmp_path, epochs=1)).fit()
    with pytest.raises(ConfigError, match="holds a run .* continue it with --resume"):
        Trainer(_loop_config(cifake_mini, tmp_path, epochs=1))
    with pytest.raises(ConfigError, match="made with another detector or config"):
        Trainer(_loop_config(cifake_mini, tmp_path, epochs=1, resume=True, detector="tiny_cnn"))


def test_same_seed_same_losses_other_seed_other_losses(cifake_mini, tmp_path):
    runs = [Trainer(_loop_config(cifake_mini, tmp_path / str(i), seed=seed, epochs=1)) for i, seed in enumerate((7, 7, 8))]
    for trainer in runs:
        trainer.fit()
    assert runs[0].losses == runs[1].losses
    assert runs[0].losses != runs[2].losses


def test_unreadable_training_rows_are_skipped_and_counted(tmp_path):
    image = _jpeg(Image.new("RGB", (32, 32), "green"))
    bad = (b"not an image", 1, "b", "g")
    path = write_parquet(tmp_path / "bad.parquet", [(image, 0, "a", ""), bad, bad, bad, (image, 1, "b", "g")])
    trainer = Trainer(make_config([str(path)], tmp_path / "run", samples_per_epoch=8, batch_size=4))
    trainer.fit()
    assert trainer.unreadable > 0 and trainer.step == 2


def test_holdout_removes_sources_from_training_and_validates_on_them(tmp_path):
    image = _jpeg(Image.new("RGB", (32, 32), "green"))
    rows = [(image, 0, "keep", ""), (image, 0, "held", ""), (image, 1, "x", "seen"), (image, 1, "x", "unseen")] * 2
    path = write_parquet(tmp_path / "d.parquet", rows)
    trainer = Trainer(make_config([str(path)], tmp_path / "run", holdout=["source=held", "generator=unseen"]))
    assert sorted(set(trainer.train_rows["source"])) == ["keep", "x"]
    assert "unseen" not in trainer.train_rows["generator"]
    (name, held), = trainer.val_sets
    assert name == "holdout" and sorted(held["source"]) == ["held", "held", "x", "x"]


# --- the shipped default weights ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["npr", "generalist", "face_expert"])
def test_shipped_weights_are_small_fp16_and_load_into_their_architecture(name):
    from safetensors import safe_open

    from base_miner.checkpoint import WEIGHTS_DIR

    folder = WEIGHTS_DIR / name
    assert (folder / "model.safetensors").stat().st_size < 8 * 1024 * 1024
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        dtypes = {handle.get_tensor(key).dtype for key in handle.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    detector = build_detector(folder / "config.yaml", device="cpu", image_size=64)
    assert next(detector.model.parameters()).dtype == torch.float32
    (p,) = detector.predict([Image.fromarray(skdata.astronaut())])
    assert 0.0 <= p <= 1.0


# --- data ------------------------------------------------------------------------------------------------------
def test_imagefolder_labels_come_from_folder_names(tmp_path):
    for folder, colour in (("real", "red"), ("fake", "blue")):
        (tmp_path / folder).mkdir()
        for i in range(2):
            Image.new("RGB", (16, 16), colour).save(tmp_path / folder / f"{i}.png")
    ds = load_spec(str(tmp_path))
    by_colour = {Image.open(io.BytesIO(cell["bytes"]) if cell["bytes"] else cell["path"]).getpixel((0, 0)): label
                 for cell, label in zip(ds["image"], ds["label"])}  # fmt: skip
    assert by_colour == {(255, 0, 0): 0, (0, 0, 255): 1}


def test_spec_parsing_and_selection(cifake_mini):
    spec = DatasetSpec.parse(f"{cifake_mini}:train[:100]?label=1")
    assert spec.split == "train[:100]" and spec.selectors == (parse_selector("label=1"),)
    ds = load_spec(spec)
    assert len(ds) > 0 and set(ds["label"]) == {1}
    full = load_spec(f"{cifake_mini}:train[:100]")
    assert len(select(full, [parse_selector("label=0")])) + len(ds) == 100
    subset = stratified_subset(full, 20, seed=0)
    assert len(subset) == 20 and abs(sum(subset["label"]) - 20 * sum(full["label"]) / 100) <= 1


@pytest.mark.parametrize("bad", ["source", "colour=red", "label=2", "source="])
def test_bad_selectors_are_rejected(bad):
    with pytest.raises(DataError):
        parse_selector(bad)


def test_missing_dataset_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_spec(str(tmp_path / "nope"))


# --- augmentation ----------------------------------------------------------------------------------------------
def test_augmentation_is_seeded_and_strength_zero_is_identity():
    image = Image.fromarray(skdata.astronaut()).resize((64, 64))
    augment = TrainAugment(1.0)
    first = augment(image, np.random.default_rng(3))
    again = augment(image, np.random.default_rng(3))
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert TrainAugment(0.0)(image, np.random.default_rng(3)) is image or np.array_equal(
        np.asarray(TrainAugment(0.0)(image, np.random.default_rng(3))), np.asarray(image)
    )
    plans = [TrainAugment(1.0).plan(np.random.default_rng(i)) for i in range(50)]
    assert {op for plan in plans for op in plan} == set(DEFAULT_OPERATIONS) == set(OPERATIONS) - {"challenge", "noise", "sharpen"}
    assert any(len(set(plan)) < len(plan) for plan in plans)  # an operation can repeat
    assert len({tuple(plan) for plan in plans}) > 40  # counts and order vary


def test_camera_trait_operations_change_pixels_modestly_and_deterministically():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(40, 200, (64, 64, 3), dtype=np.uint8))
    for name, low, high in (("noise", 1.0, 12.0), ("sharpen", 0.5, 60.0)):
        op = OPERATIONS[name]
        out = op(image, np.random.default_rng(5))
        assert out.size == image.size and out.mode == "RGB"
        change = np.abs(np.asarray(out, np.float32) - np.asarray(image, np.float32)).mean()
        assert low < change < high, (name, change)
        assert np.array_equal(np.asarray(out), np.asarray(op(image, np.random.default_rng(5))))


def test_every_operation_survives_tiny_images():
    tiny = Image.new("RGB", (9, 9), "white")
    for name in OPERATIONS:
        out = TrainAugment(1.0, ops=[name], max_repeats=8)(tiny, np.random.default_rng(0))
        assert out.mode == "RGB" and min(out.size) >= 1


@pytest.mark.parametrize("kwargs", [{"strength": 1.5}, {"strength": -0.1}, {"ops": ["warp"]}, {"max_repeats": 0}])
def test_bad_augmentation_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        TrainAugment(**kwargs)


# --- command line ----------------------------------------------------------------------------------------------
def test_cli_trains_and_resumes(cifake_mini, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    argv = ["--detector", "npr", "--set", "image_size=32", "--train", f"{cifake_mini}:train[:32]", "--epochs", "2",
            "--samples-per-epoch", "8", "--batch-size", "4", "--augment", "0", "--threads", "1", "--out", str(tmp_path)]  # fmt: skip
    assert cli.main([*argv, "--max-steps", "2"]) == 0
    assert cli.main([*argv, "--resume"]) == 0
    assert "resumed" in caplog.text and "at step 2 of 4" in caplog.text
    assert (tmp_path / "last" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--detector", "no_such_detector"], "no packaged detector config"),
        (["--detector", "npr", "--train", "/no/such/data"], "does not exist"),
        (["--detector", "npr", "--holdout", "colour=red"], "must be KEY=VALUE"),
        (["--detector", "npr", "--set", "image_size=31"], "even"),
        (["--detector", "baseline"], "not a trainable"),
    ],
)
def test_cli_bad_input_exits_with_a_clear_error(args, message, cifake_mini, tmp_path, caplog):
    argv = ["--train", str(cifake_mini), "--out", str(tmp_path), *args]
    assert cli.main(argv) == 2
    assert message in caplog.text


def test_cli_rejects_out_of_range_flags(tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--detector", "npr", "--train", "x", "--out", str(tmp_path), "--augment", "2"])
    assert exc.value.code == 2
