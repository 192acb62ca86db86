"""One writer per run directory: an exclusive ``flock`` on ``RUN/.lock``, held by the training process to its end.

The operating system releases the lock when its holder dies, so a run killed with SIGKILL never leaves a stale
lock. Readers (eval, predict, export, report) take none and never wait. Where ``fcntl`` does not exist
(Windows) no lock is taken: nothing then stops two processes from writing one run directory.

Temporary files carry their writer's PID (``.last.pt.<pid>.<random>.tmp``); those of processes no longer alive
are removed when the lock is taken.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["RunLockedError", "RunLock", "lock_run_dir", "temporary_name", "remove_stale_temporaries", "process_alive"]

LOCK_NAME = ".lock"
# .<file>.<pid>.<anything>.tmp or .partial: what write_text_atomic, save_checkpoint and export leave mid-write
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.[0-9a-f]+\.(tmp|partial)(\.[A-Za-z0-9]+)?$")


class RunLockedError(RuntimeError):
    """Another process is writing this run directory."""


def temporary_name(path: Union[str, Path], suffix: str = "tmp") -> Path:
    """A temporary file beside ``path`` unique to this process and call: ``.name.<pid>.<random>.<suffix>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.{suffix}")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (this one included; another user's counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(directory: Union[str, Path]) -> int:
    """Remove the temporary files in ``directory`` whose writer is dead; returns how many."""
    removed = 0
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return 0
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match and entry.is_file() and not process_alive(int(match.group(1))):
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid = os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:
        pid = ""
    return f"PID {pid}" if pid.isdigit() else "a process that is still starting"


class RunLock:
    """The held lock of one run directory; :meth:`release` (or the process's end) lets it go."""

    def __init__(self, directory: Path, fd: Optional[int]):
        self.directory, self._fd = directory, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(directory: Union[str, Path]) -> RunLock:
    """Take ``directory``'s writer lock (creating the directory) or fail at once with
    :class:`RunLockedError` naming the holder's PID."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return RunLock(directory, None)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunLockedError(f"{directory} is being written by another moderncnn process ({holder}); wait for it "
                             f"to finish, or train under another --name") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    remove_stale_temporaries(directory)
    return RunLock(directory, fd)
