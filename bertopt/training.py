"""The one fine-tuning loop. Precision is a parameter (fp32, fp16/bf16 autocast)."""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import BackendUnavailable, ConfigError

log = logging.getLogger("bertopt.training")


# ----------------------------------------------------------------------------- device / precision
def resolve_device(name: str = "auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"--device {name}: no CUDA device is available here (use --device cpu)")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendUnavailable(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        return dev
    return torch.device("cpu")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_native_bf16() -> tuple[bool, str]:
    """Whether this CPU has native bf16 math (AMX-BF16 or AVX512-BF16), with the evidence."""
    flags = cpu_flags()
    found = sorted(flags & {"amx_bf16", "avx512_bf16"})
    if found:
        return True, f"CPU has native bf16 math ({', '.join(found)})"
    return False, ("CPU has no native bf16 math (neither AMX-BF16 nor AVX512-BF16): bf16 autocast is "
                   "emulated there and runs 10-15x slower than fp32; pass --force to run it anyway")


@dataclass
class PrecisionPlan:
    name: str  # fp32 | fp16 | bf16
    device_type: str
    autocast_dtype: Optional[object] = None  # torch dtype, None = fp32
    grad_scaler: bool = False
    available: bool = True
    reason: str = ""

    def autocast(self):
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)


def resolve_precision(requested: str, device) -> PrecisionPlan:
    """Map fp32/amp/fp16/bf16 to what this device can do; ``available`` False says why not."""
    import torch

    dtype = device.type
    if requested == "fp32":
        return PrecisionPlan("fp32", dtype)
    if dtype == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        # native bf16 math starts at compute capability 8.0 (Ampere); torch.cuda.is_bf16_supported()
        # also says True on T4/V100, where bf16 is emulated and slower than fp32
        bf16_ok = major >= 8
        if requested == "bf16" and not bf16_ok:
            return PrecisionPlan("bf16", dtype, available=False,
                                 reason=f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
                                        "has no native bf16 math (needs 8.0+); use --precision fp16")
        if requested == "fp16" or (requested == "amp" and not bf16_ok):
            reason = "CUDA fp16 autocast with GradScaler"
            if major < 7:
                reason += " (no tensor cores before compute capability 7.0: expect little speed-up)"
            return PrecisionPlan("fp16", dtype, torch.float16, grad_scaler=True, reason=reason)
        return PrecisionPlan("bf16", dtype, torch.bfloat16, reason="CUDA bf16 autocast (no loss scaling needed)")
    # CPU
    if requested == "fp16":
        return PrecisionPlan("fp16", dtype, available=False,
                             reason="fp16 autocast training is CUDA-only; on CPU use --precision bf16")
    ok, why = cpu_native_bf16()
    return PrecisionPlan("bf16", dtype, torch.bfloat16, available=ok, reason=why)


# ----------------------------------------------------------------------------- memory
class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak_mb`` after exit."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        import psutil

        self.peak = psutil.Process().memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


# ----------------------------------------------------------------------------- loop
@dataclass
class TrainResult:
    metrics: dict
    history: list = field(default_factory=list)


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _to_device(batch: dict, device, non_blocking: bool) -> dict:
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items() if k not in ("labels", "index")}


def evaluate(model, loader, device, plan: Optional[PrecisionPlan] = None, desc: str = "eval",
             dist_ctx=None) -> dict:
    """Accuracy and mean loss over a loader; predictions returned in dataset order.

    With a multi-process ``dist_ctx`` (bertopt.distributed) the loader holds this rank's shard and
    the counts are all-reduced, so every rank returns the whole evaluation set's figures."""
    import torch

    from .logs import progress

    model.eval()
    preds, labels, index, losses = [], [], [], []
    ctx = plan.autocast if plan else contextlib.nullcontext
    with torch.inference_mode():
        for batch in progress(loader, desc=desc, unit="batch"):
            inputs = _to_device(batch, device, non_blocking=True)
            with ctx():
                logits = model(**inputs).logits.float()
            y = batch["labels"].to(device)
            losses.append(torch.nn.functional.cross_entropy(logits, y, reduction="sum").item())
            preds.append(logits.argmax(-1).cpu())
            labels.append(batch["labels"])
            index.append(batch["index"])
    if dist_ctx is not None and dist_ctx.enabled:
        from .distributed import gather_eval

        return gather_eval(dist_ctx, preds, labels, index, losses)
    preds, labels, index = (torch.cat(t).numpy() for t in (preds, labels, index))
    order = np.argsort(index)
    n = len(labels)
    return {"accuracy": float((preds == labels).mean()) if n else float("nan"),
            "loss": float(sum(losses) / max(n, 1)),
            "n": int(n), "predictions": preds[order].tolist()}


