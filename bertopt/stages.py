"""The stage table main.py runs, in order: name, script, flags, config builder, run function,
whether it is optional (and what enables it) and its main.py defaults. Stage modules are imported
only when their function is called (:func:`_lazy`), so ``--help`` stays light."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from . import cli
from .config import TrainConfig


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


def _lazy(module: str, name: str):
    """A function that imports ``bertopt.<module>`` only when called (keeps --help light)."""
    def call(*args):
        import importlib

        return getattr(importlib.import_module(f"bertopt.{module}"), name)(*args)

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


BASELINE = Stage("baseline", "benchmark.py", "FP32 baseline fine-tune (the reference every variant is measured against)",
                 add_baseline_args, build_baseline, _lazy("train_stage", "run_baseline"))
MIXED_PRECISION = Stage("mixed_precision", "mixed_precision.py",
                        "mixed-precision (AMP) fine-tune; skipped where the hardware has no fast half-precision math",
                        add_mixed_args, build_mixed, _lazy("train_stage", "run_mixed_precision"))


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
            help="re-fine-tune with KL on the unpruned model's soft targets + CE")
    cli.add(g, "--distill-alpha", type=float, metavar="A", help="weight of the distillation term (default: 0.5)")
    cli.add(g, "--distill-temperature", type=float, metavar="T", help="softmax temperature (default: 2.0)")


def build_prune(ns):
    from .config import PruneConfig

    return cli.build_config(PruneConfig, ns, precision="fp32")


PRUNE = Stage("prune", "prune.py",
              "greedy structured layer pruning + re-fine-tune (enabled by --prune-layers or --target-layers)",
              add_prune_args, build_prune, _lazy("prune_stage", "run_prune"), optional=True,
              enabled_by=lambda ns: getattr(ns, "prune_layers", None) is not None
              or getattr(ns, "target_layers", None) is not None)

def _onnx_pipeline_defaults(ns, running: set) -> dict:
    # the ONNX graphs of the mixed-precision model are the baseline's graphs with other weights
    # (same speed); exporting and timing them again would double the default run's compare
    return {"source": ",".join(["baseline"] + (["pruned"] if "prune" in running else []))}


ONNX_TENSORRT = Stage("onnx_tensorrt", "onnx_tensorrt.py",
                      "ONNX export + parity, ONNX Runtime variants (fused, INT8, INT4, FP16, QDQ), OpenVINO FP32/INT8 "
                      "(with requirements-openvino.txt), TensorRT engines (skipped without an NVIDIA GPU)",
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

STAGES: list[Stage] = [BASELINE, MIXED_PRECISION, PRUNE, ONNX_TENSORRT, QAT, COMPARE]


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
