"""Which model an endpoint serves: ``ModelChoice`` and ``resolve_model``, from ``--model-path``
(an .onnx file or a model directory), ``--variant`` (a compare row name, e.g. ort-int8) or, by
default, compare's recommendation in ``results.json``; each checked against the manifests of the
stages that produced it, with a digest of every input (so an unchanged deploy can be skipped).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import artifacts, model_files
from .. import results as results_mod
from .. import variants as registry
from ..errors import ConfigError, MissingArtifact, ModelError, PipelineError

log = logging.getLogger("bertopt.aws.choice")

FILE_BACKENDS = ("onnxruntime", "openvino")  # backends served from one model file (+ its companions)
TORCH_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
TORCH_ALIASES = ("torch", "pytorch", "torch-fp32", "pt")
LATENCY_MARGIN = 1.10   # latency_note: the lowest-latency row must be this much faster at p50 than the pick


@dataclass
class ModelChoice:
    """The model an endpoint serves."""

    variant: str            # ort-int8, ort-fp32, torch-fp32, ...
    backend: str            # onnxruntime | torch
    precision: str          # fp32 | fp16 | int8 | int4
    path: Path              # the .onnx file, or the model directory for torch
    model_dir: Path         # tokenizer files + config.json
    label_names: list
    max_length: int
    origin: str             # how it was chosen (for the log and the manifest)
    source: Optional[str] = None
    devices: tuple = ("cpu",)
    inputs: dict = field(default_factory=dict)  # input path -> digest (skip fingerprint)

    def describe(self) -> dict:
        return {"variant": self.variant, "backend": self.backend, "precision": self.precision,
                "source": self.source, "path": str(self.path), "model_dir": str(self.model_dir),
                "label_names": list(self.label_names), "max_length": self.max_length, "origin": self.origin}


# ------------------------------------------------------------------------------- model choice
def _file_digest(path: Path, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def _config_labels(model_dir: Path) -> list:
    try:
        id2label = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("id2label") or {}
        return [id2label[k] for k in sorted(id2label, key=int)]
    except (OSError, ValueError, KeyError):
        return []


def _manifest_max_length(*manifests, default: int) -> int:
    for m in manifests:
        value = ((m or {}).get("config") or {}).get("max_length")
        if isinstance(value, int) and value > 0:
            return value
    return default


def _precision_from_name(name: str) -> str:
    for p in ("int4", "int8", "fp16"):
        if p in name:
            return p
    return "int8" if "qdq" in name or "qat" in name else "fp32"


def _variant_from_file(path: Path) -> str:
    """The registry's row name for an ONNX-stage file (model.int8.onnx -> ort-int8, model.ov-int8.xml
    -> ov-int8); else ort-<middle part> (model.onnx -> ort-fp32)."""
    backend = _file_backend(path)
    spec = next((s for s in registry.for_stage("onnx") if s.file == path.name and s.backend == backend), None)
    if spec is not None:
        return spec.name
    parts = path.name.split(".")
    return ("ov-" if backend == "openvino" else "ort-") + (parts[1] if len(parts) > 2 else "fp32")


def _file_backend(path: Path) -> str:
    return "openvino" if path.suffix == ".xml" else "onnxruntime"   # OpenVINO IR: .xml beside its .bin


def _check_model_dir(model_dir: Path, what: str) -> None:
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{what}: no config.json in {model_dir} (the model's config and tokenizer must be there)")
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model")):
        raise ModelError(f"{what}: no tokenizer files (tokenizer.json / vocab.txt) in {model_dir}")


def _onnx_variant_info(onnx_dir: Path, file_name: str) -> tuple[dict | None, dict | None]:
    """(the onnx stage manifest of a directory, the entry of the variant stored in file_name)."""
    manifest = artifacts.read_manifest(onnx_dir)
    if not manifest or manifest.get("stage") != "onnx":
        return None, None
    for entry in ((manifest.get("metrics") or {}).get("variants") or {}).values():
        if entry.get("file") == file_name:
            return manifest, entry
    return manifest, None


def _from_path(cfg) -> ModelChoice:
    p = Path(cfg.model_path).expanduser()
    what = f"--model-path {cfg.model_path}"
    if p.is_file() and p.suffix == ".xml" and not p.with_suffix(".bin").is_file():
        raise ModelError(f"{what}: OpenVINO IR without its weights {p.with_suffix('.bin').name}")
    if p.is_file() and p.suffix in (".onnx", ".xml"):
        onnx_file, model_dir = p, p.parent
    elif p.is_dir() and any((p / w).is_file() for w in TORCH_WEIGHTS):
        _check_model_dir(p, what)
        manifest = artifacts.read_manifest(p)
        return ModelChoice(variant="torch-fp32", backend="torch", precision="fp32", path=p, model_dir=p,
                           label_names=_config_labels(p),
                           max_length=_manifest_max_length(manifest, default=cfg.max_length),
                           origin=what, source=(manifest or {}).get("stage"), devices=("cpu", "cuda"),
                           inputs={str(p): artifacts.manifest_digest(p) or _file_digest(p / "config.json")})
    elif p.is_dir() and (p / "model.onnx").is_file():
        onnx_file, model_dir = p / "model.onnx", p
    elif not p.exists():
        raise ModelError(f"{what}: no such file or directory")
    else:
        raise ModelError(f"{what}: expected an .onnx file, an OpenVINO .xml or a save_pretrained model directory")
    _check_model_dir(model_dir, what)
    manifest, entry = _onnx_variant_info(model_dir, onnx_file.name)
    metrics = (manifest or {}).get("metrics") or {}
    return ModelChoice(variant=_variant_from_file(onnx_file), backend=_file_backend(onnx_file),
                       precision=(entry or {}).get("precision") or _precision_from_name(onnx_file.name),
                       path=onnx_file, model_dir=model_dir,
                       label_names=metrics.get("label_names") or _config_labels(model_dir),
                       max_length=_manifest_max_length(manifest, default=cfg.max_length), origin=what,
                       source=metrics.get("source"), devices=tuple((entry or {}).get("devices") or ("cpu",)),
                       inputs={str(f): _file_digest(f) for f in model_files.model_files(onnx_file)})


def _parse_variant(spec: str) -> tuple[str, str]:
    """'baseline:int8' -> ('baseline', 'int8'); 'ort-int8' -> ('baseline', 'int8'); 'torch' -> (.., 'torch')."""
    source, _, name = spec.rpartition(":")
    name = name.strip().lower()
    if name.startswith("ort-"):
        name = name[4:]
    if name in TORCH_ALIASES:
        name = "torch"
    return (source or "baseline").strip(), name


def _from_variant(cfg) -> ModelChoice:
    source, name = _parse_variant(cfg.variant)
    if source not in artifacts.TRAINED_STAGES:
        raise ConfigError(f"--variant {cfg.variant}: unknown source {source!r} "
                          f"(one of {', '.join(artifacts.TRAINED_STAGES)})")
    if name == "torch":
        model_dir = artifacts.stage_dir(cfg.output_dir, source)
        manifest = artifacts.require_manifest(model_dir, source)
        return ModelChoice(variant="torch-fp32", backend="torch", precision="fp32", path=model_dir,
                           model_dir=model_dir, label_names=_config_labels(model_dir),
                           max_length=_manifest_max_length(manifest, default=cfg.max_length),
                           origin=f"--variant {cfg.variant}", source=source, devices=("cpu", "cuda"),
                           inputs={str(model_dir): artifacts.manifest_digest(model_dir)})
    onnx_dir = artifacts.stage_dir(cfg.output_dir, "onnx") / source
    manifest = artifacts.require_manifest(onnx_dir, "onnx")
    metrics = manifest.get("metrics") or {}
    variants = metrics.get("variants") or {}
    usable = sorted(k for k, v in variants.items() if v.get("status") == "ok")
    entry = variants.get(name)
    if entry is None:
        raise ConfigError(f"--variant {cfg.variant}: {onnx_dir} has no variant {name!r} "
                          f"(usable: {', '.join(usable) or 'none'}; or torch)")
    if entry.get("status") != "ok":
        raise PipelineError(f"--variant {cfg.variant}: variant {name} has status {entry.get('status')} "
                            f"({entry.get('reason') or 'no reason recorded'}); usable: {', '.join(usable) or 'none'}")
    path = onnx_dir / entry["file"]
    if not path.is_file():
        raise MissingArtifact(path, artifacts.producing_command("onnx"))
    spec = registry.by_key("onnx", name)   # the backend that serves it: ONNX Runtime or OpenVINO
    return ModelChoice(variant=spec.name if spec else f"ort-{name}", backend=spec.backend if spec else "onnxruntime",
                       precision=entry.get("precision", "fp32"), path=path, model_dir=onnx_dir,
                       label_names=metrics.get("label_names") or _config_labels(onnx_dir),
                       max_length=_manifest_max_length(manifest, default=cfg.max_length),
                       origin=f"--variant {cfg.variant}", source=source,
                       devices=tuple(entry.get("devices") or ("cpu",)),
                       inputs={str(onnx_dir): artifacts.manifest_digest(onnx_dir)})


def results_path(cfg) -> Path:
    return artifacts.results_path(cfg.reports_dir)


def _from_recommendation(cfg) -> ModelChoice:
    path = results_path(cfg)
    if not path.is_file():
        raise PipelineError(f"missing input {path} (run `python compare.py` first, or choose the model "
                            "with --variant NAME or --model-path PATH)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot read {path}: {exc} (re-run `python compare.py`)") from None
    rec = results.get("recommendation")
    if not rec:
        raise PipelineError(f"{path} holds no recommendation (compare.py found no variant to recommend); "
                            "choose the model with --variant NAME or --model-path PATH")
    backend = rec.get("backend")
    what = f"the recommendation in {path} ({rec.get('variant')})"
    if backend == "tensorrt":
        raise PipelineError(f"{what} is a TensorRT engine, which is built for one GPU model and does not run "
                            "in the Hugging Face inference container; deploy an ONNX variant with --variant "
                            "(e.g. --variant fp16 on a GPU instance) or --variant torch")
    spec = registry.REGISTRY.get(rec.get("registry") or "")
    if backend not in ("torch",) + FILE_BACKENDS or (spec is not None and not spec.deployable):
        raise PipelineError(f"{what}: backend {backend!r} cannot be served by the endpoint handler")
    model_dir = Path(rec.get("model_dir") or rec.get("path") or "")
    model_path = Path(rec["path"]) if rec.get("path") else None
    if backend in FILE_BACKENDS and (model_path is None or model_path.is_dir()):
        # a row that names its ONNX variant rather than the file: look the file up in the stage manifest
        manifest = artifacts.read_manifest(model_dir) or {}
        entry = ((manifest.get("metrics") or {}).get("variants") or {}).get(rec.get("onnx_variant") or "")
        model_path = model_dir / entry["file"] if entry else None
    if model_path is None or not model_path.exists():
        raise MissingArtifact(model_path or model_dir, artifacts.producing_command(
            "onnx" if backend in FILE_BACKENDS else (rec.get("source") or "baseline")))
    if backend == "torch" and not rec.get("model_dir"):
        model_dir = model_path
    _check_model_dir(model_dir, what)
    if backend in FILE_BACKENDS:
        manifest, entry = _onnx_variant_info(model_path.parent, model_path.name)
        identity = artifacts.manifest_digest(model_path.parent) or "".join(
            _file_digest(f) for f in model_files.model_files(model_path))  # its external data / .bin too
    else:
        manifest, entry = artifacts.read_manifest(model_path), None
        identity = artifacts.manifest_digest(model_path) or _file_digest(model_path / "config.json")
    if rec.get("device") == "cuda" and not getattr(cfg, "gpu", False):
        raise PipelineError(f"{what} was measured on cuda; deploy it on a GPU --instance-type (e.g. ml.g5.xlarge) "
                            "or choose a CPU variant with --variant (or re-run compare.py --target cpu)")
    note = None if getattr(cfg, "local", False) and getattr(cfg, "batching", True) else latency_note(results)
    if note:
        log.warning("%s", note)
    metrics = (manifest or {}).get("metrics") or {}
    return ModelChoice(variant=rec.get("variant") or (_variant_from_file(model_path) if backend in FILE_BACKENDS
                                                      else "torch-fp32"),
                       backend=backend, precision=rec.get("precision") or (entry or {}).get("precision") or "fp32",
                       path=model_path, model_dir=model_dir,
                       label_names=metrics.get("label_names") or _config_labels(model_dir),
                       max_length=_manifest_max_length(manifest, default=cfg.max_length),
                       origin=f"recommendation in {path}", source=rec.get("source"),
                       devices=tuple((entry or {}).get("devices") or (("cpu", "cuda") if backend == "torch" else ("cpu",))),
                       # what is deployed, not the whole results.json (re-measuring must not force a re-deploy)
                       inputs={str(model_path): identity, "variant": rec.get("variant")})


def latency_note(results: dict) -> Optional[str]:
    """For a recommendation chosen by throughput (batched passes over the eval set): the eligible
    row with the lowest single-request p50, when it beats the recommendation by LATENCY_MARGIN. A
    SageMaker real-time endpoint's model server hands each worker one request at a time, so that is
    its speed (AMD EPYC: ov-int8 recommended at 3.70 ms p50, ort-int8 2.45 ms)."""
    if results_mod.get(results, "config", "optimize_for", default="throughput") != "throughput":
        return None
    eligible = {v.get("variant") for v in results.get("eligibility") or [] if v.get("eligible")}
    p50 = {r["name"]: _p50(r) for r in results.get("variants") or [] if r.get("name") in eligible and _deployable(r)}
    p50 = {name: v for name, v in p50.items() if v}
    chosen = results_mod.get(results, "recommendation", "variant")
    if chosen not in p50:
        return None
    best = min(p50, key=p50.get)
    if p50[chosen] < LATENCY_MARGIN * p50[best]:
        return None
    row = next(r for r in results["variants"] if r["name"] == best)
    by_flag = row.get("source") == "baseline" and (row.get("backend") in FILE_BACKENDS or best in TORCH_ALIASES)
    return (f"{chosen} is compare's pick for throughput (batched passes over the eval set); a real-time endpoint "
            f"answers one request at a time per worker, where {best} took {p50[best]:.2f} ms p50 against "
            f"{p50[chosen]:.2f} ms ({p50[chosen] / p50[best]:.2f}x): `python compare.py --report-only --optimize-for "
            f"latency` re-chooses from the same measurements" + (f", or deploy it with --variant {best}" if by_flag else ""))


def _p50(row: dict) -> Optional[float]:
    value = results_mod.get(row, "latency", "e2e_ms", "p50")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _deployable(row: dict) -> bool:
    spec = registry.REGISTRY.get(row.get("registry") or "")
    return spec.deployable if spec is not None else row.get("backend") in ("torch",) + FILE_BACKENDS


def resolve_model(cfg) -> ModelChoice:
    """--model-path, else --variant, else compare.py's recommendation."""
    if getattr(cfg, "model_path", None):
        choice = _from_path(cfg)
    elif getattr(cfg, "variant", None):
        choice = _from_variant(cfg)
    else:
        choice = _from_recommendation(cfg)
    gpu = bool(getattr(cfg, "gpu", False))
    if choice.backend == "onnxruntime" and not gpu and "cpu" not in choice.devices:
        raise PipelineError(f"{choice.variant} runs on {'/'.join(choice.devices)} only; deploy it on a GPU "
                            "--instance-type (e.g. ml.g5.xlarge) or choose a CPU variant with --variant")
    if not choice.label_names:
        raise ModelError(f"{choice.model_dir}: no label names (config.json has no id2label)")
    return choice


