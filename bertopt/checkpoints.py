"""Training checkpoints: everything a killed fine-tune needs to continue exactly where it stopped.

A checkpoint is a directory ``<stage dir>/checkpoints/step-NNNNNNNN/`` holding ``state.pt``: model,
optimizer, LR scheduler and GradScaler states, the RNG states of every rank, the loop position
(epoch and batches consumed of the length-grouped sampler's epoch order) and the curves recorded so
far. It is written into a hidden temp directory and renamed into place, so a directory named
``step-*`` is always complete; a kill mid-write leaves only a ``.tmp-*`` that the next save removes.
The best weights by the eval metric live beside them in ``best-step-NNNNNNNN.pt`` (named by step, so
a checkpoint always names the best file that belongs to it); only the last K checkpoints and the
best files they name are kept.

Under torchrun every rank calls :meth:`Checkpointer.save` (the RNG states are gathered), rank 0
alone writes; on resume rank 0 chooses the checkpoint and every rank loads it from disk.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import ConfigError

log = logging.getLogger("bertopt.checkpoints")

DIRNAME = "checkpoints"
STATE = "state.pt"
META = "meta.json"
PREFIX = "step-"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Python, NumPy and torch (CPU + every CUDA device) generator states, torch.load-safe."""
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(obj):
    """random.setstate needs tuples back where torch.load may hand out lists."""
    return tuple(_tuples(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


# ----------------------------------------------------------------------------- files
def root(stage_dir) -> Path:
    return Path(stage_dir) / DIRNAME


def _step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def complete(directory) -> list[Path]:
    """Finished checkpoints under ``directory`` (a stage dir's checkpoints/), oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / STATE).is_file() and (p / META).is_file()]
    return sorted(found, key=_step_of)


def load(path) -> dict:
    import torch

    return torch.load(Path(path) / STATE, map_location="cpu", weights_only=True)


def meta(path) -> dict:
    """The small JSON beside a checkpoint's state: fingerprint, step, best file."""
    return json.loads((Path(path) / META).read_text(encoding="utf-8"))


def find_resumable(stage_dir, fingerprint: str, required: bool) -> Optional[Path]:
    """The newest checkpoint written with ``fingerprint``; None to start afresh. ``required``
    (``--resume``) turns "nothing to resume" into a ConfigError that says why."""
    found = complete(root(stage_dir))
    if not found:
        if required:
            raise ConfigError(f"--resume: no checkpoint in {root(stage_dir)} (drop --resume to start afresh)")
        return None
    newest = found[-1]
    try:
        info = meta(newest)
    except (OSError, ValueError) as exc:  # unreadable: treat like a mismatch
        info = {"fingerprint": f"unreadable ({type(exc).__name__})"}
    if info.get("fingerprint") != fingerprint:
        msg = (f"checkpoint {newest} was written with another configuration (fingerprint "
               f"{info.get('fingerprint')}, now {fingerprint})")
        if required:
            raise ConfigError(f"--resume: {msg}; use the same flags as the interrupted run, or drop --resume")
        log.warning("%s: starting afresh", msg)
        return None
    return newest


@dataclass
class Checkpointer:
    """Writes checkpoints of one training run into ``directory`` (the stage's checkpoints/)."""

    directory: Path
    fingerprint: str
    keep: int = 2
    dist_ctx: object = None  # bertopt.distributed.DistContext or None

    def _is_main(self) -> bool:
        return self.dist_ctx is None or self.dist_ctx.is_main

    def save(self, step: int, payload: dict, rank_state: dict, best_state: Optional[dict],
             best_step: Optional[int]) -> None:
        """Collective under torchrun: every rank's ``rank_state`` and RNG states are gathered
        (``payload["ranks"][r]``); rank 0 writes."""
        from . import distributed

        ctx = self.dist_ctx or distributed.SINGLE
        mine = dict(rank_state, rng=rng_state())
        # tensors travel as torch.save bytes: pickled tensors do not survive gloo's object gather
        blobs = distributed.all_gather_object(ctx, _to_bytes(mine)) if ctx.enabled else None
        if not self._is_main():
            return
        import torch

        ranks = [mine] if blobs is None else [torch.load(io.BytesIO(b), weights_only=True) for b in blobs]

        self.directory.mkdir(parents=True, exist_ok=True)
        best_name = f"best-{PREFIX}{best_step:08d}.pt" if best_step is not None else None
        if best_name and best_state is not None and not (self.directory / best_name).is_file():
            _atomic_torch_save(best_state, self.directory / best_name)
        info = {"fingerprint": self.fingerprint, "step": step, "best_file": best_name, "format": FORMAT_VERSION}
        tmp = self.directory / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _atomic_torch_save(dict(payload, ranks=ranks), tmp / STATE)
        (tmp / META).write_text(json.dumps(info), encoding="utf-8")
        final = self.directory / f"{PREFIX}{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        log.info("checkpoint: step %d -> %s", step, final)
        self._prune()

    def _prune(self) -> None:
        found = complete(self.directory)
        for old in found[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        named = {meta(kept).get("best_file") for kept in found[-self.keep:]}
        for p in self.directory.iterdir():
            stale_tmp = p.name.startswith(".tmp-")
            if (p.name.startswith("best-") and p.name not in named) or stale_tmp:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _to_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_best(directory, info: dict) -> Optional[dict]:
    import torch

    name = info.get("best_file")
    if not name:
        return None
    return torch.load(Path(directory) / name, map_location="cpu", weights_only=True)
