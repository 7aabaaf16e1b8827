"""The trained stage (``--trained DIR_OR_HUB_ID``): a classifier fine-tuned elsewhere becomes the FP32
reference, without re-training.

It writes the baseline stage's directory in the baseline's shape (save_pretrained model + tokenizer,
``labels.json``, a manifest with the same ``config``/``data``/``metrics`` keys), so the ONNX stage,
prune, compare, the report and the deploy read it exactly as a baseline trained here. The manifest's
``origin`` says it was not trained here and where it came from (a directory, or a hub id and its
revision; SHA-256 of the source files).

What a training run decides comes from the model and the eval data instead: the labels from
``config.id2label`` (checked against the data's; ``--label-map`` aligns other names, and a head in
another label order is permuted into the data's order), the task from ``config.problem_type`` and the
labels, the metric by training's rule, the max length from the tokenizer and config. The eval metric
is measured by training's evaluation. Every check runs before the stage directory is touched: a
model or data set that does not fit is one line, exit 1, nothing written.

A single ``--dataset`` file is the evaluation set (there is no training data; calibration uses eval
rows, and prune, which re-fine-tunes, asks for training data)."""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import artifacts, tasks
from .cli import StageResult, print_config
from .config import CommonConfig, result_config
from .errors import ConfigError, DataError, ModelError

log = logging.getLogger("bertopt.trained_stage")

STAGE = "baseline"  # the directory and manifest it writes: later stages read it as the baseline
HASHED_HUB_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "vocab.txt",
                    "tokenizer_config.json")


@dataclass
class TrainedConfig(CommonConfig):
    """main.py / benchmark.py --trained: the FP32 reference from a model fine-tuned elsewhere."""

    trained: str = ""
    label_map: Optional[str] = None  # MODEL_LABEL=DATA_LABEL,... (model names -> the data's names)
    max_length: Optional[int] = None  # None = the tokenizer's and config's limit
    eval_only: Optional[bool] = None  # None = a single --dataset file is the evaluation set

    def __post_init__(self):
        if self.eval_only is None:
            self.eval_only = bool(self.dataset) and Path(self.dataset).is_file()
        super().__post_init__()

    def problems(self) -> list[str]:
        p = [x for x in super().problems() if not (self.max_length is None and x.startswith("--max-length"))]
        if not self.trained:
            p.append("--trained needs a fine-tuned model directory or a Hugging Face model id")
        try:
            parse_label_map(self.label_map)
        except ConfigError as exc:
            p += exc.problems
        return p


def parse_label_map(text: Optional[str]) -> dict[str, str]:
    """``--label-map NEG=negative,POS=positive`` -> {model label (name or id): data label}."""
    out = {}
    for item in [x.strip() for x in (text or "").split(",") if x.strip()]:
        model, sep, data = item.partition("=")
        if not sep or not model.strip() or not data.strip():
            raise ConfigError(f"--label-map {text}: expected MODEL_LABEL=DATA_LABEL pairs separated by commas "
                              f"(got {item!r})")
        out[model.strip()] = data.strip()
    return out


# ----------------------------------------------------------------------------- the model's facts
def load_checked_config(cfg: TrainedConfig):
    """(resolved path or hub id, transformers config) of a fine-tuned encoder classifier with weights."""
    from transformers import AutoConfig

    from . import modeling

    try:
        path = modeling.resolve_model(cfg.trained)
    except ModelError as exc:  # its messages name --model; here the model came from --trained
        raise ModelError(str(exc).replace("--model", "--trained")) from None
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise _load_error(cfg.trained, exc) from None
    modeling.check_encoder(config, cfg.trained)
    modeling.check_weights(path, cfg.trained)
    archs = list(config.architectures or ())
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ModelError(f"--trained {cfg.trained}: no classification head (config.json architectures: "
                         f"{', '.join(archs) or 'none'}), so it is a bare encoder, not a fine-tuned classifier; "
                         f"fine-tune it here with `python main.py --model {cfg.trained}`")
    return path, config


