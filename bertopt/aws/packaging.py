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

from .. import artifacts, model_files, staging
from ..errors import ConfigError, ModelError, PipelineError
from .choice import FILE_BACKENDS, ModelChoice, _file_digest

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
    model_bytes: int = 0    # the model's own files (bertopt.model_files.model_bytes), inside size_bytes' archive


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
def model_members(choice: ModelChoice) -> dict[str, Path]:
    """The model's own files (archive name -> path), from the one helper that knows them: an ONNX
    file and its external data, an OpenVINO IR's .xml and .bin, a save_pretrained model's weights."""
    files = model_files.model_files(choice.path)
    if not files:
        raise ModelError(f"{choice.path}: no model weights found there")
    return {f.name: f for f in files}


def serving_settings(choice: ModelChoice, cfg) -> dict:
    return {"variant": choice.variant, "backend": choice.backend, "precision": choice.precision,
            "source": choice.source,
            "model_file": choice.path.name if choice.backend in FILE_BACKENDS else None,
            "label_names": list(choice.label_names), "max_length": choice.max_length,
            "max_batch": cfg.max_batch, "max_chars": cfg.max_chars,
            # micro-batching (-1 = off); the SageMaker container's environment sets its own (instances.py)
            "batch_wait_ms": float(cfg.batch_wait_ms) if getattr(cfg, "batching", True) else -1.0,
            "batch_max_texts": int(getattr(cfg, "batch_max_texts", 64)),
            "device": "cuda" if getattr(cfg, "gpu", False) else "cpu", **_float_math(choice),
            **_task_settings(choice, cfg)}


def _float_math(choice: ModelChoice) -> dict:
    """``float_math`` of the served row's registry entry (ov-bf16 / ov-int8-bf16: bf16), so the
    handler compiles the model as compare measured it."""
    from .. import variants

    spec = variants.REGISTRY.get(choice.variant) or next(
        (s for s in variants.REGISTRY.values() if choice.variant.endswith("-" + s.name)), None)
    return {"float_math": spec.float_math} if spec is not None and spec.float_math else {}


def _task_settings(choice: ModelChoice, cfg) -> dict:
    """The task and long-text strategy the source stage trained with (its manifest's data record)."""
    stage = choice.source if choice.source in ("baseline", "mixed_precision", "pruned") else None
    out = getattr(cfg, "output_dir", None)
    manifest = artifacts.read_manifest(artifacts.stage_dir(out, stage)) if stage and out else None
    data = (manifest or {}).get("data") or {}
    return {k: data[k] for k in ("task", "long_text", "stride", "threshold") if data.get(k) is not None}


def archive_members(choice: ModelChoice, cfg) -> list[tuple[str, object]]:
    """(archive name, source Path or bytes) for every member of model.tar.gz."""
    members: dict[str, object] = dict(model_members(choice))  # the model with its external data / .bin
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
    need = sum(len(src) if isinstance(src, bytes) else Path(src).stat().st_size for _, src in members)
    staging.check_free(dest.parent, need, dest.name, keeps=dest if dest.exists() else None)  # gzip only shrinks it
    try:
        with staging.disk_errors(dest.parent, dest.name, need, dest if dest.exists() else None), \
                open(tmp, "wb") as raw:
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
    info = ArchiveInfo(dest, _file_digest(dest, 64), dest.stat().st_size, [n for n, _ in members],
                       check_model_members(choice, members))
    log.info("packaged %s (%s, model %.1f MB, archive %.1f MB, %d files): %s", dest, choice.variant,
             info.model_bytes / 1e6, info.size_bytes / 1e6, len(info.members), ", ".join(info.members))
    return info


def check_model_members(choice: ModelChoice, members: list) -> int:
    """Every byte of the model is in the archive (its external data or .bin included); returns the
    model's size as :func:`bertopt.model_files.model_bytes` counts it."""
    packed = dict(members)
    expected = model_members(choice)
    missing = [n for n in expected if n not in packed]
    carried = sum(Path(packed[n]).stat().st_size for n in expected if n in packed and not isinstance(packed[n], bytes))
    total = model_files.model_bytes(choice.path)
    if missing or carried != total:
        raise ModelError(f"model.tar.gz would not carry all of {choice.path}: missing {', '.join(missing) or '-'}, "
                         f"{carried} of {total} bytes")
    return total


def extract_archive(archive: Path, dest: Path) -> Path:
    """Unpack model.tar.gz like SageMaker does (into /opt/ml/model), refusing unsafe members."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest
