"""Several generator workers (one per GPU in production) fill ONE synthetic cache: two real `neurons.generator`
processes on tiny Stable Diffusion pipelines (CPU) write into one folder with a shared item cap; a writer killed in
the middle of an item leaves nothing the validator's reader could take for a record."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests._tiny_models import one_torch_thread, tiny_models
from validator.challenges import cache as cache_module
from validator.challenges.cache import ImageCache
from validator.challenges.synthetic import SyntheticImageSource

__all__ = ["one_torch_thread", "tiny_models"]  # the fixtures this module uses

REPO = Path(__file__).resolve().parents[1]
CHILD_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
             "READ_ONLY": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
CAP_ITEMS = 3
IMAGES_PER_WORKER = 2


def _worker(models, cache_dir: Path, state_dir: Path, worker_id: int) -> subprocess.Popen:
    argv = [
        sys.executable, "-m", "neurons.generator", "--generator.models", str(models.sd),
        "--generator.prompt_mode", "static", "--generator.device", "cpu", "--generator.resolution", "64",
        "--generator.steps", "1", "--generator.batch", "1", "--generator.torch_threads", "1",
        "--generator.vram_budget_gb", "4", "--generator.seed", "5", "--generator.worker_id", str(worker_id),
        "--generator.max_images", str(IMAGES_PER_WORKER), "--generator.cache_dir", str(cache_dir),
        "--generator.cache_max_items", str(CAP_ITEMS), "--neuron.state_dir", str(state_dir),
        "--neuron.watchdog_timeout", "0",
    ]  # fmt: skip
    return subprocess.Popen(argv, cwd=REPO, env={**os.environ, **CHILD_ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def test_two_generator_workers_share_one_cache(tiny_models, tmp_path, caplog):
    cache_dir = tmp_path / "synthetic"
    workers = [_worker(tiny_models, cache_dir, tmp_path / f"state{k}", k) for k in (0, 1)]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    written = [name for output in outputs for name in re.findall(r"file=(\S+)", output)]
    assert len(written) == 2 * IMAGES_PER_WORKER and len(set(written)) == len(written)  # unique ids, none lost

    # The cap holds, and eviction was consistent across writers: exactly the newest items are left.
    names = sorted(os.listdir(cache_dir))
    stems = [item.stem for item in ImageCache(cache_dir).items()]
    assert stems == sorted(Path(name).stem for name in written)[-CAP_ITEMS:]
    assert not [name for name in names if name.endswith(".tmp")]  # no partial file
    images = {Path(name).stem for name in names if name.endswith(".png")}
    assert images == set(stems)  # no image without its sidecar

    # The validator's reader sees every finished record, each with its worker's metadata and no broken item.
    source = SyntheticImageSource(cache_dir)
    seen: set[str] = set()
    with caplog.at_level(logging.WARNING, logger="validator.challenges.cache"):
        for seed in range(200):
            image, label, metadata = source.sample(np.random.default_rng(seed))
            assert label == 1 and image.size == (64, 64) and metadata["model"] == "sd"
            seen.add(metadata["cache_item"])
            if seen == set(stems):
                break
    assert seen == set(stems)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    beats = [json.loads((tmp_path / f"state{k}" / "heartbeat.json").read_text()) for k in (0, 1)]
    assert [(beat["images"], beat["worker"]) for beat in beats] == [(IMAGES_PER_WORKER, 0), (IMAGES_PER_WORKER, 1)]


_DIES_WRITING_THE_SIDECAR = """
import os, sys
from PIL import Image
from bitmind import atomic
from validator.challenges import cache

def dying_write(path, data):
    if str(path).endswith(cache.SIDECAR_SUFFIX):  # the image is on disk; die half-way through its sidecar
        with atomic.atomic_writer(path) as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            os._exit(9)
    return atomic.atomic_write_bytes(path, data)

cache.atomic_write_bytes = dying_write
cache.ImageCache(sys.argv[1]).put(Image.new("RGB", (32, 32), "red"), {"worker": 1})
"""


def test_a_worker_killed_mid_write_leaves_no_record(tmp_path, monkeypatch):
    finished = ImageCache(tmp_path)
    finished.put(Image.new("RGB", (32, 32), "blue"), {"worker": 0})
    done = subprocess.run([sys.executable, "-c", _DIES_WRITING_THE_SIDECAR, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 9, done.stderr
    left = sorted(os.listdir(tmp_path))
    assert any(name.startswith(".") and ".json." in name and name.endswith(".tmp") for name in left)  # half sidecar
    # The reader sees only the finished record; the orphaned image and temp file are invisible...
    source = SyntheticImageSource(tmp_path)
    assert len(source) == 1
    assert {source.sample(np.random.default_rng(s))[2]["worker"] for s in range(20)} == {0}
    # ...and the next writer's sweep removes them once the grace period is over.
    monkeypatch.setattr(cache_module, "ORPHAN_GRACE_S", -1.0)
    writer = ImageCache(tmp_path)
    writer.evict()
    kept = sorted(name for name in os.listdir(tmp_path) if not name.startswith(".writers"))
    assert kept == sorted(path.name for item in writer.items() for path in (item.image_path, item.sidecar_path))
    assert len(writer.items()) == 1


def test_a_negative_worker_id_is_refused(capsys):
    from neurons import generator

    with pytest.raises(SystemExit) as exited:
        generator.main(["--generator.worker_id", "-1", "--generator.device", "cpu"])
    assert exited.value.code == 2 and "worker_id must be >= 0" in capsys.readouterr().err
