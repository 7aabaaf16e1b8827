"""The stage table main.py runs, in order: name, script, flags, config builder, run function,
whether it is optional (and what enables it) and its main.py defaults. Stage modules are imported
only when their function is called (:func:`_lazy`), so ``--help`` stays light."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from . import cli
from .config import TrainConfig
from .errors import ConfigError


@dataclass(frozen=True)
class Stage:
    name: str
    script: str
    description: str
    add_args: Callable[[argparse.ArgumentParser], None]
    build_config: Callable[[argparse.Namespace], object]
    run: Callable[[object], cli.StageResult]
    optional: bool = False  # optional stages run only when enabled_by(ns) says so
    enabled_by: Callable[[argparse.Namespace], bool] | None = None
    # main.py's end-to-end defaults for this stage's unset flags: (ns, names of the stages that
    # will run) -> {dest: value}; the stage scripts alone keep their dataclass defaults
    pipeline_defaults: Callable[[argparse.Namespace, set], dict] | None = None
    # main.py leaves the stage out when this says so (the training stages under --trained)
    replaced_by: Callable[[argparse.Namespace], bool] | None = None


def _lazy(module: str, name: str):
    """A function that imports ``bertopt.<module>`` only when called (keeps --help light)."""
    def call(*args):
        import importlib

        return getattr(importlib.import_module(f"bertopt.{module}"), name)(*args)

    return call


def _here_or_sagemaker(stage: str, local):
    """``local(cfg)``, or with --sagemaker-instance-type the same stage as a SageMaker training job."""
    def call(cfg):
        if getattr(cfg, "sagemaker_instance_type", None):
            from .aws.jobs.training import run_remote

            return run_remote(cfg, stage)
        return local(cfg)

    return call


def add_baseline_args(parser):
    cli.add_common_args(parser)
    cli.add_train_args(parser)


def add_mixed_args(parser):
    add_baseline_args(parser)
    g = parser.add_argument_group("mixed precision")
    cli.add(g, "--precision", choices=("amp", "fp16", "bf16"),
            help="amp (default) = bf16 where the device has native bf16 math, else fp16 + GradScaler on CUDA")


def build_baseline(ns):
    return cli.build_config(TrainConfig, ns, precision="fp32")


def build_mixed(ns):
    return cli.build_config(TrainConfig, ns, precision=getattr(ns, "precision", None) or "amp")


def _trained(ns) -> bool:
    return bool(getattr(ns, "trained", None))


def add_trained_stage_args(parser):
    cli.add_common_args(parser)
    cli.add_trained_args(parser)


def build_trained(ns):
    from .trained_stage import TrainedConfig

    return cli.build_config(TrainedConfig, ns)


TRAINED = Stage("trained", "benchmark.py --trained", "a model fine-tuned elsewhere as the FP32 reference "
                "(writes the baseline stage's directory; enabled by --trained, which skips the training stages)",
                add_trained_stage_args, build_trained, _lazy("trained_stage", "run_trained"), optional=True,
                enabled_by=_trained)
BASELINE = Stage("baseline", "benchmark.py", "FP32 baseline fine-tune (the reference every variant is measured against)",
                 add_baseline_args, build_baseline,
                 _here_or_sagemaker("baseline", _lazy("train_stage", "run_baseline")), replaced_by=_trained)
MIXED_PRECISION = Stage("mixed_precision", "mixed_precision.py",
                        "mixed-precision (AMP) fine-tune; skipped where the hardware has no fast half-precision math",
                        add_mixed_args, build_mixed,
                        _here_or_sagemaker("mixed_precision", _lazy("train_stage", "run_mixed_precision")),
                        replaced_by=_trained)


def add_prune_args(parser, standalone: bool = False):
    add_baseline_args(parser)
    g = parser.add_argument_group("layer pruning")
    cli.add(g, "--prune-layers", type=int, metavar="K", help="remove K encoder layers (enables the prune stage)")
    cli.add(g, "--target-layers", type=int, metavar="N", help="prune down to N encoder layers (enables the prune stage)")
    # prune.py alone also takes --source; in main.py --source belongs to onnx_tensorrt (stage names)
    cli.add(g, "--prune-source", *(("--source",) if standalone else ()), dest="prune_source", metavar="DIR",
            help="model dir to prune (default: the baseline stage of --output-dir)")
    cli.add(g, "--method", "--sensitivity-method", dest="method", choices=("removal", "gradient"),
            help="layer sensitivity: removal = eval accuracy with each layer removed (default); "
                 "gradient = gradient x activation estimate (one pass, for deep models)")
    cli.add(g, "--sensitivity-samples", type=cli._optional_count, metavar="N|all",
            help="eval rows used for the sensitivity analysis (default: all)")
    cli.add(g, "--distill", action="store_true", default=None,
            help="re-fine-tune with KL on the unpruned model's soft targets + CE (the default)")
    cli.add(g, "--no-distill", dest="distill", action="store_false", default=None,
            help="re-fine-tune with the plain task loss instead of distilling from the unpruned model")
    cli.add(g, "--distill-alpha", type=float, metavar="A", help="weight of the distillation term (default: 0.5)")
    cli.add(g, "--distill-temperature", type=float, metavar="T", help="softmax temperature (default: 2.0)")


    w = parser.add_argument_group("width pruning and the compression search")
    cli.add(w, "--heads", type=int, metavar="K", help="keep K attention heads in every layer (enables the prune stage)")
    cli.add(w, "--ffn-width", type=int, metavar="W", help="keep W FFN neurons in every layer (enables the prune stage)")
    cli.add(w, "--compress", choices=("auto", "none"),
            help="auto = search depth x heads x FFN width for the fastest shape within --search-accuracy-budget "
                 "(enables the prune stage)")
    cli.add(w, "--auto", dest="compress", action="store_const", const="auto", help="same as --compress auto")
    cli.add(w, "--time-budget", type=float, metavar="S", help="seconds of KD fine-tuning per searched shape (default 90)")
    cli.add(w, "--search-accuracy-budget", type=float, metavar="F",
            help="largest metric drop (fraction, 0.01 = 1 point) a searched shape may show against the unpruned "
                 "model on the search split carved from train (compare's --accuracy-budget is another)")
    cli.add(w, "--search-rows", type=int, metavar="N", help="rows of the search split carved from train (default 1000)")
    cli.add(w, "--importance-rows", type=int, metavar="N",
            help="training rows the head / FFN-neuron importance is accumulated over (default 512)")
    cli.add(w, "--max-candidates", type=int, metavar="N", help="shapes fine-tuned at most by the search (default 6)")


def _prune_enabled(ns) -> bool:
    return any(getattr(ns, n, None) is not None for n in ("prune_layers", "target_layers", "heads", "ffn_width")) \
        or getattr(ns, "compress", None) == "auto"


def build_prune(ns):
    from pathlib import Path

    from .config import PruneConfig

    if _trained(ns) and Path(getattr(ns, "dataset", None) or "").is_file():
        raise ConfigError(f"prune re-fine-tunes the --trained model and needs training data, but --dataset "
                          f"{ns.dataset} is one file, which --trained evaluates on: give a directory with "
                          "train and dev files")

    return cli.build_config(PruneConfig, ns, precision="fp32")


PRUNE = Stage("prune", "prune.py",
              "structured depth/width pruning + distilled re-fine-tune (enabled by --prune-layers, --target-layers, "
              "--heads, --ffn-width or --compress auto)",
              add_prune_args, build_prune, _here_or_sagemaker("pruned", _lazy("prune_stage", "run_prune")), optional=True,
              enabled_by=_prune_enabled)

def _onnx_pipeline_defaults(ns, running: set) -> dict:
    # the ONNX graphs of the mixed-precision model are the baseline's graphs with other weights
    # (same speed); exporting and timing them again would double the default run's compare
    return {"source": ",".join(["baseline"] + (["pruned"] if "prune" in running else []))}


ONNX_TENSORRT = Stage("onnx_tensorrt", "onnx_tensorrt.py",
                      "ONNX export + parity, ONNX Runtime variants (fused, INT8, INT4, FP16, QDQ), OpenVINO FP32/BF16/INT8 "
                      "(OpenVINO rows where its wheels exist), TensorRT engines (skipped without an NVIDIA GPU)",
                      _lazy("onnx_stage", "add_args"), _lazy("onnx_stage", "build_config"), _lazy("onnx_stage", "run"),
                      pipeline_defaults=_onnx_pipeline_defaults)
QAT = Stage("qat", "qat.py",
            "quantization-aware INT8 training (nvidia-modelopt) + one Q/DQ ONNX for ONNX Runtime, OpenVINO and "
            "TensorRT (enabled by --qat; skipped with the reason where ModelOpt is missing or cannot quantize)",
            _lazy("qat_stage", "add_args"), _lazy("qat_stage", "build_config"), _lazy("qat_stage", "run"),
            optional=True, enabled_by=lambda ns: bool(getattr(ns, "qat", None)))
COMPARE = Stage("compare", "compare.py",
                "measure every variant (accuracy, throughput, latency, sweep, memory, efficiency), recommend one, "
                "write reports/results.json and the HTML report",
                _lazy("compare.config", "add_compare_args"), _lazy("compare.config", "build_compare"),
                _lazy("compare.stage", "run"), pipeline_defaults=lambda ns, running: {"protocol_name": "fast"})

STAGES: list[Stage] = [TRAINED, BASELINE, MIXED_PRECISION, PRUNE, ONNX_TENSORRT, QAT, COMPARE]


def by_name() -> dict[str, Stage]:
    return {s.name: s for s in STAGES}


# ---- AWS (optional; keep these last: the deploy reads compare.py's recommendation) ----
AWS_DEPLOY = Stage("aws_deploy", "aws_deploy.py",
                   "SageMaker endpoint for the recommended model (enabled by --aws_account_id / --aws_role_arn)",
                   _lazy("aws.config", "add_deploy_args"), _lazy("aws.config", "build_deploy"), _lazy("aws.deploy", "run"),
                   optional=True, enabled_by=_lazy("aws.config", "deploy_enabled"))
AWS_CLEANUP = Stage("aws_cleanup", "aws_cleanup.py", "delete every AWS resource the deploy created (enabled by --cleanup_aws)",
                    _lazy("aws.config", "add_cleanup_args"), _lazy("aws.config", "build_cleanup"),
                    _lazy("aws.cleanup", "run"), optional=True, enabled_by=_lazy("aws.config", "cleanup_enabled"))
STAGES += [AWS_DEPLOY, AWS_CLEANUP]
