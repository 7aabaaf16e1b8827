"""The one fine-tuning loop. Precision is a parameter (fp32, fp16/bf16 autocast)."""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import ConfigError
from .precision import PrecisionPlan, resolve_device, resolve_precision  # noqa: F401 (the loop's API)

log = logging.getLogger("bertopt.training")


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
             dist_ctx=None, spec=None) -> dict:
    """Accuracy and mean loss over a loader; predictions returned in dataset order.

    A ``spec`` (bertopt.tasks.TaskSpec) that is not plain accuracy-scored classification, or chunked
    long texts, go to :func:`evaluate_task` (single process).
    With a multi-process ``dist_ctx`` (bertopt.distributed) the loader holds this rank's shard and
    the counts are all-reduced, so every rank returns the whole evaluation set's figures."""
    import torch

    from .logs import progress

    if spec is not None and (not spec.plain or getattr(loader.dataset, "owners", None) is not None):
        from .metrics import evaluate_task

        return evaluate_task(model, loader, device, spec, plan, desc)
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


# ----------------------------------------------------------------------------- optimizer
# "fused": one multi-threaded kernel over all tensors (CPU and CUDA); "for-loop" (torch's CPU
# default: one op per tensor and update term) is what tools/train_speed.py compares it with.
OPTIMIZER_IMPL = "fused"


