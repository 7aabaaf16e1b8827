"""The prune stage: layer sensitivity, greedy structured layer pruning and re-fine-tuning.

Reads a fine-tuned model (the baseline stage, or ``--prune-source DIR``), writes
``<output_dir>/pruned/``: a plain smaller save_pretrained model + tokenizer, ``labels.json``,
``sensitivity.json``, ``sensitivity.png`` and ``manifest.json`` (stage "pruned")."""
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
    if m.get("best_eval_accuracy") is None:
        return ""
    return (f"{m.get('layers_before')}->{m.get('layers_after')} layers, eval accuracy "
            f"{m['best_eval_accuracy']:.4f} (source {m.get('source_eval_accuracy', float('nan')):.4f})")


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


def _load(cfg: PruneConfig, src, device):
    """The data splits, tokenizer and source model (on ``device``), checked against each other."""
    from . import data as data_mod
    from . import modeling, training

    splits = data_mod.load_splits(cfg.dataset, cfg.data_dir, cfg.text_column, cfg.label_column,
                                  cfg.max_train_samples, cfg.max_eval_samples, cfg.seed)
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
    return splits, tokenizer, model


def _loaders(cfg: PruneConfig, splits, tokenizer, model, device):
    """(loader factory, eval loader, sensitivity rows, sensitivity loader)."""
    from . import data as data_mod
    from . import modeling

    with_tt = modeling.uses_token_type_ids(model)
    pad_id = tokenizer.pad_token_id or 0
    cuda = device.type == "cuda"
    workers = cfg.num_workers if cfg.num_workers is not None else (2 if cuda else 0)
    pin = cfg.pin_memory if cfg.pin_memory is not None else cuda

    def loader(texts, labels, batch_size, shuffle):
        ds = data_mod.EncodedDataset(data_mod.tokenize(texts, tokenizer, cfg.max_length), labels)
        return ds, data_mod.make_loader(ds, batch_size, shuffle=shuffle, seed=cfg.seed, pad_id=pad_id,
                                        with_token_type_ids=with_tt, num_workers=workers, pin_memory=pin)

    eval_ds, eval_loader = loader(splits.eval.texts, splits.eval.labels, cfg.eval_batch_size, False)
    sens = splits.eval
    if cfg.sensitivity_samples and cfg.sensitivity_samples < len(sens):
        idx = data_mod.stratified_indices(sens.labels, cfg.sensitivity_samples, cfg.seed)
        sens = data_mod.TextData([sens.texts[i] for i in idx], [sens.labels[i] for i in idx])
    _, sens_loader = loader(sens.texts, sens.labels, cfg.eval_batch_size, False)
    return loader, eval_loader, sens, sens_loader


def run_prune(cfg: PruneConfig) -> StageResult:
    from . import modeling, pruning, training

    start = time.perf_counter()
    src, src_manifest, src_digest = resolve_source(cfg)
    n_before = _source_layers(src)
    k = pruning.layers_to_remove(n_before, cfg.prune_layers, cfg.target_layers)  # fail before any work
    directory = artifacts.stage_dir(cfg.output_dir, STAGE)
    if src.resolve() == directory.resolve():
        raise ModelError(f"--prune-source {src} is the pruned stage's own output directory; prune a copy instead")
    fp = artifacts.fingerprint({"stage": STAGE, **result_config(cfg)}, {"source": str(src), "digest": src_digest})
    run_ = artifacts.stage_run(directory, STAGE, fp, force=cfg.force, wait=cfg.wait)
    if run_.current:
        return _skip_result(directory, run_.current, start)
    with run_:
        print_config("prune", cfg)
        log.info("source: %s (%d encoder layers); removing %d -> %d layers, sensitivity method %s",
                 src, n_before, k, n_before - k, cfg.method)
        if src_manifest and src_manifest.get("config", {}).get("dataset") not in (None, cfg.dataset):
            log.warning("the source was fine-tuned on %s, but --dataset is %s", src_manifest["config"]["dataset"],
                        cfg.dataset)
        device = training.resolve_device(cfg.device)
        plan = training.resolve_precision("fp32", device)

        splits, tokenizer, model = _load(cfg, src, device)
        loader, eval_loader, sens, sens_loader = _loaders(cfg, splits, tokenizer, model, device)

        source_eval = training.evaluate(model, eval_loader, device, desc="eval source")
        params_before = modeling.param_counts(model)["parameters"]
        log.info("source: eval accuracy %.4f, %d parameters", source_eval["accuracy"], params_before)

        # 1+2. sensitivity and greedy, iterative removal (re-scored after every removal)
        t0 = time.perf_counter()
        result = pruning.greedy_prune(
            model, k, lambda m: pruning.layer_sensitivity(m, sens_loader, device, cfg.method))
        sensitivity_time = time.perf_counter() - t0
        pruned = result.model
        _write_sensitivity(cfg, run_.directory, result, len(sens), str(src), n_before, k, sensitivity_time)

        pruned_eval = training.evaluate(pruned, eval_loader, device, desc="eval pruned")
        params_after = modeling.param_counts(pruned)["parameters"]
        log.info("pruned before re-fine-tuning: eval accuracy %.4f, %d parameters (%.1f%% of the source)",
                 pruned_eval["accuracy"], params_after, 100.0 * params_after / params_before)

        # 3. re-fine-tune with the shared loop (optionally distilling from the unpruned model)
        counts = modeling.freeze_layers(pruned, cfg.freeze_layers)
        cfg = modeling.resolve_lr(cfg, pruned)
        train_ds, train_loader = loader(splits.train.texts, splits.train.labels, cfg.batch_size, True)
        loss_fn = None
        if cfg.distill:
            loss_fn = pruning.DistillLoss(model, cfg.distill_temperature, cfg.distill_alpha)
            log.info("distilling from the unpruned model: alpha %.2f x T^2 KL (T=%.1f) + %.2f x CE",
                     cfg.distill_alpha, cfg.distill_temperature, 1 - cfg.distill_alpha)
        else:
            del model
        training.seed_everything(cfg.seed)
        trained = training.train(pruned, train_loader, eval_loader, cfg, device, plan, loss_fn=loss_fn)

        pruned.to("cpu")
        artifacts.save_model(pruned, tokenizer, run_.directory)
        artifacts.atomic_write_json(run_.directory / "labels.json", splits.label_names)
        best = trained.metrics["best_eval_accuracy"]
        metrics = dict(
            trained.metrics, **counts, train_rows=len(splits.train), eval_rows=len(splits.eval),
            mean_train_tokens=round(sum(train_ds.lengths) / max(len(train_ds), 1), 2),
            layers_before=n_before, layers_after=n_before - k, removed_layers=result.removed, kept_layers=result.kept,
            parameters_before=params_before, parameters_after=params_after, sensitivity_method=cfg.method,
            sensitivity_rows=len(sens), sensitivity_time_s=round(sensitivity_time, 3),
            source_eval_accuracy=source_eval["accuracy"], accuracy_before_finetune=pruned_eval["accuracy"],
            accuracy_after_finetune=best, accuracy_delta=best - source_eval["accuracy"], distill=cfg.distill)
        run_.finish(
            status="ok", config=cfg.to_dict(),
            inputs={"source": str(src), "source_manifest": src_digest, "dataset": splits.source},
            outputs=artifacts.list_files(run_.directory), metrics=metrics,
            data={"source": splits.source, "label_names": splits.label_names, "eval_carved": splits.eval_carved},
        )
    return StageResult("prune", "ok", time.perf_counter() - start, _key_metric(metrics), str(directory))
