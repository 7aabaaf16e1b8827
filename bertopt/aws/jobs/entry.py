"""The training job's entry point, run by the SageMaker training toolkit inside the PyTorch DLC
(the archive's ``sagemaker_entry.py`` calls :func:`main`; with more than one GPU or node the toolkit starts it under
torchrun and every rank runs it). It reads the hyperparameters (``SM_HPS``, else
``<SM_INPUT_CONFIG_DIR>/hyperparameters.json``) and the channels (``SM_CHANNEL_TRAIN``, ``_MODEL``,
``_SOURCE``), runs the stage with the same code as a local run, writing under the checkpoint
directory (``/opt/ml/checkpoints``: S3-synced for managed spot, so the stage's own resume picks up),
and rank 0 copies the finished stage directory (without checkpoints) into ``SM_MODEL_DIR``, which
the toolkit uploads as model.tar.gz."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

STAGES = {"baseline": "baseline", "mixed_precision": "mixed_precision", "pruned": "prune"}  # dir -> stage table


def hyperparameters(env=os.environ) -> dict:
    if env.get("SM_HPS"):
        return json.loads(env["SM_HPS"])
    path = Path(env.get("SM_INPUT_CONFIG_DIR", "/opt/ml/input/config")) / "hyperparameters.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    out = {}
    for key, value in raw.items():  # every value is a JSON-encoded string
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def container_config(hps: dict, env=os.environ) -> tuple[str, dict]:
    """(stage directory name, the stage's config with the container's paths)."""
    stage = hps["bertopt_stage"]
    config = hps["bertopt_config"]
    if isinstance(config, str):
        config = json.loads(config)
    config = dict(config)
    if env.get("SM_CHANNEL_TRAIN"):
        config["dataset"] = os.path.join(env["SM_CHANNEL_TRAIN"], hps.get("bertopt_dataset_file") or "")
        config["dataset"] = config["dataset"].rstrip("/")
    if env.get("SM_CHANNEL_MODEL"):
        config["model"] = env["SM_CHANNEL_MODEL"]
    root = Path(env.get("BERTOPT_CHECKPOINT_DIR", "/opt/ml/checkpoints"))
    config["output_dir"] = str(root / "saved_models")
    config["reports_dir"] = str(root / "reports")
    if stage == "pruned" and env.get("SM_CHANNEL_SOURCE"):
        config["prune_source"] = env["SM_CHANNEL_SOURCE"]
    config["quiet"] = True
    return stage, config


def run(env=os.environ) -> int:
    from bertopt import artifacts, logs
    from bertopt.stages import by_name

    stage, config = container_config(hyperparameters(env), env)
    table = by_name()[STAGES[stage]]
    import argparse

    ns = argparse.Namespace(**config)
    cfg = table.build_config(ns)
    logs.configure(quiet=False)
    result = table.run(cfg)
    print(result.summary_line(), flush=True)
    if int(env.get("RANK", "0")) == 0 and result.status in ("ok", "up-to-date", "skipped"):
        src = artifacts.stage_dir(cfg.output_dir, stage)
        dest = Path(env.get("SM_MODEL_DIR", "/opt/ml/model")) / src.name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
        print(f"bertopt: {stage} -> {dest}", flush=True)
    return 0


def main() -> int:
    from bertopt.errors import PipelineError

    try:
        return run()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        # the toolkit reports a non-zero exit as the job's FailureReason (with the end of stderr)
        return 1