def build_optimizer(model, cfg, device, impl: Optional[str] = None):
    """AdamW with weight decay on matrices only (no decay on biases and LayerNorm)."""
    import torch

    impl = impl or OPTIMIZER_IMPL
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("nothing to train: every parameter is frozen (lower --freeze-layers)")
    groups = [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(groups, lr=cfg.lr, **kwargs)


# ----------------------------------------------------------------------------- loop
@dataclass
class LoopState:
    """Where the loop is and what it has recorded: saved in every checkpoint, restored on resume."""

    epoch: int = 0            # the epoch in progress (0-based)
    batch: int = 0            # batches of that epoch already consumed (the sampler's position)
    step: int = 0             # optimizer steps done
    samples: int = 0
    train_time: float = 0.0   # seconds of training (evaluation and checkpoints excluded)
    epoch_start_time: float = 0.0
    skipped_steps: int = 0
    window: list = field(default_factory=list)  # losses since the last loss-curve point
    loss_curve: list = field(default_factory=list)
    eval_curve: list = field(default_factory=list)
    epochs: list = field(default_factory=list)
    best_accuracy: float = -1.0
    best_score: float = -math.inf  # the task metric (spec.metric) of the best evaluation
    best_eval: Optional[dict] = None  # its task metrics (predictions left out); None on the plain path
    best_step: Optional[int] = None
    best_epoch: Optional[int] = None
    bad_evals: int = 0
    stopped_early: bool = False
    resumed_from: list = field(default_factory=list)

    RANK_FIELDS = ("window", "samples", "train_time")  # differ per rank under torchrun


class _Run:
    """One training run's objects and the steps of the loop (see :func:`train`)."""

    def __init__(self, model, cfg, device, plan, loss_fn, dist_ctx, checkpointer, n_batches, tb, spec=None):
        import torch
        from transformers import get_linear_schedule_with_warmup

        self.model, self.cfg, self.device, self.plan, self.loss_fn = model, cfg, device, plan, loss_fn
        self.dist_ctx, self.checkpointer, self.n_batches, self.tb = dist_ctx, checkpointer, n_batches, tb
        self.spec, self.metric = spec, spec.metric if spec is not None else "accuracy"
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, cfg, device)
        total_steps = max(1, math.ceil(n_batches / cfg.grad_accum_steps) * cfg.epochs)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(cfg.warmup_ratio * total_steps),
                                                         total_steps)
        self.scaler = torch.amp.GradScaler(device.type) if plan.grad_scaler else None
        self.non_blocking = device.type == "cuda"
        self.state, self.best_state, self.pending_rng, self.pending_losses = LoopState(), None, None, []
        self.seg_start = time.perf_counter()

    # -- one micro-batch and one optimizer step
    def micro_step(self, batch, stepping: bool) -> None:
        import torch

        from .distributed import sync_context
        cfg, nb = self.cfg, self.non_blocking
        with sync_context(self.model, stepping):  # DDP: all-reduce gradients only when stepping
            inputs = _to_device(batch, self.device, nb)
            y = batch["labels"].to(self.device, non_blocking=nb)
            with self.plan.autocast():
                logits = self.model(**inputs).logits
            if self.loss_fn is None:
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
            else:
                loss = self.loss_fn(logits.float(), y, inputs)
            loss = loss / cfg.grad_accum_steps
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self.pending_losses.append(loss.detach())  # read at log/checkpoint time: no host sync per step
        self.state.samples += len(y)

    def flush_losses(self) -> None:
        """Move the pending per-micro-batch losses (device tensors) into the loss window, as floats."""
        if self.pending_losses:
            import torch

            g = self.cfg.grad_accum_steps
            self.state.window.extend(v * g for v in torch.stack(self.pending_losses).tolist())
            self.pending_losses = []

    def optimizer_step(self) -> None:
        import torch

        from .distributed import maybe_inject_failure
        st, scaler = self.state, self.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.step(self.optimizer)
            scaler.update()
            if scaler.get_scale() < scale:
                st.skipped_steps += 1  # inf/nan gradients: the step was skipped
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.step += 1
        if self.dist_ctx is not None:
            maybe_inject_failure(self.dist_ctx, st.step)
        if st.step % self.cfg.log_every == 0:
            self.log_loss()

    def log_loss(self) -> Optional[float]:
        from .distributed import mean_across

        st = self.state
        self.flush_losses()
        if not st.window:
            return None
        value = float(np.mean(st.window))
        if self.dist_ctx is not None:
            value = mean_across(self.dist_ctx, value)  # the loss over every rank's batches
        st.loss_curve.append({"step": st.step, "loss": value})
        st.window = []
        live = st.train_time + time.perf_counter() - self.seg_start
        world = self.dist_ctx.world_size if self.dist_ctx is not None else 1
        self.tb.scalars(st.step, {"train/loss": value, "train/lr": self.scheduler.get_last_lr()[0],
                                  "train/samples_per_s": st.samples * world / live if live > 0 else 0.0})
        return value

    # -- the clock counts training only
    def pause(self) -> None:
        if self.device.type == "cuda":
            import torch
            torch.cuda.synchronize(self.device)
        self.state.train_time += time.perf_counter() - self.seg_start

    def go_on(self) -> None:
        self.model.train()
        self.seg_start = time.perf_counter()

    # -- one epoch (from the sampler position a resumed run starts at)
    def train_epoch(self, loader, eval_loader, epoch: int) -> bool:
        """Train one epoch; True when early stopping ended the run."""
        from .logs import progress

        st, cfg = self.state, self.cfg
        start = st.batch
        sampler = loader.batch_sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch, start=start)
        if start == 0:
            st.epoch_start_time = st.train_time
        self._restore_rng(before_iter=True)
        iterator = iter(loader)  # creating it draws from torch's RNG (the loader's base seed)
        self._restore_rng(before_iter=False)
        bar = progress(iterator, desc=f"train epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                       total=self.n_batches, initial=start)
        self.go_on()
        for i, batch in enumerate(bar, start=start):
            last = i + 1 == self.n_batches
            stepping = (i + 1) % cfg.grad_accum_steps == 0 or last
            self.micro_step(batch, stepping)
            if not stepping:
                continue
            self.optimizer_step()
            st.batch = i + 1
            due_eval = bool(cfg.eval_every) and st.step % cfg.eval_every == 0 and not last
            due_save = (self.checkpointer is not None and bool(cfg.save_every) and st.step % cfg.save_every == 0
                        and not last)
            if due_eval or due_save:
                self.pause()
                stop = self.evaluate_now(eval_loader, epoch) if due_eval else False
                if due_save or stop:
                    self.save()
                if stop:
                    return True
                self.go_on()
        self.pause()
        st.epoch, st.batch = epoch + 1, 0
        stop = self.evaluate_now(eval_loader, epoch, epoch_time=st.train_time - st.epoch_start_time)
        self.save()
        return stop

    def evaluate_now(self, eval_loader, epoch: int, epoch_time: Optional[float] = None) -> bool:
        """Evaluate, keep the best weights (by the task metric), count evaluations without
        improvement; True = stop."""
        from .distributed import unwrap

        st, cfg, metric = self.state, self.cfg, self.metric
        ev = evaluate(unwrap(self.model), eval_loader, self.device, self.plan, desc=f"eval step {st.step}",
                      dist_ctx=self.dist_ctx, spec=self.spec)
        score = ev.get("metric", ev["accuracy"])
        point = {"eval_accuracy": ev["accuracy"], "eval_loss": ev["loss"]}
        if "metric" in ev:
            point["eval_" + metric] = score
        st.eval_curve.append({"step": st.step, "epoch": epoch + 1, "end_of_epoch": epoch_time is not None, **point})
        self.tb.scalars(st.step, {"eval/" + k[5:]: v for k, v in point.items() if v is not None})
        if epoch_time is not None:
            st.epochs.append({"epoch": epoch + 1, "train_time_s": round(epoch_time, 3), **point})
            log.info("epoch %d/%d: %.1fs, eval %s %.4f, eval loss %.4f", epoch + 1, cfg.epochs,
                     epoch_time, metric, score, ev["loss"])
        else:
            log.info("step %d: eval %s %.4f, eval loss %.4f", st.step, metric, score, ev["loss"])
        if score > st.best_score:
            st.best_score, st.best_accuracy = score, ev["accuracy"]
            st.best_step, st.best_epoch, st.bad_evals = st.step, epoch + 1, 0
            if "metric" in ev:
                st.best_eval = {k: v for k, v in ev.items() if k not in ("predictions", "metric")}
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(self.model).state_dict().items()}
        else:
            st.bad_evals += 1
        if cfg.early_stopping_patience and st.bad_evals >= cfg.early_stopping_patience:
            st.stopped_early = True
            log.info("early stopping at step %d: %d evaluation(s) without improvement (best %s %.4f at step %d)",
                     st.step, st.bad_evals, metric, st.best_score, st.best_step)
        return st.stopped_early

    # -- checkpoints
    def save(self) -> None:
        if self.checkpointer is None:
            return
        import dataclasses

        from .distributed import unwrap
        st = self.state
        self.flush_losses()
        loop = {k: v for k, v in dataclasses.asdict(st).items() if k not in LoopState.RANK_FIELDS}
        payload = {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                   "scheduler": self.scheduler.state_dict(),
                   "scaler": self.scaler.state_dict() if self.scaler is not None else None, "loop": loop}
        rank_state = {k: getattr(st, k) for k in LoopState.RANK_FIELDS}
        self.checkpointer.save(st.step, payload, rank_state, self.best_state, st.best_step)
        self.seg_start = time.perf_counter()

    def resume(self, path) -> None:
        from . import checkpoints
        from .distributed import unwrap

        path = Path(path)
        payload, info = checkpoints.load(path), checkpoints.meta(path)
        unwrap(self.model).load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler is not None and payload["scaler"] is not None:
            self.scaler.load_state_dict(payload["scaler"])
        rank = self.dist_ctx.rank if self.dist_ctx is not None else 0
        mine = payload["ranks"][rank]
        self.state = LoopState(**payload["loop"], **{k: mine[k] for k in LoopState.RANK_FIELDS})
        self.pending_rng = mine["rng"]
        self.best_state = checkpoints.load_best(path.parent, info)
        st = self.state
        st.resumed_from.append({"checkpoint": path.name, "step": st.step, "epoch": st.epoch + 1,
                                "batches_done_in_epoch": st.batch})
        log.info("resuming from %s: step %d, epoch %d, %d batch(es) of it done", path, st.step, st.epoch + 1,
                 st.batch)

    def _restore_rng(self, before_iter: bool) -> None:
        """A mid-epoch checkpoint holds the RNG after that epoch's loader iterator was created; an
        epoch-end checkpoint the RNG before the next one is."""
        if self.pending_rng is not None and before_iter == (self.state.batch == 0):
            from . import checkpoints

            checkpoints.set_rng_state(self.pending_rng)
            self.pending_rng = None


