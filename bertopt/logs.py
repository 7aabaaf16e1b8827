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


def progress(iterable=None, **kwargs):
    """A tqdm bar; silent when --quiet or when stderr is not a terminal."""
    from tqdm.auto import tqdm

    disable = _state["quiet"] or not sys.stderr.isatty()
    return tqdm(iterable, disable=disable, dynamic_ncols=True, leave=False, **kwargs)


def is_quiet() -> bool:
    return _state["quiet"]
