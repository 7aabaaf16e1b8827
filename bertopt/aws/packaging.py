"""Choose the model to deploy and build ``model.tar.gz`` in the SageMaker layout.

Archive root: the model (an ONNX file plus any external-data files, or a save_pretrained PyTorch
model), its tokenizer files and config.json, ``serving.json`` (backend, file, labels, limits), and
``code/`` with ``inference.py`` (a verbatim copy of ``bertopt/aws/serving/inference.py``),
``bertopt_runtime/`` (the project modules the handler imports, copied verbatim: one source of
truth), ``requirements.txt`` and optionally ``wheels/``.

The archive is byte-for-byte reproducible (sorted members, fixed times and owners, gzip mtime 0),
so its sha256 identifies what is deployed.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import artifacts
from ..errors import ConfigError, MissingArtifact, ModelError, PipelineError

log = logging.getLogger("bertopt.aws.packaging")

PACKAGE_DIR = Path(__file__).resolve().parents[1]          # bertopt/
HANDLER_SOURCE = Path(__file__).resolve().parent / "serving" / "inference.py"
VENDORED_PACKAGE = "bertopt_runtime"
# what serving/inference.py uses from bertopt (module -> symbols)
VENDOR_ROOTS = {"runtimes": ("OrtPredictor", "TorchPredictor", "OpenVinoPredictor"), "data": ("tokenize", "pad_batch")}
FILE_BACKENDS = ("onnxruntime", "openvino")  # backends served from one model file (+ its companions)
ARCHIVE_NAME = "model.tar.gz"
FIXED_MTIME = 946684800                                       # 2000-01-01: reproducible archives
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja")
TORCH_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
TORCH_ALIASES = ("torch", "pytorch", "torch-fp32", "pt")


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


@dataclass
class ArchiveInfo:
    path: Path
    sha256: str
    size_bytes: int
    members: list


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
    return "int8" if "qdq" in name else "fp32"


def _variant_from_file(path: Path) -> str:
    parts = path.name.split(".")  # model.int8.onnx -> int8; model.onnx -> fp32
    return "ort-" + (parts[1] if len(parts) > 2 else "fp32")


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
    if p.is_file() and p.suffix == ".onnx":
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
        raise ModelError(f"{what}: expected an .onnx file or a save_pretrained model directory")
    _check_model_dir(model_dir, what)
    manifest, entry = _onnx_variant_info(model_dir, onnx_file.name)
    metrics = (manifest or {}).get("metrics") or {}
    return ModelChoice(variant=_variant_from_file(onnx_file), backend="onnxruntime",
                       precision=(entry or {}).get("precision") or _precision_from_name(onnx_file.name),
                       path=onnx_file, model_dir=model_dir,
                       label_names=metrics.get("label_names") or _config_labels(model_dir),
                       max_length=_manifest_max_length(manifest, default=cfg.max_length), origin=what,
                       source=metrics.get("source"), devices=tuple((entry or {}).get("devices") or ("cpu",)),
                       inputs={str(onnx_file): _file_digest(onnx_file)})


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
    return ModelChoice(variant=f"ort-{name}", backend="onnxruntime", precision=entry.get("precision", "fp32"),
                       path=path, model_dir=onnx_dir, label_names=metrics.get("label_names") or _config_labels(onnx_dir),
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
    from .. import variants

    spec = variants.REGISTRY.get(rec.get("registry") or "")
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
        identity = artifacts.manifest_digest(model_path.parent) or _file_digest(model_path)
    else:
        manifest, entry = artifacts.read_manifest(model_path), None
        identity = artifacts.manifest_digest(model_path) or _file_digest(model_path / "config.json")
    if rec.get("device") == "cuda" and not getattr(cfg, "gpu", False):
        raise PipelineError(f"{what} was measured on cuda; deploy it on a GPU --instance-type (e.g. ml.g5.xlarge) "
                            "or choose a CPU variant with --variant (or re-run compare.py --target cpu)")
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


# ---------------------------------------------------------------------------- vendored modules
def _relative_imports(nodes) -> list[str]:
    out = []
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.ImportFrom) and sub.level == 1:
                out += [sub.module.split(".")[0]] if sub.module else [a.name for a in sub.names]
    return out


def vendored_modules(roots=VENDOR_ROOTS) -> list[str]:
    """The bertopt modules the handler needs inside the container: for each root module the
    relative imports at module level and inside the symbols the handler uses; for every module
    reached from there, all its relative imports (transitively)."""
    seen, todo = set(), []

    def tree(name):
        path = PACKAGE_DIR / f"{name}.py"
        if not path.is_file():
            raise PipelineError(f"cannot vendor bertopt.{name}: {path} not found")
        return ast.parse(path.read_text(encoding="utf-8"))

    for name, symbols in roots.items():
        seen.add(name)
        body = tree(name).body
        top = [n for n in body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        used = [n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in symbols]
        missing = set(symbols) - {n.name for n in used}
        if missing:
            raise PipelineError(f"bertopt.{name} has no {', '.join(sorted(missing))} (the serving handler needs it)")
        todo += _relative_imports(top + used)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _relative_imports([tree(name)])
    return sorted(seen)


# ------------------------------------------------------------------------------- requirements
def _ort_version() -> str:
    from importlib import metadata

    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    raise PipelineError("onnxruntime is not installed here, so the version to pin for the endpoint is "
                        "unknown (pip install -r requirements.txt)")


def requirements(choice: ModelChoice, gpu: bool) -> list[str]:
    """What the container must pip-install beyond the Hugging Face DLC (torch, transformers, numpy)."""
    if choice.backend == "onnxruntime":
        if gpu:  # the CUDA major of the container, not of this machine
            from .config import GPU_ORT_REQUIREMENT

            return [GPU_ORT_REQUIREMENT]
        return [f"onnxruntime=={_ort_version()}"]
    if choice.backend == "openvino":
        return [f"openvino=={artifacts._version('openvino')}"]
    return []


def check_wheels(directory: str, reqs: list[str], python: str) -> list[Path]:
    """The wheels of ``directory``; ConfigError when a requirement has no wheel there."""
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

    wheels = sorted(Path(directory).glob("*.whl"))
    if not wheels:
        raise ConfigError(f"--vendor-wheels {directory}: no .whl files there")
    found, pytag = {}, "cp" + python.replace(".", "")
    for w in wheels:
        try:
            name, version, _, tags = parse_wheel_filename(w.name)
        except InvalidWheelFilename:
            raise ConfigError(f"--vendor-wheels {directory}: {w.name} is not a valid wheel file name") from None
        found.setdefault(canonicalize_name(name), []).append(str(version))
        if not any(t.interpreter in (pytag, "py3", f"py{python.split('.')[0]}") or t.abi == "abi3" for t in tags):
            log.warning("--vendor-wheels: %s is not for Python %s (the container's); pip will skip it", w.name, python)
    missing = []
    for req in reqs:
        from packaging.requirements import Requirement

        r = Requirement(req)
        versions = found.get(canonicalize_name(r.name), [])
        if not any(r.specifier.contains(v, prereleases=True) for v in versions):
            missing.append(req)
    if missing:
        raise ConfigError(
            f"--vendor-wheels {directory}: no wheel for {', '.join(missing)}; fetch them (with their "
            f"dependencies) for the container's Python {python}: pip download {' '.join(missing)} "
            f"--only-binary=:all: --platform manylinux2014_x86_64 --python-version {python} -d {directory}")
    return wheels


def requirements_text(reqs: list[str], vendored: bool) -> str:
    lines = ["# installed by the SageMaker inference toolkit at start-up: pip install -r code/requirements.txt"]
    if vendored:
        lines += ["# vendored wheels: installs under network isolation", "--no-index", "--find-links wheels"]
    lines += reqs or ["# nothing beyond the Hugging Face inference container"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ archive
def _onnx_external_files(onnx_file: Path) -> list[Path]:
    """External-data files an ONNX model refers to (they must travel with it)."""
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    names = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    names.add(entry.value)
    files = []
    for name in sorted(names):
        path = (onnx_file.parent / name).resolve()
        if not path.is_file():
            raise ModelError(f"{onnx_file}: its external data file {name} is missing")
        files.append(path)
    return files


def serving_settings(choice: ModelChoice, cfg) -> dict:
    return {"variant": choice.variant, "backend": choice.backend, "precision": choice.precision,
            "source": choice.source,
            "model_file": choice.path.name if choice.backend in FILE_BACKENDS else None,
            "label_names": list(choice.label_names), "max_length": choice.max_length,
            "max_batch": cfg.max_batch, "max_chars": cfg.max_chars,
            # micro-batching (-1 = off); the SageMaker container's environment sets its own (instances.py)
            "batch_wait_ms": float(cfg.batch_wait_ms) if getattr(cfg, "batching", True) else -1.0,
            "batch_max_texts": int(getattr(cfg, "batch_max_texts", 64)),
            "device": "cuda" if getattr(cfg, "gpu", False) else "cpu"}


def archive_members(choice: ModelChoice, cfg) -> list[tuple[str, object]]:
    """(archive name, source Path or bytes) for every member of model.tar.gz."""
    members: dict[str, object] = {}
    if choice.backend == "onnxruntime":
        members[choice.path.name] = choice.path
        for f in _onnx_external_files(choice.path):
            members[f.name] = f
    elif choice.backend == "openvino":  # model.onnx, or OpenVINO IR: the .xml and its .bin weights
        members[choice.path.name] = choice.path
        if choice.path.suffix == ".xml":
            members[choice.path.with_suffix(".bin").name] = choice.path.with_suffix(".bin")
    else:
        for name in TORCH_WEIGHTS:
            if (choice.path / name).is_file():
                members[name] = choice.path / name
        for f in sorted(choice.path.glob("model-*.safetensors")) + sorted(choice.path.glob("pytorch_model-*.bin")):
            members[f.name] = f
    for name in TOKENIZER_FILES:
        if (choice.model_dir / name).is_file():
            members.setdefault(name, choice.model_dir / name)
    members["serving.json"] = (json.dumps(serving_settings(choice, cfg), indent=2) + "\n").encode()
    members["code/inference.py"] = HANDLER_SOURCE
    modules = vendored_modules()
    members[f"code/{VENDORED_PACKAGE}/__init__.py"] = (
        f'"""Verbatim copies of bertopt modules ({", ".join(modules)}) for code/inference.py."""\n').encode()
    for name in modules:
        members[f"code/{VENDORED_PACKAGE}/{name}.py"] = PACKAGE_DIR / f"{name}.py"
    reqs = requirements(choice, bool(getattr(cfg, "gpu", False)))
    wheels = []
    if getattr(cfg, "vendor_wheels", None):
        from .config import CONTAINER_PYTHON

        wheels = check_wheels(cfg.vendor_wheels, reqs, CONTAINER_PYTHON)
    members["code/requirements.txt"] = requirements_text(reqs, bool(wheels)).encode()
    for w in wheels:
        members[f"code/wheels/{w.name}"] = w
    return sorted(members.items())


def _tarinfo(name: str, size: int, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build_archive(choice: ModelChoice, cfg, dest: Path) -> ArchiveInfo:
    """Write model.tar.gz (atomically) and return its path, sha256 and member list."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    members = archive_members(choice, cfg)
    tmp = dest.with_name(f".{dest.name}.tmp")
    dirs = sorted({str(Path(n).parent) for n, _ in members if "/" in n})
    try:
        with open(tmp, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for d in dirs:
                        tar.addfile(_tarinfo(d, 0, directory=True))
                    for name, src in members:
                        if isinstance(src, bytes):
                            tar.addfile(_tarinfo(name, len(src)), io.BytesIO(src))
                        else:
                            with open(src, "rb") as fh:
                                tar.addfile(_tarinfo(name, os.fstat(fh.fileno()).st_size), fh)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    info = ArchiveInfo(dest, _file_digest(dest, 64), dest.stat().st_size, [n for n, _ in members])
    log.info("packaged %s (%s, %.1f MB, %d files): %s", dest, choice.variant, info.size_bytes / 1e6,
             len(info.members), ", ".join(info.members))
    return info


def extract_archive(archive: Path, dest: Path) -> Path:
    """Unpack model.tar.gz like SageMaker does (into /opt/ml/model), refusing unsafe members."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest
