"""What a process killed in the middle of an atomic write leaves behind: its temporary file, made by the real
`bitmind.atomic` in a child process that dies (os._exit, as a SIGKILL would) before the rename."""

import subprocess
import sys
from pathlib import Path

_CHILD = """
import os, sys
from bitmind.atomic import atomic_writer
with atomic_writer(sys.argv[1]) as handle:
    handle.write(sys.argv[2].encode())
    handle.flush()
    os._exit(9)
"""


def kill_a_writer_of(path: Path, partial: str = "half-writ") -> Path:
    """Run a writer of `path` that dies before its rename; returns the temporary file it left."""
    before = set(path.parent.iterdir()) if path.parent.is_dir() else set()
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path), partial], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 9, done.stderr
    (left,) = set(path.parent.iterdir()) - before
    return left
