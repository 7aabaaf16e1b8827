"""The files and bytes of a model, and the one rule for writing ONNX files.

ONNX's protobuf format stops at 2 GB, so a bigger model keeps its weights in external data. The
rule, for every ONNX file the pipeline writes (export, ORT optimizer, every quantizer and
converter, the calibration copies): a model whose tensors hold more than :func:`threshold` bytes
(just under 2 GB; ``BERTOPT_EXTERNAL_DATA_BYTES`` sets it, tests force it down) is saved with all
its tensors in ONE file beside it, ``<name>.onnx.data``; a smaller one is one self-contained file.

"The bytes of a model" are owned here too (:func:`model_files`, :func:`model_bytes`): an ONNX file
and the external data it refers to, an OpenVINO IR's ``.xml`` and ``.bin``, a save_pretrained
directory's weight files. Every size shown (the ONNX stage, compare, the report, the deploy
archive) and everything that copies or packages a model asks these.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from .errors import ConfigError, ModelError

THRESHOLD_ENV = "BERTOPT_EXTERNAL_DATA_BYTES"
DEFAULT_THRESHOLD = 2**31 - 2**27      # 1.875 GiB: room under protobuf's 2 GiB for the graph itself
DATA_SUFFIX = ".data"
TORCH_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")   # + shards model-*.safetensors / pytorch_model-*.bin


def threshold() -> int:
    """Tensor bytes above which an ONNX model is saved with external data (read at every call)."""
    raw = os.environ.get(THRESHOLD_ENV, "").strip()
    if not raw:
        return DEFAULT_THRESHOLD
    try:
        value = int(float(raw))
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{THRESHOLD_ENV}={raw!r}: expected a number of bytes >= 0")
    return value


def data_file(path: str | os.PathLike) -> Path:
    """The external-data file the rule gives ``path``: ``<name>.onnx.data`` beside it."""
    path = Path(path)
    return path.with_name(path.name + DATA_SUFFIX)


def _tensors(model) -> Iterator:
    """Every TensorProto of the main graph: initializers and Constant / attribute tensors."""
    graph = model.graph
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


def tensor_bytes(model) -> int:
    """Bytes of the model's tensors (in memory or external), without serializing the model."""
    import numpy as np
    from onnx import helper

    total = 0
    for t in _tensors(model):
        if t.raw_data:
            total += len(t.raw_data)
            continue
        external = {e.key: e.value for e in t.external_data}
        if "length" in external:
            total += int(external["length"])
            continue
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except Exception:  # string / undefined tensors: count what they hold
            itemsize = 8
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def needs_external(nbytes: int) -> bool:
    return nbytes > threshold()


def external_for(path: str | os.PathLike) -> bool:
    """Whether a model made from ``path`` (same weights or fewer) may need external data: what the
    ONNX Runtime quantizers take as ``use_external_data_format`` (it also covers their copies)."""
    return needs_external(model_bytes(path))


def _add_ms_domain(model) -> None:
    """Contrib ops need the com.microsoft opset import (ORT's own save adds it)."""
    domains = {o.domain for o in model.opset_import}
    if "com.microsoft" not in domains and any(n.domain == "com.microsoft" for n in model.graph.node):
        opset = model.opset_import.add()
        opset.domain, opset.version = "com.microsoft", 1


def save(model, path: str | os.PathLike) -> list[Path]:
    """Save a ModelProto (or an ONNX Runtime ``OnnxModel`` wrapper) at ``path`` by the rule; returns
    the files written. A stale ``<name>.onnx.data`` is removed first (onnx appends to it otherwise).
    Saving with external data moves the tensors out of ``model`` (do not reuse it afterwards)."""
    import onnx

    if not isinstance(model, onnx.ModelProto):  # onnxruntime.transformers / quantization OnnxModel
        model.topological_sort()
        model = model.model
    _add_ms_domain(model)
    path, data = Path(path), data_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data.unlink(missing_ok=True)
    if needs_external(tensor_bytes(model)):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024, convert_attribute=False)
        if not data.is_file():  # no tensor large enough to move out
            return [path]
        os.chmod(data, path.stat().st_mode & 0o777)  # onnx creates it 0600: give it the model file's mode
        return [path, data]
    onnx.save_model(model, str(path))
    return [path]


def move(src: str | os.PathLike, dst: str | os.PathLike) -> list[Path]:
    """Put the model at ``src`` (any layout: inline, one data file, loose per-tensor files) at
    ``dst`` by the rule, then remove ``src``'s files. Renames when the layout already fits."""
    import onnx

    src, dst = Path(src), Path(dst)
    files = model_files(src)
    big = needs_external(model_bytes(src))
    if files == ([src, data_file(src)] if big else [src]) and (not big or src.name == dst.name):
        data_file(dst).unlink(missing_ok=True)
        if big:
            os.chmod(data_file(src), src.stat().st_mode & 0o777)
            os.replace(data_file(src), data_file(dst))
        os.replace(src, dst)
        return [dst, data_file(dst)] if big else [dst]
    model = onnx.load(str(src))  # loads every external tensor, wherever it lives
    written = save(model, dst)
    for f in files:
        f.unlink(missing_ok=True)
    return written


@contextlib.contextmanager
def scratch(dst: str | os.PathLike) -> Iterator[Path]:
    """A path named like ``dst`` in a private directory beside it, for tools that write their own
    layout (torch.onnx.export, the ORT quantizers); on success the model is moved to ``dst`` by the
    rule; the directory (and whatever loose files the tool left in it) is always removed."""
    dst = Path(dst)
    work = dst.parent / f".{dst.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work / dst.name
        move(work / dst.name, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@lru_cache(maxsize=256)
def _external_locations(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{path} is not a readable ONNX model ({type(exc).__name__}); re-create it with "
                         "`python onnx_tensorrt.py --force`") from None
    names = []
    for t in _tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and loc not in names:
                names.append(loc)
    return tuple(sorted(names))


def model_files(path: str | os.PathLike) -> list[Path]:
    """Every file that makes up the model at ``path``: an ONNX file first, then the external data
    it refers to (ModelError when one is missing); an OpenVINO ``.xml`` and its ``.bin``; a
    save_pretrained directory's weight files (single or sharded)."""
    path = Path(path)
    if path.is_dir():
        return ([path / n for n in TORCH_WEIGHTS if (path / n).is_file()]
                + sorted(path.glob("model-*.safetensors")) + sorted(path.glob("pytorch_model-*.bin")))
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    if path.suffix == ".xml":
        return [path] + ([path.with_suffix(".bin")] if path.with_suffix(".bin").is_file() else [])
    if path.suffix != ".onnx":
        return [path]
    st = path.stat()
    files = [path]
    for name in _external_locations(str(path.resolve()), st.st_size, st.st_mtime_ns):
        f = path.parent / name
        if not f.is_file():
            raise ModelError(f"{path}: its external data file {name} is missing (it must lie beside the model; "
                             "re-create both with `python onnx_tensorrt.py --force`)")
        files.append(f)
    return files


def model_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of the model at ``path``, all its files counted (see :func:`model_files`)."""
    return sum(f.stat().st_size for f in model_files(path))


def release_memory() -> None:
    """Give freed memory back to the system between conversions: a 2 GB model's converters leave
    gigabytes in the allocator's free lists, and the next converter would stack on top of them."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
