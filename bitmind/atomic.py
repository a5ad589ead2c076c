"""One atomic file write for the whole node: a crash or power cut leaves the old file or the new one, never half.

How: write a temporary file in the same folder (so `os.replace` is a rename on one filesystem), fsync it, replace
the target, then fsync the folder so the rename itself survives a power cut. The new file gets the permissions an
ordinary in-place write would leave: the old file's mode, or the umask's default for a new file.

A process killed between write and rename leaves its temporary file behind (`.<name>.<random>.tmp`, hidden so
folder listings skip it); `temp_target` tells the folder's owner which file it was for, so the owner can sweep it.
"""

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["TEMP_SUFFIX", "atomic_write_bytes", "atomic_writer", "temp_target"]

TEMP_SUFFIX = ".tmp"
_CREATE_TRIES = 100


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(target: Path) -> tuple[int, Path]:
    """A new, exclusive temporary file beside `target` (not `tempfile.mkstemp`: it forces mode 0600)."""
    for _ in range(_CREATE_TRIES):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, stat.S_IMODE(os.stat(target).st_mode))
        except FileNotFoundError:
            pass  # a new file keeps the umask's mode, as open() would give it
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return fd, tmp
    raise FileExistsError(f"could not create a temporary file beside {target} in {_CREATE_TRIES} tries")


def temp_target(name: str) -> str | None:
    """The file name whose atomic write left the temporary file `name`, or None when `name` is not one of ours."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    target, dot, token = name[1 : -len(TEMP_SUFFIX)].rpartition(".")
    return target if dot and target and len(token) == 12 else None


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces `path` only when the `with` block ends without an error."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(target)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(target.parent)


def atomic_write_bytes(path: str | Path, data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write `data` (bytes, or a function that writes into the file object) to `path` atomically."""
    with atomic_writer(path) as handle:
        if callable(data):
            data(handle)
        else:
            handle.write(data)
    return Path(path)
