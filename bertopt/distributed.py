"""Data-parallel fine-tuning across processes with PyTorch's own engine (torchrun + DDP).

``torchrun --nproc-per-node N benchmark.py ...`` starts N copies of a stage script and gives
each one ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. This module
turns that environment into a process group (NCCL on CUDA, gloo on CPU), wraps the model in
``DistributedDataParallel``, shards evaluation and all-reduces its counts, and makes sure a failing
rank ends the whole job (collective timeout + clean errors; torchrun stops the other ranks).

Without those variables (a plain ``python benchmark.py``) :func:`setup` returns :data:`SINGLE` and
nothing here is used: single-process runs behave exactly as before.

Environment knobs (not flags, so single-process configs and fingerprints stay unchanged):
  ``BERTOPT_DIST_TIMEOUT``  seconds a collective may wait for the other ranks (default 600); a rank
                            that waits longer raises, exits 1, and torchrun stops the rest.
  ``BERTOPT_FAIL_RANK``     test hook: that rank fails right after its first optimizer step
                            (``BERTOPT_FAIL_MODE`` = ``raise`` (default) or ``hang``).
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .errors import BackendUnavailable, ConfigError, PipelineError
from .errors import first_line as _first_line

log = logging.getLogger("bertopt.distributed")

ENV_TIMEOUT = "BERTOPT_DIST_TIMEOUT"
ENV_FAIL_RANK = "BERTOPT_FAIL_RANK"
ENV_FAIL_MODE = "BERTOPT_FAIL_MODE"
DEFAULT_TIMEOUT_S = 600.0

_state = {"initialized_here": False, "failed": False, "atexit": False}


class DistributedError(PipelineError):
    """A collective failed: another rank died or stopped answering within the timeout."""


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job. ``world_size == 1`` means a plain single-process run."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: Optional[str] = None  # nccl | gloo | None (single process)
    device: Any = None  # torch.device of this rank (None for single process: resolved as before)
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if not self.enabled:
            return "single process"
        return f"rank {self.rank}/{self.world_size} (local rank {self.local_rank}), backend {self.backend}"


SINGLE = DistContext()


# ----------------------------------------------------------------------------- environment
def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer "
                          "(it is set by torchrun; launch with torchrun or unset it)") from None


def env_world() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from the torchrun environment; (1, 0, 0) without it."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not (0 <= rank < world) or local < 0:
        raise ConfigError(f"inconsistent torchrun environment: WORLD_SIZE={world}, RANK={rank}, "
                          f"LOCAL_RANK={local}")
    return world, rank, local


def timeout_seconds() -> float:
    raw = os.environ.get(ENV_TIMEOUT)
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{ENV_TIMEOUT}={raw!r} must be a positive number of seconds")
    return value


def launched() -> bool:
    """True inside a multi-process torchrun job."""
    return env_world()[0] > 1


# ----------------------------------------------------------------------------- set-up / teardown
def _pick_device(device_name: str, local_rank: int):
    """The device of this rank: ``cuda:LOCAL_RANK`` on CUDA, else the CPU."""
    import torch

    if device_name.startswith("cuda:"):
        raise ConfigError(f"--device {device_name} cannot be combined with torchrun: each rank uses "
                          "cuda:LOCAL_RANK; pass --device cuda (pick GPUs with CUDA_VISIBLE_DEVICES)")
    if device_name == "cpu" or (device_name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"--device {device_name}: no CUDA device is available here (use --device cpu)")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise BackendUnavailable(f"local rank {local_rank} has no GPU: this node has {count} CUDA device(s); "
                                 f"use --nproc-per-node {count} or fewer")
    return torch.device("cuda", local_rank)


def setup(device_name: str = "auto") -> DistContext:
    """Join the torchrun job (idempotent: later stages in the same process reuse the group).

    Returns :data:`SINGLE` outside torchrun, without touching torch.distributed."""
    world, rank, local = env_world()
    if world == 1:
        return SINGLE
    import torch
    import torch.distributed as dist

    timeout = timeout_seconds()
    device = _pick_device(device_name, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        current = dist.get_backend()
        if current != backend:
            raise ConfigError(f"this process already joined a {current} process group; a stage asked for "
                              f"--device {device_name} ({backend}); use the same --device for every stage")
        return DistContext(world, rank, local, backend, device, timeout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout),
                                device_id=device if device.type == "cuda" else None)
    except (RuntimeError, ValueError) as exc:  # rendezvous / store errors (DistError is a RuntimeError)
        raise DistributedError(f"rank {rank}: cannot join the torchrun job ({_first_line(exc)}); check "
                               "--rdzv-endpoint / --master-addr and that every node can reach it") from None
    _state["initialized_here"] = True
    if not _state["atexit"]:
        atexit.register(teardown)
        _state["atexit"] = True
    if dist.get_world_size() != world:  # pragma: no cover - torchrun guarantees this
        raise DistributedError(f"process group has {dist.get_world_size()} ranks, WORLD_SIZE says {world}")
    ctx = DistContext(world, rank, local, backend, device, timeout)
    if rank != 0:
        from . import logs

        logs.configure(quiet=True)  # one rank speaks: no duplicated info lines or progress bars
    log.info("distributed: %d processes, backend %s, collective timeout %.0fs (%s)", world, backend, timeout,
             ENV_TIMEOUT)
    return ctx


def teardown() -> None:
    """Destroy the process group this module created (registered with atexit). Skipped after a
    failure: the other ranks may be gone and tearing down could wait on them."""
    import torch.distributed as dist

    if _state["initialized_here"] and not _state["failed"] and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _state["initialized_here"] = False


# ----------------------------------------------------------------------------- failures
def _is_collective_error(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(k in text for k in ("gloo", "NCCL", "ProcessGroup", "Timed out"))


@contextlib.contextmanager
def guard(ctx: DistContext):
    """Around every rank's distributed work: a collective that fails because another rank died or
    timed out becomes one clear ``error:`` line (exit 1); any other error keeps its traceback.
    Either way this rank exits non-zero and torchrun stops the other ranks."""
    if not ctx.enabled:
        yield
        return
    try:
        yield
    except PipelineError:
        _state["failed"] = True
        raise
    except Exception as exc:
        _state["failed"] = True
        if _is_collective_error(exc):
            if "timed out" in str(exc).lower():
                msg = (f"rank {ctx.rank}: timed out waiting for the other ranks after {ctx.timeout_s:.0f}s "
                       f"({_first_line(exc)}); another rank is stuck or failed ({ENV_TIMEOUT} sets the timeout)")
            else:
                msg = (f"rank {ctx.rank}: lost contact with the other ranks ({_first_line(exc)}); "
                       "another rank failed: see its error above")
            raise DistributedError(msg) from None
        log.error("rank %d failed: %s: %s", ctx.rank, type(exc).__name__, _first_line(exc))
        raise
    except BaseException:  # KeyboardInterrupt / SystemExit (torchrun forwards Ctrl-C to every rank)
        _state["failed"] = True
        raise


def maybe_inject_failure(ctx: DistContext, step: int) -> None:
    """Test hook: ``BERTOPT_FAIL_RANK=R`` makes rank R fail after its first optimizer step."""
    target = os.environ.get(ENV_FAIL_RANK)
    if not ctx.enabled or target is None or target.strip() != str(ctx.rank) or step != 1:
        return
    mode = os.environ.get(ENV_FAIL_MODE, "raise")
    if mode == "hang":
        log.warning("rank %d: %s=%s, %s=hang: stopping to answer", ctx.rank, ENV_FAIL_RANK, target, ENV_FAIL_MODE)
        time.sleep(10 * ctx.timeout_s + 60)
    raise RuntimeError(f"injected failure on rank {ctx.rank} ({ENV_FAIL_RANK}={target})")


# ----------------------------------------------------------------------------- collectives
def _tensor(ctx: DistContext, values: Sequence[float]):
    import torch

    return torch.tensor(list(values), dtype=torch.float64, device=ctx.device)


def all_reduce(ctx: DistContext, values: Sequence[float], op: str = "sum") -> list[float]:
    """Element-wise sum / max / min of a few numbers across ranks (identity for one process)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = _tensor(ctx, values)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.cpu().tolist()


def mean_across(ctx: DistContext, value: float) -> float:
    """Mean of one number over the ranks (every rank passes the same-sized quantity)."""
    if not ctx.enabled:
        return float(value)
    return all_reduce(ctx, [value])[0] / ctx.world_size


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def broadcast_object(ctx: DistContext, obj):
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=ctx.device)
    return box[0]


def all_gather_object(ctx: DistContext, obj) -> list:
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def refuse_under_torchrun(what: str) -> None:
    """For stages that are not data-parallel: under torchrun every rank would run them and write
    the same files, so stop with a clear message instead."""
    if launched():
        raise ConfigError(f"{what} does not run under torchrun (only benchmark.py and mixed_precision.py "
                          f"train data-parallel); run it as a single process: python {what}")


# ----------------------------------------------------------------------------- model
def wrap_model(model, ctx: DistContext):
    """``DistributedDataParallel`` around a model already on ``ctx.device``; the model itself when
    single-process. Buffers are not re-broadcast on every forward (BERT's buffers are constants)."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    import inspect

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # newer torch renames broadcast_buffers to forward_sync_buffers (buffers are still synced at init)
    no_resync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                 else "broadcast_buffers")
    return DDP(model, device_ids=ids, output_device=ctx.device.index if ids else None, **{no_resync: False})


def unwrap(model):
    """The plain model inside a DDP wrapper (evaluation and saving use it)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