def train(model, train_loader, eval_loader, cfg, device, plan: PrecisionPlan,
          loss_fn=None, dist_ctx=None) -> TrainResult:
    """Fine-tune in place and leave the best epoch's weights loaded. ``cfg`` is a TrainConfig.

    ``loss_fn(logits, labels, inputs) -> scalar`` replaces the default cross-entropy (e.g. the
    distillation loss of prune.py --distill); ``inputs`` are the batch tensors on ``device``.

    ``dist_ctx`` (bertopt.distributed.DistContext) marks a torchrun job: ``model`` is then wrapped in
    DistributedDataParallel, ``train_loader`` yields this rank's batches, and logged losses, eval
    figures and throughput are combined over the ranks. None = single process (unchanged)."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from .distributed import maybe_inject_failure, mean_across, reduce_throughput, sync_context, unwrap
    from .logs import progress

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen (lower --freeze-layers)")
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                  fused=device.type == "cuda")
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type) if plan.grad_scaler else None
    non_blocking = device.type == "cuda"

    history, loss_curve, epochs = [], [], []
    best = {"accuracy": -1.0, "epoch": None, "state": None}
    step, skipped_steps, samples, window = 0, 0, 0, []
    train_time = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as rss:
        for epoch in range(cfg.epochs):
            model.train()
            if hasattr(train_loader.batch_sampler, "set_epoch"):
                train_loader.batch_sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            bar = progress(train_loader, desc=f"train epoch {epoch + 1}/{cfg.epochs}", unit="batch")
            for i, batch in enumerate(bar):
                stepping = (i + 1) % cfg.grad_accum_steps == 0 or i + 1 == len(train_loader)
                with sync_context(model, stepping):  # DDP: all-reduce gradients only when stepping
                    inputs = _to_device(batch, device, non_blocking)
                    y = batch["labels"].to(device, non_blocking=non_blocking)
                    with plan.autocast():
                        logits = model(**inputs).logits
                    if loss_fn is None:
                        loss = torch.nn.functional.cross_entropy(logits.float(), y)
                    else:
                        loss = loss_fn(logits.float(), y, inputs)
                    loss = loss / cfg.grad_accum_steps
                    if scaler is not None:
                        scaler.scale(loss).backward()
                    else:
                        loss.backward()
                window.append(loss.item() * cfg.grad_accum_steps)
                samples += len(y)
                if not stepping:
                    continue
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if scaler is not None:
                    scale = scaler.get_scale()
                    scaler.step(optimizer)
                    scaler.update()
                    if scaler.get_scale() < scale:
                        skipped_steps += 1  # inf/nan gradients: the step was skipped
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if dist_ctx is not None:
                    maybe_inject_failure(dist_ctx, step)
                if step % cfg.log_every == 0:
                    value = float(np.mean(window))
                    if dist_ctx is not None:
                        value = mean_across(dist_ctx, value)  # the loss over every rank's batches
                    loss_curve.append({"step": step, "loss": value})
                    bar.set_postfix(loss=f"{value:.4f}")
                    window = []
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_time = time.perf_counter() - t0
            train_time += epoch_time
            ev = evaluate(unwrap(model), eval_loader, device, plan, desc=f"eval epoch {epoch + 1}",
                          dist_ctx=dist_ctx)
            epochs.append({"epoch": epoch + 1, "train_time_s": round(epoch_time, 3),
                           "eval_accuracy": ev["accuracy"], "eval_loss": ev["loss"]})
            log.info("epoch %d/%d: %.1fs, eval accuracy %.4f, eval loss %.4f", epoch + 1, cfg.epochs,
                     epoch_time, ev["accuracy"], ev["loss"])
            if ev["accuracy"] > best["accuracy"]:
                best = {"accuracy": ev["accuracy"], "epoch": epoch + 1,
                        "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
    if window:
        value = float(np.mean(window))
        if dist_ctx is not None:
            value = mean_across(dist_ctx, value)
        loss_curve.append({"step": step, "loss": value})
    if dist_ctx is not None:
        samples, train_time = reduce_throughput(dist_ctx, samples, train_time)
    final_accuracy = epochs[-1]["eval_accuracy"]
    if best["state"] is not None and best["epoch"] != cfg.epochs:
        model.load_state_dict(best["state"])
    metrics = {
        "precision": plan.name,
        "device": str(device),
        "train_time_s": round(train_time, 3),
        "train_samples": samples,
        "samples_per_s": round(samples / train_time, 2) if train_time else None,
        "optimizer_steps": step,
        "skipped_steps": skipped_steps,
        "peak_memory_mb": round(rss.peak_mb, 1),
        "peak_memory_kind": "process RSS",
        "final_eval_accuracy": final_accuracy,
        "best_eval_accuracy": best["accuracy"],
        "best_epoch": best["epoch"],
        "epochs": epochs,
        "loss_curve": loss_curve,
    }
    if device.type == "cuda":
        metrics["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        metrics["peak_memory_kind"] = "CUDA max allocated"
        metrics["peak_rss_mb"] = round(rss.peak_mb, 1)
    return TrainResult(metrics=metrics, history=epochs)