def train(model, train_loader, eval_loader, cfg, device, plan: PrecisionPlan, loss_fn=None, dist_ctx=None,
          checkpointer=None, resume_from=None, tensorboard_dir=None, spec=None) -> TrainResult:
    """Fine-tune in place and leave the best evaluation's weights loaded. ``cfg`` is a TrainConfig.

    Evaluates after every epoch and every ``cfg.eval_every`` optimizer steps; stops after
    ``cfg.early_stopping_patience`` evaluations without a better accuracy. ``loss_fn(logits, labels,
    inputs) -> scalar`` replaces the default cross-entropy (e.g. prune.py --distill).

    ``checkpointer`` (bertopt.checkpoints.Checkpointer) saves every ``cfg.save_every`` steps and at
    each epoch end; ``resume_from`` (a checkpoint directory) continues a killed run on the same
    batches with the same RNG. ``tensorboard_dir`` mirrors the curves to TensorBoard.

    ``dist_ctx`` (bertopt.distributed.DistContext) marks a torchrun job (``model`` wrapped in DDP,
    ``train_loader`` yields this rank's batches; losses, eval figures and throughput are combined).

    ``spec`` (bertopt.tasks.TaskSpec) sets the task loss (unless ``loss_fn`` is given) and the metric
    that picks the best evaluation and drives early stopping; None = cross-entropy and accuracy."""
    import torch

    from . import tasks, tracking
    from .distributed import reduce_throughput, unwrap

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as rss, tracking.Writer(tensorboard_dir) as tb:
        run = _Run(model, cfg, device, plan, loss_fn or tasks.task_loss(spec), dist_ctx, checkpointer,
                   len(train_loader), tb, spec)
        if resume_from is not None:
            run.resume(resume_from)
            tb.purge_after(run.state.step)
        st = run.state
        for epoch in range(st.epoch, cfg.epochs):
            if st.stopped_early or run.train_epoch(train_loader, eval_loader, epoch):
                break
        run.log_loss()  # the tail of the last logging window
    samples, train_time = st.samples, st.train_time
    if dist_ctx is not None:
        samples, train_time = reduce_throughput(dist_ctx, samples, train_time)
    if run.best_state is not None and st.best_step != st.eval_curve[-1]["step"]:
        unwrap(model).load_state_dict(run.best_state)
    metrics = {
        "precision": plan.name, "device": str(device),
        "train_time_s": round(train_time, 3), "train_samples": samples,
        "samples_per_s": round(samples / train_time, 2) if train_time else None,
        "optimizer_steps": st.step, "skipped_steps": st.skipped_steps,
        "peak_memory_mb": round(rss.peak_mb, 1), "peak_memory_kind": "process RSS",
        "final_eval_accuracy": st.eval_curve[-1]["eval_accuracy"],
        "best_eval_accuracy": st.best_accuracy, "best_epoch": st.best_epoch, "best_step": st.best_step,
        "stopped_early": st.stopped_early, "resumed_from": st.resumed_from,
        "epochs": st.epochs, "loss_curve": st.loss_curve, "eval_curve": st.eval_curve,
    }
    if st.best_eval is not None:  # task metrics of the best evaluation
        metrics.update(metric=run.metric, best_eval_metric=st.best_score, eval_metrics=st.best_eval)
    if device.type == "cuda":
        metrics["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        metrics["peak_memory_kind"] = "CUDA max allocated"
        metrics["peak_rss_mb"] = round(rss.peak_mb, 1)
    return TrainResult(metrics=metrics, history=st.epochs)