def sync_context(model, stepping: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (``model.no_sync()``); the step that
    updates the weights all-reduces the accumulated gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP) and not stepping:
        return model.no_sync()
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- sharded evaluation
class ShardedEvalBatchSampler:
    """Evaluation batches (the same length-sorted batches one process would use) dealt round-robin
    to the ranks. Unlike training, nothing is dropped: every row is evaluated by exactly one rank,
    so a rank may get one batch fewer (evaluation has no collective per batch, so that is safe)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, num_replicas: int, rank: int):
        from .data import LengthGroupedBatchSampler

        self.inner = LengthGroupedBatchSampler(lengths, batch_size, shuffle=False)
        self.num_replicas = num_replicas
        self.rank = rank
        self.n_batches = math.ceil(len(lengths) / batch_size)

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i % self.num_replicas == self.rank:
                yield batch

    def __len__(self) -> int:
        return len(range(self.rank, self.n_batches, self.num_replicas))


def make_eval_loader(ds, batch_size: int, ctx: DistContext, *, pad_id: int, with_token_type_ids: bool,
                     num_workers: int = 0, pin_memory: bool = False):
    """This rank's share of the evaluation set (see :class:`ShardedEvalBatchSampler`)."""
    from torch.utils.data import DataLoader

    from .data import Collator

    sampler = ShardedEvalBatchSampler(ds.lengths, batch_size, ctx.world_size, ctx.rank)
    return DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(pad_id, with_token_type_ids),
                      num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)


def gather_eval(ctx: DistContext, preds: list, labels: list, index: list, losses: list[float]) -> dict:
    """Combine every rank's evaluation shard: counts and loss sums are all-reduced, predictions
    gathered back into dataset order. Same keys as :func:`bertopt.training.evaluate`."""
    import torch

    def cat(parts):
        return torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.int64)

    preds, labels, index = cat(preds), cat(labels), cat(index)
    correct, loss_sum, n = all_reduce(ctx, [float((preds == labels).sum()), float(sum(losses)), float(len(labels))])
    shards = all_gather_object(ctx, (index.tolist(), preds.tolist()))
    all_index = np.array([i for idx, _ in shards for i in idx], dtype=np.int64)
    all_preds = np.array([p for _, pr in shards for p in pr], dtype=np.int64)
    order = np.argsort(all_index)
    n = int(round(n))
    return {"accuracy": float(correct / n) if n else float("nan"),
            "loss": float(loss_sum / max(n, 1)),
            "n": n, "predictions": all_preds[order].tolist()}


def reduce_throughput(ctx: DistContext, samples: int, train_time: float) -> tuple[int, float]:
    """Job-wide training samples (sum over ranks) and training time (the slowest rank)."""
    if not ctx.enabled:
        return samples, train_time
    total, = all_reduce(ctx, [samples])
    slowest, = all_reduce(ctx, [train_time], op="max")
    return int(round(total)), slowest


def run_summary(ctx: DistContext, batch_size: int, grad_accum_steps: int) -> dict:
    """What the manifest records about data parallelism."""
    return {"world_size": ctx.world_size, "distributed_backend": ctx.backend,
            "per_device_batch_size": batch_size, "grad_accum_steps": grad_accum_steps,
            "global_batch_size": batch_size * grad_accum_steps * ctx.world_size}