def _load_error(model: str, exc: Exception) -> ModelError:
    from .errors import first_line

    return ModelError(f"--trained {model}: cannot load it ({first_line(exc)}); give a save_pretrained directory "
                      "or a reachable Hugging Face model id")


def model_task(config) -> tuple[Optional[str], str]:
    """The task the model's head was trained for (None = classification or multi-label: the data
    decides) and why."""
    problem = getattr(config, "problem_type", None)
    if problem:
        return {v: k for k, v in tasks.PROBLEM_TYPES.items()}[problem], f"config.problem_type {problem}"
    if int(config.num_labels) == 1:
        return tasks.REGRESSION, "one output"
    return None, f"{config.num_labels} outputs"


def check_task(cfg: TrainedConfig, config, splits) -> None:
    task, why = model_task(config)
    where = f"--trained {cfg.trained}"
    data_kind = ("real-valued (regression)" if splits.task == tasks.REGRESSION
                 else f"{splits.task} ({', '.join(map(str, splits.label_names[:10]))})")
    if task is not None and task != splits.task:
        raise DataError(f"{where} is a {task} model ({why}) but the labels of {splits.source} are {data_kind}; "
                        f"evaluate it on {task} data" + (f" or drop --task {cfg.task}" if cfg.task else ""))
    if task is None and splits.task == tasks.REGRESSION:
        raise DataError(f"{where} is a classifier ({why}) but the labels of {splits.source} are {data_kind}; "
                        "evaluate it on classification data")


def _generic(names: list[str]) -> bool:
    """transformers' placeholder names (LABEL_0, LABEL_1, ... or 0, 1, ...): no meaning, align by index."""
    return all(n in (f"LABEL_{i}", str(i)) for i, n in enumerate(names))


def align_labels(cfg: TrainedConfig, config, splits) -> Optional[list[int]]:
    """The head row of each data class (None = the head is already in the data's order); a
    one-line DataError naming both label sets when they disagree."""
    if splits.task == tasks.REGRESSION:
        return None
    n = int(config.num_labels)
    id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
    names = [id2label.get(i, f"LABEL_{i}") for i in range(n)]
    mapping = parse_label_map(cfg.label_map)
    unknown = [k for k in mapping if k not in names and k not in map(str, range(n))]
    if unknown:
        raise ConfigError(f"--label-map: {', '.join(unknown)} is not a label of --trained {cfg.trained} "
                          f"(config.id2label: {', '.join(names)})")
    mapped = [mapping.get(x, mapping.get(str(i), x)) for i, x in enumerate(names)]
    data = [str(x) for x in splits.label_names]
    if _generic(mapped) and n == len(data):
        return None
    lower, wanted = [x.lower() for x in mapped], [x.lower() for x in data]
    if len(set(lower)) != n or sorted(lower) != sorted(wanted):
        raise DataError(f"labels disagree: --trained {cfg.trained} has {{{', '.join(mapped)}}} (config.id2label"
                        f"{' after --label-map' if mapping else ''}), {splits.source} has {{{', '.join(data)}}}; "
                        "align them with --label-map MODEL_LABEL=DATA_LABEL,...")
    perm = [lower.index(w) for w in wanted]
    return None if perm == list(range(n)) else perm


def permute_head(model, perm: list[int]) -> None:
    """Reorder the classifier's output rows (the last Linear with num_labels outputs) into ``perm``."""
    import torch

    n = int(model.config.num_labels)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == n]
    if not head:  # pragma: no cover - every *ForSequenceClassification ends in one
        raise ModelError("cannot find the classification layer to reorder its labels")
    with torch.no_grad():
        head[-1].weight.copy_(head[-1].weight[perm].clone())
        if head[-1].bias is not None:
            head[-1].bias.copy_(head[-1].bias[perm].clone())


def resolve_max_length(cfg: TrainedConfig, tokenizer, config) -> int:
    from . import modeling

    limit = modeling.max_positions(config)
    if cfg.max_length is not None:
        modeling.check_max_length(cfg.max_length, config)
        return cfg.max_length
    tok = getattr(tokenizer, "model_max_length", None)
    return min(limit, tok) if isinstance(tok, int) and 0 < tok < 1_000_000 else limit


# ----------------------------------------------------------------------------- where it came from
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def origin(cfg: TrainedConfig, path: str, config) -> dict:
    """Where the reference came from: a directory or a hub id + revision, and its files' SHA-256."""
    local = Path(path)
    if local.is_dir():
        files = {p.name: _sha256(p) for p in sorted(local.iterdir()) if p.is_file() and not p.name.startswith(".")}
        return {"trained_here": False, "model": cfg.trained, "kind": "directory", "path": str(local.resolve()),
                "revision": None, "files": files}
    from huggingface_hub import try_to_load_from_cache

    files, revision = {}, getattr(config, "_commit_hash", None)
    for name in HASHED_HUB_FILES:
        cached = try_to_load_from_cache(path, name)
        if isinstance(cached, str):
            files[name] = _sha256(Path(cached))
            if revision is None and Path(cached).parent.parent.name == "snapshots":  # .../snapshots/<commit>/
                revision = Path(cached).parent.name
    return {"trained_here": False, "model": cfg.trained, "kind": "hub", "path": None, "revision": revision,
            "files": files}


# ----------------------------------------------------------------------------- the stage
def _prepare(cfg: TrainedConfig):
    """Every check and the evaluation, before anything is written: (model, tokenizer, splits, spec,
    max length, origin, eval figures, permutation)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from . import data as data_mod
    from . import modeling
    from .metrics import resolve_metric

    path, config = load_checked_config(cfg)
    splits = data_mod.load_splits_for(cfg.to_dict(), eval_only=cfg.eval_only)
    check_task(cfg, config, splits)
    perm = align_labels(cfg, config, splits)
    tokenizer = modeling.load_tokenizer(path)
    max_length = resolve_max_length(cfg, tokenizer, config)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32,
                                                                         output_loading_info=True)
    except Exception as exc:
        raise _load_error(cfg.trained, exc) from None
    fresh = [k for k in info.get("missing_keys", ()) if "classifier" in k or "score" in k or "head" in k]
    if fresh:
        raise ModelError(f"--trained {cfg.trained}: its weights have no trained classification head "
                         f"(missing {', '.join(sorted(fresh)[:3])}); fine-tune it here with "
                         f"`python main.py --model {cfg.trained}`")
    if perm is not None:
        log.info("head outputs reordered into the data's label order %s (from %s)", splits.label_names, perm)
        permute_head(model, perm)
    if splits.task != tasks.REGRESSION:
        model.config.id2label = {i: str(n) for i, n in enumerate(splits.label_names)}
        model.config.label2id = {str(n): i for i, n in enumerate(splits.label_names)}
    model.config.problem_type = tasks.PROBLEM_TYPES[splits.task]
    labels_for_rule = splits.train.labels if len(splits.train) else splits.eval.labels
    metric, why = resolve_metric(cfg.metric, splits.task, labels_for_rule, splits.num_labels, splits.is_pair)
    spec = tasks.TaskSpec(splits.task, list(splits.label_names), metric, None, None, why)
    return model, tokenizer, splits, spec, max_length, origin(cfg, path, config), perm


def evaluate(cfg: TrainedConfig, model, tokenizer, splits, spec, max_length: int) -> dict:
    """The eval figures by training's own evaluation (bertopt.training.evaluate)."""
    from . import data as data_mod
    from . import modeling, training

    device = training.resolve_device(cfg.device)
    ds = data_mod.encoded_dataset(splits.eval, tokenizer, max_length, cfg.long_text, cfg.stride)
    loader = data_mod.make_loader(ds, cfg.eval_batch_size, shuffle=False, seed=cfg.seed,
                                  pad_id=tokenizer.pad_token_id or 0,
                                  with_token_type_ids=modeling.uses_token_type_ids(model),
                                  sep_id=tokenizer.sep_token_id if splits.is_pair else None)
    model.to(device)
    start = time.perf_counter()
    ev = training.evaluate(model, loader, device, spec=spec)
    model.to("cpu")
    return dict(ev, eval_time_s=round(time.perf_counter() - start, 3), device=str(device))


def _metrics(ev: dict, spec, model, splits) -> dict:
    """The baseline manifest's metric keys (training-only figures None)."""
    from . import modeling

    metrics = {"precision": "fp32", "device": ev["device"], "train_time_s": None, "train_samples": 0,
               "samples_per_s": None, "optimizer_steps": 0, "best_eval_accuracy": ev.get("accuracy"),
               "final_eval_accuracy": ev.get("accuracy"), "best_epoch": None, "best_step": None,
               "stopped_early": False, "resumed_from": None, "epochs": [], "loss_curve": [], "eval_curve": [],
               "eval_loss": ev.get("loss"), "eval_time_s": ev["eval_time_s"], "trained_here": False,
               **modeling.param_counts(model), "train_rows": 0, "data_train_rows": len(splits.train),
               "eval_rows": len(splits.eval)}
    if not spec.plain:
        metrics.update(metric=spec.metric, best_eval_metric=ev["metric"],
                       eval_metrics={k: v for k, v in ev.items() if k not in ("predictions", "metric", "device")})
    return metrics


def run_trained(cfg: TrainedConfig) -> StageResult:
    """Check, evaluate and write ``<output_dir>/baseline/`` from ``cfg.trained``."""
    from dataclasses import replace

    from .train_stage import data_record

    start = time.perf_counter()
    directory = artifacts.stage_dir(cfg.output_dir, STAGE)
    model, tokenizer, splits, spec, max_length, where, perm = _prepare(cfg)
    cfg = replace(cfg, max_length=max_length, model=cfg.trained)
    fp = artifacts.fingerprint({"stage": "trained", **result_config(cfg), "files": where["files"]})
    run = artifacts.stage_run(directory, STAGE, fp, force=cfg.force, log_as="trained")
    if run.current:
        log.info("baseline (--trained) is up to date (%s); --force re-runs it", artifacts.manifest_path(directory))
        return StageResult("trained", "up-to-date", time.perf_counter() - start, _line(run.current["metrics"]),
                           str(directory))
    ev = evaluate(cfg, model, tokenizer, splits, spec, max_length)
    metrics = _metrics(ev, spec, model, splits)
    with run:
        print_config("trained", cfg)
        log.info("reference: %s, trained elsewhere (%s); %s, %d eval rows, labels %s, max length %d",
                 cfg.trained, where["kind"], spec.task, len(splits.eval), splits.label_names, max_length)
        artifacts.save_model(model, tokenizer, run.directory)  # the working dir, swapped in by finish
        artifacts.atomic_write_json(run.directory / "labels.json", splits.label_names)
        run.finish(status="ok", config=cfg.to_dict(), inputs={"model": cfg.trained, "dataset": splits.source},
                   outputs=artifacts.list_files(run.directory), metrics=metrics, resumed=False, origin=where,
                   head_permutation=perm,
                   data={"source": splits.source, "label_names": splits.label_names, "eval_carved": splits.eval_carved,
                         "eval_only": cfg.eval_only, **data_record(cfg, splits, spec)})
    return StageResult("trained", "ok", time.perf_counter() - start, _line(metrics), str(directory))


def _line(metrics: dict) -> str:
    if metrics.get("metric"):
        return f"eval {metrics['metric']} {metrics['best_eval_metric']:.4f} (trained elsewhere)"
    return f"eval accuracy {metrics['best_eval_accuracy']:.4f} (trained elsewhere)"
