"""Never lose the last good result: atomic replacement of a stage's output, one writer per output,
and disk-full errors a user can act on.

A stage output ``FINAL`` (a directory) is rebuilt in a sibling working directory ``.FINAL.work``
(training checkpoints live there, so a killed run resumes from it). Only after the new manifest is
written there does :meth:`Replacement.commit` swap it into place (one ``renameat2(RENAME_EXCHANGE)``
on Linux; elsewhere two renames, with ``.FINAL.old`` restored by the next run if a kill fell between
them). Until then the previous complete output stays where it was and stays valid. A stage that
owns only some files of a shared directory (compare's reports/) builds those files in the working
directory and moves them in one by one at commit, the manifest last (``owned=`` names them).

A shared directory's stage keeps both inside it (``reports/.compare.work``, ``reports/.compare.lock``).
``.FINAL.lock`` guards the output: ``fcntl.flock`` is released by the kernel when its holder dies, so
a lock whose file still names a process (a SIGKILLed run never clears it) is taken over with a log
line; a live holder makes a second run refuse at once with one line naming its pid (``wait=True``
waits instead). Under torchrun only rank 0 holds the lock and swaps.

This module knows no stage file names (bertopt.artifacts passes the manifest's and the log's).
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

from .errors import PipelineError

log = logging.getLogger("bertopt.staging")

WORK_SUFFIX, OLD_SUFFIX, LOCK_SUFFIX = ".work", ".old", ".lock"
MARKER = ".fingerprint"  # in a working dir: the fingerprint of the run that made it
# what torch's zip writer says when a write fails (it hides the errno)
_TORCH_WRITE_FAILURES = ("No space left", "file write failed", "unexpected pos", "Disk quota exceeded")


class StageBusy(PipelineError):
    """Another live run holds the output's lock."""


class DiskFull(PipelineError):
    """The disk filled up (or would) while a stage wrote its output."""


def sibling(final: Path, suffix: str) -> Path:
    final = Path(final)
    return final.parent / f".{final.name}{suffix}"


def is_hidden(path: Path) -> bool:
    """Working dirs, old copies and locks are dot-names: whoever lists stage dirs skips them."""
    return Path(path).name.startswith(".")


# ----------------------------------------------------------------------------- disk space
def human(n: Optional[float]) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def free_bytes(directory: Path) -> Optional[int]:
    d = Path(directory).absolute()
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        return shutil.disk_usage(d).free
    except OSError:
        return None


def check_free(directory, need_bytes: Optional[int], what: str, keeps: Optional[Path] = None) -> None:
    """Refuse up front (DiskFull) when ``directory``'s file system has less than ``need_bytes`` free."""
    if not need_bytes:
        return
    free = free_bytes(Path(directory))
    if free is not None and free < need_bytes:
        raise DiskFull(_full_message(directory, what, need_bytes, free, keeps))


def _full_message(directory, what: str, need: Optional[int], free: Optional[int], keeps: Optional[Path]) -> str:
    kept = f"; the previous output {keeps} is untouched" if keeps and Path(keeps).exists() else ""
    return (f"no space left on the device of {directory} for {what} (the stage needs about {human(need)}, "
            f"{human(free)} free): free some space or choose another --output-dir/--reports-dir{kept}")


