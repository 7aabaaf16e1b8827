"""Build ``model.tar.gz`` in the SageMaker layout for the model :mod:`bertopt.aws.choice` chose.

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
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .. import artifacts
from ..errors import ConfigError, ModelError, PipelineError
from .choice import FILE_BACKENDS, TORCH_WEIGHTS, ModelChoice, _file_digest

log = logging.getLogger("bertopt.aws.packaging")

PACKAGE_DIR = Path(__file__).resolve().parents[1]          # bertopt/
HANDLER_SOURCE = Path(__file__).resolve().parent / "serving" / "inference.py"
VENDORED_PACKAGE = "bertopt_runtime"
# what serving/inference.py uses from bertopt (module -> symbols)
VENDOR_ROOTS = {"runtimes": ("OrtPredictor", "TorchPredictor", "OpenVinoPredictor"),
                "data": ("tokenize", "pad_batch", "length_groups"), "jsonl": ("with_json_lines",)}
ARCHIVE_NAME = "model.tar.gz"
FIXED_MTIME = 946684800                                       # 2000-01-01: reproducible archives
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja")


@dataclass
class ArchiveInfo:
    path: Path
    sha256: str
    size_bytes: int
    members: list


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
            "device": "cuda" if getattr(cfg, "gpu", False) else "cpu", **_task_settings(choice, cfg)}


def _task_settings(choice: ModelChoice, cfg) -> dict:
    """The task and long-text strategy the source stage trained with (its manifest's data record)."""
    stage = choice.source if choice.source in ("baseline", "mixed_precision", "pruned") else None
    out = getattr(cfg, "output_dir", None)
    manifest = artifacts.read_manifest(artifacts.stage_dir(out, stage)) if stage and out else None
    data = (manifest or {}).get("data") or {}
    return {k: data[k] for k in ("task", "long_text", "stride", "threshold") if data.get(k) is not None}


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
