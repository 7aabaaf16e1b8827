"""The prune stage: depth (greedy layer sensitivity) then width (heads, FFN neurons) pruning, and a
re-fine-tune that distils from the unpruned model (FastFormers' order: depth -> width -> re-distill;
quantization follows in the ONNX stage). ``--compress auto`` hands the shape to the search
(:mod:`bertopt.prune_search`).

Reads a fine-tuned model (the baseline stage, or ``--prune-source DIR``), writes
``<output_dir>/pruned/``: a smaller save_pretrained model + tokenizer, ``labels.json``,
``sensitivity.json`` / ``sensitivity.png`` (depth), ``width.json`` (width) and ``manifest.json``
(stage "pruned"; status "skipped" when the search kept the unpruned model)."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from . import artifacts
from .cli import StageResult, print_config
from .config import PruneConfig, result_config
from .errors import DataError, ModelError

log = logging.getLogger("bertopt.prune_stage")

STAGE = "pruned"


def resolve_source(cfg: PruneConfig) -> tuple[Path, dict | None, str]:
    """(model dir, its manifest or None, a digest identifying its contents)."""
    if cfg.prune_source:
        src = Path(cfg.prune_source).expanduser()
        if not (src / "config.json").is_file():
            raise ModelError(f"--prune-source {cfg.prune_source}: not a saved model directory (no config.json)")
        manifest = artifacts.read_manifest(src)
        if manifest is not None and manifest.get("status") != "ok":
            raise ModelError(f"--prune-source {cfg.prune_source}: its manifest has status {manifest.get('status')!r} "
                             f"({manifest.get('reason') or 'no model'}), not a usable model")
    else:
        src = artifacts.stage_dir(cfg.output_dir, "baseline")
        manifest = artifacts.require_manifest(src, "baseline")
    digest = artifacts.manifest_digest(src)
    if digest is None:  # a plain model dir: identify it by its files' names, sizes and times
        h = hashlib.sha256()
        for p in sorted(src.iterdir()):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        digest = h.hexdigest()[:16]
    return src, manifest, digest


def _source_layers(src: Path) -> int:
    try:
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{src / 'config.json'}: unreadable ({exc})") from None
    n = config.get("num_hidden_layers", config.get("n_layers"))
    if not isinstance(n, int):
        raise ModelError(f"{src / 'config.json'}: no num_hidden_layers (not a BERT-family model?)")
    return n


def _skip_result(directory, manifest, start) -> StageResult:
    log.info("pruned is up to date (%s); --force re-runs it", artifacts.manifest_path(directory))
    m = manifest.get("metrics", {})
    return StageResult("prune", "up-to-date", time.perf_counter() - start, _key_metric(m), str(directory))


def _key_metric(m: dict) -> str:
    if m.get("pruned_eval_metric") is None:
        return m.get("reason", "")
    return (f"{m.get('layers_before')}->{m.get('layers_after')} layers, {m.get('heads_before')}->{m.get('heads_after')}"
            f" heads, FFN {m.get('ffn_before')}->{m.get('ffn_after')}: eval {m.get('metric_name')} "
            f"{m['pruned_eval_metric']:.4f} (source {m.get('source_eval_metric', float('nan')):.4f})")


def _write_sensitivity(cfg, directory, result, rows: int, src: str, n_before: int, k: int, seconds: float) -> None:
    """sensitivity.json and its plot (the initial per-layer scores and the greedy removals)."""
    from . import pruning

    initial = result.initial
    sensitivity = {
        "method": cfg.method, "metric": initial.metric, "split": "eval", "rows": rows, "source": src,
        "layers_before": n_before, "layers_after": n_before - k, "base": initial.base,
        "layers": [dict({"layer": i, "score": s}, **d) for i, (s, d) in enumerate(zip(initial.scores, initial.details))],
        "removed_layers": result.removed, "kept_layers": result.kept, "greedy_steps": result.steps,
        "time_s": round(seconds, 3),
    }
    artifacts.atomic_write_json(directory / artifacts.SENSITIVITY_FILE, sensitivity)
    pruning.plot_sensitivity(initial, directory / "sensitivity.png", removed=result.removed,
                             title=f"layer sensitivity ({cfg.method}, {rows} eval rows); red = pruned (greedy)")
    log.info("removed original layers %s (kept %s) in %.1fs", result.removed, result.kept, seconds)


def _load(cfg: PruneConfig, src, device, src_manifest):
    """The data splits, tokenizer, source model (on ``device``) and task spec, checked against each other."""
    from . import data as data_mod
    from . import modeling, tasks, training

    base_cfg = (src_manifest or {}).get("config") or {}
    splits = data_mod.load_splits_for(cfg.to_dict(), no_header=cfg.no_header or bool(base_cfg.get("no_header")),
                                      task=cfg.task or base_cfg.get("task"))
    log.info("data: %s, %d train / %d eval rows, labels %s", splits.source, len(splits.train),
             len(splits.eval), splits.label_names)
    tokenizer = modeling.load_tokenizer(str(src))
    training.seed_everything(cfg.seed)
    model = modeling.load_model(str(src))
    if model.config.num_labels != splits.num_labels:
        raise DataError(f"the source model has {model.config.num_labels} labels but {splits.source} has "
                        f"{splits.num_labels} ({', '.join(splits.label_names)}); prune a model fine-tuned "
                        "on this data set")
    modeling.check_max_length(cfg.max_length, model)
    model.to(device)
    spec = tasks.spec_from_record((src_manifest or {}).get("data"), splits.label_names)
    return splits, tokenizer, model, spec


def _depth_request(cfg: PruneConfig, n_before: int) -> int:
    from . import pruning

    if cfg.prune_layers is None and cfg.target_layers is None:
        return 0
    return pruning.layers_to_remove(n_before, cfg.prune_layers, cfg.target_layers)


def _check_width(src: Path, cfg: PruneConfig) -> None:
    """An impossible --heads / --ffn-width fails here, before anything is written."""
    if cfg.heads is None and cfg.ffn_width is None:
        return
    from transformers import AutoConfig

    from . import width

    width.check_request(AutoConfig.from_pretrained(str(src)), cfg.heads, cfg.ffn_width)


def _manual(cfg, model, k, n_before, splits, loaders, spec, device, directory, src):
    """Depth (greedy, re-scored) then width, as the flags ask: (pruned model, metrics)."""
    from . import pruning
    from .prune_steps import subset, width_prune

    info: dict = {"layers_before": n_before, "layers_after": n_before - k}
    pruned = model
    if k:
        _, sens_loader = loaders(subset(splits.eval, cfg.sensitivity_samples, cfg.seed), cfg.eval_batch_size, False)
        t0 = time.perf_counter()
        result = pruning.greedy_prune(model, k, lambda m: pruning.layer_sensitivity(m, sens_loader, device, cfg.method))
        seconds = time.perf_counter() - t0
        pruned = result.model
        _write_sensitivity(cfg, directory, result, len(sens_loader.dataset), str(src), n_before, k, seconds)
        info.update(removed_layers=result.removed, kept_layers=result.kept, sensitivity_method=cfg.method,
                    sensitivity_rows=len(sens_loader.dataset), sensitivity_time_s=round(seconds, 3))
    pruned, record = width_prune(pruned, cfg.heads, cfg.ffn_width, splits.train, loaders, spec, device, cfg.seed)
    if record:
        artifacts.atomic_write_json(directory / artifacts.WIDTH_FILE, record)
    return pruned, info


def _score(ev: dict) -> float:
    return ev.get("metric", ev.get("accuracy"))


def run_prune(cfg: PruneConfig) -> StageResult:
    from . import modeling, training, width
    from .prune_steps import Loaders, refinetune

    start = time.perf_counter()
    src, src_manifest, src_digest = resolve_source(cfg)
    n_before = _source_layers(src)
    k = _depth_request(cfg, n_before)  # impossible requests fail before any work or write
    _check_width(src, cfg)
    directory = artifacts.stage_dir(cfg.output_dir, STAGE)
    if src.resolve() == directory.resolve():
        raise ModelError(f"--prune-source {src} is the pruned stage's own output directory; prune a copy instead")
    fp = artifacts.fingerprint({"stage": STAGE, **result_config(cfg)}, {"source": str(src), "digest": src_digest})
    run_ = artifacts.stage_run(directory, STAGE, fp, force=cfg.force, wait=cfg.wait)
    if run_.current:
        return _skip_result(directory, run_.current, start)
    with run_:
        print_config("prune", cfg)
        device = training.resolve_device(cfg.device)
        plan = training.resolve_precision("fp32", device)
        splits, tokenizer, model, spec = _load(cfg, src, device, src_manifest)
        loaders = Loaders(cfg, tokenizer, model, device)
        _, eval_loader = loaders(splits.eval, cfg.eval_batch_size, False)
        source_eval = training.evaluate(model, eval_loader, device, spec=spec, desc="eval source")
        shape0 = {"layers_before": n_before, "heads_before": width.num_heads(model) if width.spec(model) else None,
                  "ffn_before": width.ffn_width(model) if width.spec(model) else None,
                  "parameters_before": modeling.param_counts(model)["parameters"]}
        base = dict(shape0, metric_name=spec.metric, source_eval_metric=_score(source_eval),
                    source_eval_accuracy=source_eval.get("accuracy"), distill=cfg.distill, compress=cfg.compress)
        inputs = {"source": str(src), "source_manifest": src_digest, "dataset": splits.source}
        if cfg.compress == "auto":
            from . import prune_search

            found = prune_search.run(cfg, model, splits, loaders, spec, device, plan, src_manifest, run_.directory)
            if found.model is None:
                metrics = dict(base, reason=found.reason, search=found.record)
                log.warning("%s", found.reason)
                run_.finish(status="skipped", reason=found.reason, config=cfg.to_dict(), inputs=inputs,
                            outputs=artifacts.list_files(run_.directory), metrics=metrics)
                return StageResult("prune", "skipped", time.perf_counter() - start, found.reason, str(directory))
            pruned, info, trained = found.model, dict(found.info, search=found.record), found.trained
        else:
            pruned, info = _manual(cfg, model, k, n_before, splits, loaders, spec, device, run_.directory, src)
            before = training.evaluate(pruned, eval_loader, device, spec=spec, desc="eval pruned, before re-fine-tune")
            info.update(accuracy_before_finetune=before.get("accuracy"), metric_before_finetune=_score(before))
            counts = modeling.freeze_layers(pruned, cfg.freeze_layers)
            cfg = modeling.resolve_lr(cfg, pruned)
            train_ds, train_loader = loaders(splits.train, cfg.batch_size, True)
            trained = refinetune(cfg, pruned, model, train_loader, eval_loader, spec, device, plan).metrics
            info.update(counts, mean_train_tokens=round(sum(train_ds.lengths) / max(len(train_ds), 1), 2))
        metrics = _finish(cfg, run_, run_.directory, pruned, tokenizer, splits, eval_loader, spec, device, base, info,
                          trained, inputs)
    return StageResult("prune", "ok", time.perf_counter() - start, _key_metric(metrics), str(directory))


def _finish(cfg, run_, directory, pruned, tokenizer, splits, eval_loader, spec, device, base, info, trained, inputs):
    """Evaluate on the reported split, save the model and write the manifest (last)."""
    from . import families, modeling, training, width

    final = training.evaluate(pruned, eval_loader, device, spec=spec, desc="eval pruned")
    pruned.to("cpu")
    artifacts.save_model(pruned, tokenizer, directory)
    artifacts.atomic_write_json(directory / "labels.json", splits.label_names)
    after = {"heads_after": width.num_heads(pruned) if width.spec(pruned) else None,
             "ffn_after": width.ffn_width(pruned) if width.spec(pruned) else None,
             "layers_after": families.depth(pruned),
             "parameters_after": modeling.param_counts(pruned)["parameters"],
             "loads_with_auto_classes": width.auto_loadable(pruned)}
    metrics = {**trained, **base, **info, **after, "train_rows": len(splits.train), "eval_rows": len(splits.eval),
               "pruned_eval_metric": _score(final), "accuracy_after_finetune": final.get("accuracy")}
    metrics["metric_delta"] = metrics["pruned_eval_metric"] - base["source_eval_metric"]
    if final.get("accuracy") is not None and base["source_eval_accuracy"] is not None:
        metrics["accuracy_delta"] = final["accuracy"] - base["source_eval_accuracy"]
    run_.finish(status="ok", config=cfg.to_dict(), inputs=inputs, outputs=artifacts.list_files(directory),
                metrics=metrics,
                data={"source": splits.source, "label_names": splits.label_names, "eval_carved": splits.eval_carved,
                      **spec.to_dict()})
    return metrics