def is_disk_full(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_WRITE_FAILURES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _written_file(exc: BaseException) -> Optional[str]:
    while exc is not None:
        if isinstance(exc, OSError) and exc.filename:
            return str(exc.filename)
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def disk_errors(directory, what: str, need_bytes: Optional[int] = None, keeps: Optional[Path] = None):
    """Turn a disk-full failure inside the block into one DiskFull line (directory, file, size)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        name = _written_file(exc)
        raise DiskFull(_full_message(directory, f"{what} ({Path(name).name} was being written)" if name else what,
                                     need_bytes, free_bytes(Path(directory)), keeps)) from None


# ----------------------------------------------------------------------------- lock
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """An exclusive lock on one stage output (a sibling ``.NAME.lock`` file holding the owner)."""

    def __init__(self, final, what: str, wait: bool = False, path: Optional[Path] = None):
        self.final, self.what, self.wait = Path(final), what, wait
        self.path = Path(path) if path else sibling(self.final, LOCK_SUFFIX)
        self._fd: Optional[int] = None

    def _holder(self, fd: int) -> dict:
        try:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            return json.loads(text) if text else {}
        except (OSError, ValueError):
            return {"pid": "unknown"}

    def acquire(self) -> "OutputLock":
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise PipelineError(f"cannot write to output directory {self.path.parent}: {exc.strerror or exc}"
                                " (choose another --output-dir)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            who = f"pid {holder.get('pid')}" + (f" on {holder['host']}" if holder.get("host") else "")
            if not self.wait:
                os.close(fd)
                raise StageBusy(f"{self.final} is being written by another {self.what} run ({who}, started "
                                f"{holder.get('started', '?')}); let it finish, or pass --wait to queue behind it") from None
            log.info("%s is being written by %s: waiting for it (--wait)", self.final, who)
            fcntl.flock(fd, fcntl.LOCK_EX)
        stale = self._holder(fd)
        if stale.get("pid"):
            log.warning("taking over the lock %s of pid %s (started %s), which ended without releasing it%s",
                        self.path, stale.get("pid"), stale.get("started", "?"),
                        "" if not isinstance(stale.get("pid"), int) or not _alive(stale["pid"])
                        else " (that pid is in use again)")
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "stage": self.what,
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        import fcntl

        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # empty = released cleanly (a killed holder leaves its pid)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


@contextmanager
def locked(final, what: str, wait: bool = False):
    """Hold ``final``'s output lock for the block (a stage that does not swap a directory, e.g.
    the deploy, whose archive is replaced atomically on its own)."""
    lock = OutputLock(final, what, wait).acquire()
    try:
        yield lock
    finally:
        lock.release()


# ----------------------------------------------------------------------------- swap
def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False when unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def swap_dir(work: Path, final: Path) -> None:
    """Put ``work`` at ``final``; the previous ``final`` (if any) is deleted afterwards."""
    old = sibling(final, OLD_SUFFIX)
    _rmtree(old)
    if final.exists() and _exchange(work, final):
        os.rename(work, old)  # work now holds the previous output
    else:
        if final.exists():
            os.rename(final, old)
        os.rename(work, final)
    _rmtree(old)


def swap_files(work: Path, final: Path, owned: Iterable[str], last: str) -> None:
    """Move the files a stage owns from ``work`` into the shared ``final`` dir: its previous
    ``last`` (the manifest) goes first, the new one last; owned files the new run lacks are removed."""
    final.mkdir(parents=True, exist_ok=True)
    (final / last).unlink(missing_ok=True)
    for name in owned:
        if name != last and not (work / name).exists():
            _rmtree(final / name)
    for src in sorted(work.iterdir()):
        if src.name not in (last, MARKER):
            if src.is_dir():
                _rmtree(final / src.name)
            os.replace(src, final / src.name)
    if (work / last).exists():
        os.replace(work / last, final / last)
    _rmtree(work)


class Replacement:
    """One run's rebuild of ``final``: ``open()`` (lock, recover, working dir), ``commit()`` (swap),
    ``close()`` (release; says what a failed run left behind)."""

    def __init__(self, final, fp: str, what: str, *, wait: bool = False, owned: Optional[Iterable[str]] = None,
                 manifest: str = "manifest.json", carry: Iterable[str] = ()):
        self.final, self.fp, self.what = Path(final), fp, what
        self.owned = tuple(owned) if owned is not None else None
        self.manifest, self.carry = manifest, tuple(carry)
        self.need: Optional[int] = None  # roughly what the run writes (for the disk-full message)
        if self.owned is None:
            self.work = sibling(self.final, WORK_SUFFIX)
            self.lock = OutputLock(self.final, what, wait)
        else:  # a shared dir (reports/): the stage's working dir and lock live inside it
            self.work = self.final / f".{what}{WORK_SUFFIX}"
            self.lock = OutputLock(self.final, what, wait, path=self.final / f".{what}{LOCK_SUFFIX}")
        self.committed = False
        self.resumed = False

    def open(self, resumable: bool = False) -> Path:
        """Lock, restore a half-swapped previous output, and prepare the working directory: one
        left by an interrupted run with the same fingerprint is kept when ``resumable``, any other
        is discarded (with a log line)."""
        self.lock.acquire()
        try:
            self._recover()
            self._prepare(resumable)
        except BaseException:
            self.lock.release()
            raise
        return self.work

    def _recover(self) -> None:
        old = sibling(self.final, OLD_SUFFIX)
        if old.exists() and not self.final.exists() and self.owned is None:
            log.warning("restoring %s from %s (a run was killed while swapping it in)", self.final, old)
            os.rename(old, self.final)
        _rmtree(old)

    def _prepare(self, resumable: bool) -> None:
        if self.work.exists():
            try:
                made_by = (self.work / MARKER).read_text(encoding="utf-8").strip()
            except OSError:
                made_by = "unknown"
            if resumable and made_by == self.fp:
                log.info("resuming in %s, left by an interrupted run with the same configuration", self.work)
                self.resumed = True
                return
            log.warning("discarding %s, left by an interrupted %s run (fingerprint %s, now %s)%s", self.work,
                        self.what, made_by, self.fp, ": its checkpoints cannot resume this configuration"
                        if resumable else "")
            _rmtree(self.work)
        with disk_errors(self.work.parent, f"the {self.what} working directory", keeps=self.final):
            self.work.mkdir(parents=True)
            (self.work / MARKER).write_text(self.fp, encoding="utf-8")
            for name in self.carry:  # e.g. the stage log's history
                if (self.final / name).is_file():
                    shutil.copy2(self.final / name, self.work / name)

    def commit(self) -> Path:
        """Swap the finished working directory (manifest written) into place."""
        if self.committed:
            return self.final
        if not (self.work / self.manifest).is_file():  # pragma: no cover - programming error
            raise RuntimeError(f"{self.work} has no {self.manifest}; write it before commit()")
        (self.work / MARKER).unlink(missing_ok=True)
        if self.owned is None:
            swap_dir(self.work, self.final)
        else:
            swap_files(self.work, self.final, self.owned, self.manifest)
        self.committed = True
        return self.final

    def close(self, failed: bool = False) -> None:
        if failed and not self.committed and not self.resumed and self.work.is_dir() and not any(
                p.name not in (MARKER, *self.carry) for p in self.work.iterdir()):
            _rmtree(self.work)  # failed before writing anything (a config error): nothing to keep
        elif failed and not self.committed:
            prev = "the previous output " + str(self.final) + " is untouched" if (
                (self.final / self.manifest).is_file()) else f"{self.final} has no complete output yet"
            log.warning("%s run did not finish: %s; its partial files are in %s", self.what, prev, self.work)
        self.lock.release()
