"""The two fine-tuning stages: the FP32 baseline (benchmark.py) and mixed precision."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from . import artifacts
from .cli import StageResult, print_config
from .config import TrainConfig, result_config
from .logs import stage_logging
from .metrics import resolve_metric
from .tasks import PROBLEM_TYPES, TaskSpec, class_weights

log = logging.getLogger("bertopt.train_stage")


def _skip_result(stage, directory, manifest, start) -> StageResult:
    log.info("%s is up to date (%s); --force re-runs it", stage, artifacts.manifest_path(directory))
    metrics = manifest.get("metrics", {})
    return StageResult(stage, "up-to-date", time.perf_counter() - start,
                       _best_line(metrics) if metrics else manifest.get("reason") or "",
                       str(directory))


def run_training(cfg: TrainConfig, stage: str) -> StageResult:
    """Fine-tune ``cfg.model`` on ``cfg.dataset`` and write the stage directory.

    Under torchrun every rank runs this with DistributedDataParallel (bertopt.distributed); rank 0
    alone writes the stage directory, and a failing rank ends the whole job."""
    from . import distributed

    start = time.perf_counter()
    ctx = distributed.setup(cfg.device)  # distributed.SINGLE outside torchrun
    with distributed.guard(ctx):
        return _run_training(cfg, stage, ctx, start)


def _run_training(cfg: TrainConfig, stage: str, ctx, start: float) -> StageResult:
    from . import data as data_mod
    from . import distributed

    directory = artifacts.stage_dir(cfg.output_dir, stage)
    key = {"stage": stage, **result_config(cfg)}
    if ctx.enabled:
        key["world_size"] = ctx.world_size  # the global batch depends on it
    fp = artifacts.fingerprint(key)
    current = None if cfg.force else artifacts.is_current(directory, fp)
    current = distributed.broadcast_object(ctx, current)  # rank 0's view decides for every rank
    if current:
        return _skip_result(stage, directory, current, start)
    # bad data fails here, before the stage directory is touched (nothing written, nothing cleared)
    splits = data_mod.load_splits_for(cfg.to_dict())
    spec = task_spec(cfg, splits)
    replacement, work, resume_from = _prepare_dir(cfg, stage, directory, fp, ctx, splits)
    try:
        result = _train_in(cfg, stage, directory, work, fp, ctx, splits, spec, resume_from, replacement, start)
    except BaseException as exc:
        if replacement is not None:
            replacement.close(failed=True)
            from . import staging

            if staging.is_disk_full(exc) and not isinstance(exc, staging.DiskFull):
                with staging.disk_errors(work, f"the {stage} model and checkpoints", replacement.need, directory):
                    raise
        raise
    if replacement is not None:
        replacement.close()
    return result


def _train_in(cfg, stage, directory, work, fp, ctx, splits, spec, resume_from, replacement, start) -> StageResult:
    """Train in the working directory ``work``; rank 0 writes the model and manifest there, then
    swaps it into ``directory``."""
    from . import checkpoints, distributed, modeling, tracking, training

    with stage_logging(stage, work if ctx.is_main else None):
        print_config(stage, cfg)
        device = ctx.device if ctx.enabled else training.resolve_device(cfg.device)
        # amp on CPU is a timing probe: rank 0's verdict holds for every rank (no mixed precisions)
        plan = distributed.broadcast_object(ctx, training.resolve_precision(cfg.precision, device))
        if not plan.available and not (cfg.force and device.type == "cpu" and plan.name == "bf16"):
            log.warning("%s skipped: %s", stage, plan.reason)
            if ctx.is_main:
                artifacts.write_manifest(work, stage=stage, status="skipped", reason=plan.reason,
                                         config=cfg.to_dict(), fingerprint=fp)
                replacement.commit()
            return StageResult(stage, "skipped", time.perf_counter() - start, plan.reason, str(directory))
        if plan.autocast_dtype is not None:
            log.info("precision: %s autocast on %s (%s)", plan.name, device, plan.reason)

        log.info("data: %s, %d train / %d eval rows, labels %s%s", splits.source, len(splits.train),
                 len(splits.eval), splits.label_names, " (eval carved from train)" if splits.eval_carved else "")
        log_task(spec, splits)
        tokenizer = modeling.load_tokenizer(cfg.model)
        training.seed_everything(cfg.seed)
        model = modeling.load_model(cfg.model, splits.num_labels, splits.label_names,
                                    problem_type=None if spec.plain else PROBLEM_TYPES[spec.task])
        modeling.check_max_length(cfg.max_length, model)
        counts = modeling.freeze_layers(model, cfg.freeze_layers)
        cfg = modeling.resolve_lr(cfg, model)
        model.to(device)

        train_ds, train_loader, eval_loader = _make_loaders(cfg, splits, tokenizer, model, device, ctx)
        log.info("model: %s, %d parameters (%d trainable), max length %d, batch %d, %d epoch(s)",
                 cfg.model, counts["parameters"], counts["trainable_parameters"], cfg.max_length,
                 cfg.batch_size, cfg.epochs)
        summary = distributed.run_summary(ctx, cfg.batch_size, cfg.grad_accum_steps)
        if ctx.enabled:
            log.info("data parallel: %d processes x batch %d x grad-accum %d = global batch %d (%s)",
                     ctx.world_size, cfg.batch_size, cfg.grad_accum_steps, summary["global_batch_size"], ctx.backend)
        dist_ctx = ctx if ctx.enabled else None
        result = training.train(
            distributed.wrap_model(model, ctx), train_loader, eval_loader, cfg, device, plan, dist_ctx=dist_ctx,
            checkpointer=checkpoints.Checkpointer(checkpoints.root(work), fp, cfg.save_total_limit, dist_ctx),
            resume_from=resume_from,
            tensorboard_dir=work / tracking.SUBDIR if cfg.report_to == "tensorboard" and ctx.is_main else None,
            spec=spec)
        distributed.barrier(ctx)  # every rank has finished before rank 0 writes anything
        if not ctx.is_main:
            distributed.barrier(ctx)  # ... and stays until rank 0 has written the stage directory
            return StageResult(stage, "ok", time.perf_counter() - start,
                               f"rank {ctx.rank}/{ctx.world_size} done (rank 0 writes the artifacts)", str(directory))

        metrics = _write_stage(work, stage, cfg, fp, model, tokenizer, splits, train_ds, result, counts,
                               summary, plan, spec)
        shutil.rmtree(checkpoints.root(work), ignore_errors=True)  # the manifest vouches for the model now
        replacement.commit()  # the previous output stayed valid until this swap
        distributed.barrier(ctx)
    return StageResult(stage, "ok", time.perf_counter() - start,
                       f"{_best_line(metrics)}, {metrics['samples_per_s']} samples/s", str(directory))


def _best_line(metrics: dict) -> str:
    if metrics.get("metric"):
        return f"best eval {metrics['metric']} {metrics['best_eval_metric']:.4f}"
    return f"best eval accuracy {metrics['best_eval_accuracy']:.4f}"


def task_spec(cfg: TrainConfig, splits) -> TaskSpec:
    """The task, its metric (with the reason it was chosen) and class weights for this run."""
    metric, why = resolve_metric(cfg.metric, splits.task, splits.train.labels, splits.num_labels, splits.is_pair)
    weights = class_weights(cfg.class_weights, splits.train.labels, splits.num_labels, splits.task)
    return TaskSpec(splits.task, list(splits.label_names), metric, cfg.threshold, weights, why)


def log_task(spec: TaskSpec, splits) -> None:
    log.info("task: %s%s, %d label(s); metric: %s (%s)%s", spec.task, " (sentence pairs: "
             + " + ".join(splits.text_columns) + ")" if splits.is_pair else "", splits.num_labels, spec.metric,
             spec.why, f"; class weights {spec.class_weights}" if spec.class_weights else "")


def data_record(cfg: TrainConfig, splits, spec: TaskSpec) -> dict:
    """What downstream stages need to score this model the same way (stored in the manifest)."""
    return {**spec.to_dict(), "text_columns": splits.text_columns, "pairs": splits.is_pair,
            "long_text": cfg.long_text, "stride": cfg.stride}


def _make_loaders(cfg: TrainConfig, splits, tokenizer, model, device, ctx):
    """Tokenize once; the length-grouped train loader (this rank's share under torchrun) and the eval loader."""
    from . import data as data_mod
    from . import distributed, modeling

    with_tt = modeling.uses_token_type_ids(model)
    pad_id = tokenizer.pad_token_id or 0
    train_ds = data_mod.encoded_dataset(splits.train, tokenizer, cfg.max_length, cfg.long_text, cfg.stride)
    eval_ds = data_mod.encoded_dataset(splits.eval, tokenizer, cfg.max_length, cfg.long_text, cfg.stride)
    sep_id = tokenizer.sep_token_id if splits.is_pair else None
    cuda = device.type == "cuda"
    workers = cfg.num_workers if cfg.num_workers is not None else (2 if cuda else 0)
    pin = cfg.pin_memory if cfg.pin_memory is not None else cuda
    # under torchrun each rank gets a disjoint share of the length-grouped batches
    train_loader = data_mod.make_loader(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed, pad_id=pad_id,
                                        with_token_type_ids=with_tt, num_workers=workers, pin_memory=pin,
                                        num_replicas=ctx.world_size, rank=ctx.rank, sep_id=sep_id)
    if ctx.enabled:
        eval_loader = distributed.make_eval_loader(eval_ds, cfg.eval_batch_size, ctx, pad_id=pad_id,
                                                   with_token_type_ids=with_tt, num_workers=workers,
                                                   pin_memory=pin)
    else:
        eval_loader = data_mod.make_loader(eval_ds, cfg.eval_batch_size, shuffle=False, seed=cfg.seed,
                                           pad_id=pad_id, with_token_type_ids=with_tt, num_workers=workers,
                                           pin_memory=pin, sep_id=sep_id)
    return train_ds, train_loader, eval_loader


def _write_stage(directory, stage, cfg, fp, model, tokenizer, splits, train_ds, result, counts, summary, plan,
                 spec) -> dict:
    """Rank 0: the weights, tokenizer and labels, then the manifest (last); returns its metrics."""
    from . import checkpoints

    model.to("cpu")
    artifacts.save_model(model, tokenizer, directory)
    metrics = dict(result.metrics, **counts, **summary, train_rows=len(splits.train), eval_rows=len(splits.eval),
                   mean_train_tokens=round(sum(train_ds.lengths) / max(len(train_ds), 1), 2))
    artifacts.atomic_write_json(directory / "labels.json", splits.label_names)
    artifacts.write_manifest(
        directory, stage=stage, status="ok", config=cfg.to_dict(), fingerprint=fp,
        inputs={"model": cfg.model, "dataset": splits.source},
        outputs=[f for f in artifacts.list_files(directory) if not f.startswith(checkpoints.DIRNAME + "/")],
        metrics=metrics, resumed=bool(metrics["resumed_from"]),
        data={"source": splits.source, "label_names": splits.label_names, "eval_carved": splits.eval_carved,
              **data_record(cfg, splits, spec)},
        reason=plan.reason if plan.autocast_dtype is not None else None,
    )
    return metrics


def _prepare_dir(cfg: TrainConfig, stage: str, directory, fp: str, ctx, splits):
    """Rank 0 locks the stage output and opens its working directory beside it (bertopt.staging),
    keeping one left by an interrupted run with the same fingerprint (its checkpoints and TensorBoard
    curves) to resume from. Returns (rank 0's Replacement or None, the working dir, the checkpoint
    to resume from or None) on every rank."""
    from . import checkpoints, distributed, staging
    from .errors import ConfigError, PipelineError

    replacement, work, found, problem = None, None, None, None
    if ctx.is_main:
        replacement = staging.Replacement(directory, fp, stage, wait=cfg.wait, manifest=artifacts.MANIFEST,
                                          carry=(artifacts.STAGE_LOG,))
        replacement.need = _space_needed(cfg, splits)
        try:
            work = replacement.open(resumable=not cfg.force)
            staging.check_free(work, replacement.need, f"the {stage} model and checkpoints", keeps=directory)
            found = None if cfg.force else checkpoints.find_resumable(work, fp, required=cfg.resume)
        except ConfigError as exc:
            problem = str(exc)
        except BaseException as exc:
            replacement.close()
            if ctx.enabled:  # the other ranks wait in the broadcast below: every rank stops with this line
                problem = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
            else:
                raise
        if problem:
            replacement.close()
    work, found, problem = distributed.broadcast_object(ctx, (str(work) if work else None,
                                                              str(found) if found else None, problem))
    if problem:
        raise ConfigError(problem)
    distributed.barrier(ctx)
    return replacement, Path(work), found


def _space_needed(cfg: TrainConfig, splits) -> int | None:
    """Roughly what the run writes: the saved model plus ``save_total_limit`` checkpoints (weights,
    two Adam moments and a best copy each), from the model's size on disk when it is local."""
    src = Path(cfg.model)
    if not src.is_dir():
        return None
    weights = sum(p.stat().st_size for p in src.glob("*") if p.suffix in (".safetensors", ".bin"))
    return weights * (1 + 4 * max(int(cfg.save_total_limit or 1), 1)) if weights else None


def run_baseline(cfg: TrainConfig) -> StageResult:
    if cfg.precision != "fp32":
        from .errors import ConfigError

        raise ConfigError("the baseline is FP32 by definition; use mixed_precision.py for --precision "
                          f"{cfg.precision}")
    return run_training(cfg, "baseline")


def run_mixed_precision(cfg: TrainConfig) -> StageResult:
    if cfg.precision == "fp32":
        from dataclasses import replace

        cfg = replace(cfg, precision="amp")
    return run_training(cfg, "mixed_precision")
