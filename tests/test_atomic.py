"""bitmind.atomic: the one atomic file write every module uses (heartbeat, validator state, image cache, checkpoints,
arena report, training state, local subnet status)."""

import os
import stat
import threading
from pathlib import Path

import pytest

from bitmind.atomic import atomic_write_bytes, atomic_writer, temp_target
from tests._killed_writer import kill_a_writer_of


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_an_error_inside_the_block_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "state.json"
    target.write_bytes(b"old content")
    with pytest.raises(RuntimeError, match="disk went away"):
        with atomic_writer(target) as handle:
            handle.write(b"new, but only ha")
            raise RuntimeError("disk went away")
    assert target.read_bytes() == b"old content"
    assert _names(tmp_path) == ["state.json"]


def test_a_killed_writer_keeps_the_old_file_and_its_temp_file_names_the_target(tmp_path):
    target = tmp_path / "state.json"
    target.write_bytes(b"old content")
    left = kill_a_writer_of(target)
    assert target.read_bytes() == b"old content"
    assert left.name.startswith(".")  # hidden: listings that skip dot files never see it
    assert temp_target(left.name) == "state.json"


@pytest.mark.parametrize("name", ["state.json", ".state.json", "state.json.tmp", ".tmp-abc", ".x.notours.tmp", ".tmp"])
def test_temp_target_is_none_for_names_the_writer_never_makes(name):
    assert temp_target(name) is None


@pytest.mark.parametrize(("old", "new"), [(b"a" * 10_000, b"short"), (b"short", b"b" * 10_000), (b"x", b"")])
def test_the_target_is_replaced_whole(tmp_path, old, new):
    target = tmp_path / "sub" / "file.bin"  # missing folders are created
    atomic_write_bytes(target, old)
    assert atomic_write_bytes(target, new) == target
    assert target.read_bytes() == new
    assert _names(target.parent) == ["file.bin"]


def test_a_function_can_write_into_the_file(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_bytes(target, lambda handle: (handle.write(b"line 1\n"), handle.write(b"line 2\n")))
    assert target.read_bytes() == b"line 1\nline 2\n"


def test_concurrent_writers_from_threads_never_produce_a_torn_file(tmp_path):
    """Each writer writes one byte value repeated a length that depends on it; every read must be one whole
    payload (one value, its length), never a mix of two writers or a truncated one."""
    target = tmp_path / "shared.bin"
    writers, rounds = 4, 60
    lengths = {value: 50_000 + 7_919 * value for value in range(writers)}
    atomic_write_bytes(target, bytes([0]) * lengths[0])
    done = threading.Event()
    torn: list[str] = []
    reads = 0

    def write(value: int) -> None:
        for _ in range(rounds):
            atomic_write_bytes(target, bytes([value]) * lengths[value])

    def read() -> None:
        nonlocal reads
        while not done.is_set() or reads == 0:
            data = target.read_bytes()
            reads += 1
            values = set(data)
            if len(values) != 1 or len(data) != lengths[data[0]]:
                torn.append(f"{len(data)} bytes of values {sorted(values)[:5]}")

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=write, args=(value,)) for value in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    reader.join()
    assert not torn, torn[:3]
    assert reads > 0
    assert _names(tmp_path) == ["shared.bin"]


def test_the_file_is_synced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append("replace"), real_replace(src, dst))[1])
    atomic_write_bytes(tmp_path / "f", b"data")
    assert events == ["fsync file", "replace", "fsync folder"]


def test_permissions_are_those_of_an_ordinary_write(tmp_path):
    previous_umask = os.umask(0o022)
    try:
        fresh = atomic_write_bytes(tmp_path / "fresh", b"1")
        kept = tmp_path / "kept"
        kept.write_bytes(b"old")
        kept.chmod(0o640)
        atomic_write_bytes(kept, b"new")
    finally:
        os.umask(previous_umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # 0666 less the umask, not mkstemp's 0600
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640  # an existing file keeps its mode


def test_bad_targets_are_clear_errors_that_leave_nothing_behind(tmp_path):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write_bytes(folder, b"data")
    assert _names(tmp_path) == ["a_folder"] and _names(folder) == []
    not_a_folder = tmp_path / "plain"
    not_a_folder.write_bytes(b"x")
    with pytest.raises(OSError):
        atomic_write_bytes(not_a_folder / "child", b"data")
    assert not_a_folder.read_bytes() == b"x"
