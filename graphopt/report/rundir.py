"""The run directory: checked before anything is built, claimed for one run, left whole.

* :func:`check_run_dir` says, as one line, why a directory cannot take a run: it cannot be
  created or written, it already holds a finished run's ``report.json`` (unless ``overwrite``),
  or a live run holds its lock;
* :class:`RunDirLock` is that lock: ``flock`` on ``<run_dir>/.graphopt.lock`` for the life of
  the process (the kernel drops it when the process dies, however it dies, so a crashed run
  never blocks the next one);
* :func:`pending_temp` registers the temp files of atomic writes, so an interrupt can remove
  those it cut short (:func:`remove_pending`) and no half-written file is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: the lock file a live run holds in its run directory
LOCK_NAME = ".graphopt.lock"
#: files of a finished run: their presence means the directory is taken
FINISHED_MARKERS = ("report.json",)
#: everything a run writes into its directory besides Hydra's own files; ``overwrite=true``
#: removes all of it first, so nothing of the old run (a compiled step, a picture) survives
#: next to the new run's report
RUN_OUTPUTS = (*FINISHED_MARKERS, "error.txt", ".exit_code", "compiled", "ir", "bisect",
               "variants", "pipeline.yaml", "program.txt", "program.json", "prologue.txt",
               "segments.json", "segments.svg", "segments.png", "flags.env")

#: temp files of atomic writes in progress (removed by an interrupt)
_PENDING: set[str] = set()


class RunDirError(Exception):
    """The run directory cannot take this run (one line, naming the path)."""


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _lock_holder(run_dir: Path) -> int | None:
    """The pid of a live run holding ``run_dir``'s lock, or None (no file, or nobody holds it)."""
    lock = run_dir / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = lock.read_text().strip() if lock.exists() else ""
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_run_dir(run_dir: str | Path, overwrite: bool = False, create: bool = True) -> Path:
    """Check (and with `create`, make) the run directory; return it absolute.

    Raises :class:`RunDirError` with one line naming the path when it is not a directory,
    cannot be created or written, holds a finished run (unless `overwrite`), or is locked by a
    live run (always: two runs writing one directory at once lose one of them).
    """
    path = Path(run_dir).expanduser().absolute()
    where = f"run directory {path}"
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{where}: exists and is not a directory (set hydra.run.dir=...)")
    holder = _lock_holder(path) if path.is_dir() else None
    if holder is not None:
        who = f"pid {holder}" if holder > 0 else "another process"
        raise RunDirError(f"{where}: in use by a live graphopt run ({who}); wait for it or "
                          "choose another hydra.run.dir=...")
    if path.is_dir() and not overwrite:
        done = [m for m in FINISHED_MARKERS if (path / m).exists()]
        if done:
            raise RunDirError(f"{where}: already holds a finished run ({done[0]}); set "
                              "overwrite=true to replace it, or choose another hydra.run.dir=...")
    if not create:
        base = _nearest_existing(path)
        if not os.access(base, os.W_OK | os.X_OK):
            raise RunDirError(f"{where}: not writable ({base} is read-only for this user)")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".graphopt-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            reason += " (read-only or not yours)"
        raise RunDirError(f"{where}: cannot create or write it: {reason}; choose another "
                          "hydra.run.dir=...") from None
    return path


class RunDirLock:
    """An exclusive lock on a run directory for this process (see module doc)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        """Take the lock or raise :class:`RunDirError` naming the holder."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirError(f"run directory {self.path.parent}: in use by a live graphopt "
                                  "run; wait for it or choose another hydra.run.dir=...") from None
            # The holder unlinks the file when it is done: a lock taken on a file that is no
            # longer the one at `path` guards nothing (a third process may be creating a new
            # one). Try again on the current file.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock and its file (idempotent; safe from a signal handler)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None


@contextlib.contextmanager
def pending_temp(path: str | Path) -> Iterator[Path]:
    """Register `path` as a temp file being written; removed if the write fails."""
    key = str(path)
    _PENDING.add(key)
    try:
        yield Path(path)
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
    finally:
        _PENDING.discard(key)


def remove_pending() -> list[str]:
    """Delete the temp files of atomic writes cut short (an interrupt); return their paths."""
    removed = []
    for key in list(_PENDING):
        with contextlib.suppress(OSError):
            os.unlink(key)
            removed.append(key)
        _PENDING.discard(key)
    return removed


def clear_outputs(run_dir: Path) -> None:
    """Remove what an earlier run wrote into `run_dir` (:data:`RUN_OUTPUTS`), nothing else."""
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
