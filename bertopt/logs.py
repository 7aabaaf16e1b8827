"""Logging (`[time][stage][LEVEL] message`, mirrored into <stage dir>/stage.log) and progress bars."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

_FORMAT = "[%(asctime)s][%(stage)s][%(levelname)s] %(message)s"
_DATEFMT = "%H:%M:%S"
_state = {"quiet": False, "stage": "bertopt"}


class _StageFilter(logging.Filter):
    def filter(self, record):
        record.stage = _state["stage"]
        return True


def configure(quiet: bool = False) -> None:
    """Configure the 'bertopt' logger once per process (idempotent)."""
    _state["quiet"] = quiet
    root = logging.getLogger("bertopt")
    root.setLevel(logging.INFO)
    root.propagate = False
    if not any(getattr(h, "_bertopt_console", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._bertopt_console = True
        handler.addFilter(_StageFilter())
        handler.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
        root.addHandler(handler)
    for h in root.handlers:
        if getattr(h, "_bertopt_console", False):
            h.setLevel(logging.WARNING if quiet else logging.INFO)
    # third-party chatter that hides our own lines
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


@contextlib.contextmanager
def stage_logging(stage: str, directory: str | os.PathLike | None):
    """Tag log lines with ``stage`` and append them to ``directory/stage.log``."""
    previous = _state["stage"]
    _state["stage"] = stage
    root = logging.getLogger("bertopt")
    handler = None
    if directory is not None:
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(Path(directory) / "stage.log", encoding="utf-8")
        except OSError:
            handler = None  # the stage itself reports an unwritable directory
        if handler is not None:
            handler.addFilter(_StageFilter())
            handler.setFormatter(logging.Formatter(_FORMAT, "%Y-%m-%d %H:%M:%S"))
            root.addHandler(handler)
    try:
        yield
    finally:
        _state["stage"] = previous
        if handler is not None:
            root.removeHandler(handler)
            handler.close()


class _LogProgress:
    """Progress for non-terminal runs (CI, nohup): a log line every 10% and at most every 60 s."""

    def __init__(self, iterable=None, desc="", total=None, unit="it", **_):
        import time

        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix, self._clock = 0, "", time.monotonic
        self._start = self._last = self._clock()
        self._next_pct = 10

    silent = False

    def _maybe_log(self):
        if self.silent:
            return
        now = self._clock()
        pct = 100 * self.n / self.total if self.total else None
        if (pct is not None and pct >= self._next_pct) or now - self._last >= 60:
            rate = self.n / max(now - self._start, 1e-9)
            where = f"{self.n}/{self.total} ({pct:.0f}%)" if pct is not None else f"{self.n}"
            logging.getLogger("bertopt.progress").info("%s: %s %s, %.1f %s/s%s", self.desc, where, self.unit,
                                                       rate, self.unit, f", {self.postfix}" if self.postfix else "")
            self._last = now
            while pct is not None and self._next_pct <= pct:
                self._next_pct += 10

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n=1):
        self.n += n
        self._maybe_log()

    def set_postfix(self, **kw):
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def set_postfix_str(self, text="", refresh=True):
        self.postfix = str(text)

    def refresh(self):
        self._maybe_log()

    def set_description(self, desc):
        self.desc = desc

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def progress(iterable=None, **kwargs):
    """A tqdm bar on a terminal; periodic log lines otherwise; nothing with --quiet."""
    from tqdm.auto import tqdm

    if _state["quiet"] or not sys.stderr.isatty():
        bar = _LogProgress(iterable, **kwargs)
        bar.silent = _state["quiet"]
        return bar
    return tqdm(iterable, dynamic_ncols=True, leave=False, **kwargs)

