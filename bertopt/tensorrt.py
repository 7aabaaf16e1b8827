"""TensorRT engines (NVIDIA GPUs only): build from the ONNX files, record where they were built,
and run them on torch CUDA tensors.

``tensorrt`` is imported inside the functions that use it, so this module (and ``--help``, the
CPU tests, the stage on a CPU machine) never needs it. Capabilities are detected by feature:

- TensorRT >= 10 is required (name-based tensor API, ``execute_async_v3``);
- strongly typed networks (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; always on in 11.x)
  take their precision from the ONNX file: FP16 from ``model.fp16.onnx``, INT8 from the explicit
  Q/DQ nodes of ``model.qdq.onnx``;
- the legacy ``BuilderFlag.FP16`` / ``BuilderFlag.INT8`` (removed in 11.x) are used only as a
  fallback when a strongly typed build is impossible;
- FP32 engines clear ``BuilderFlag.TF32`` (where it exists) for a strict baseline.

Engines are not portable: the stage manifest records the TensorRT version, GPU name and compute
capability, and :class:`EngineRunner` refuses a plan whose manifest does not match this machine.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import variants as _variants
from .errors import BackendUnavailable, ConfigError, ModelError, first_line

log = logging.getLogger("bertopt.tensorrt")

PRECISIONS = ("fp32", "fp16", "int8")
# precision -> the ONNX file it is built from (strongly typed: the file carries the precision)
ONNX_SOURCES = {s.precision: s.built_from for s in _variants.for_stage("tensorrt")}
PLAN_FILES = {s.precision: s.file for s in _variants.for_stage("tensorrt")}
DEFAULT_OPT_SHAPE = "8x128"
DEFAULT_MAX_BATCH = 64
INSTALL_HINT = "pip install -r requirements-gpu.txt on a machine with an NVIDIA GPU"


# ----------------------------------------------------------------------------- profile shapes
def parse_shape(text: str, flag: str = "--trt-opt-shapes") -> tuple[int, int]:
    """'8x128' (batch x sequence) -> (8, 128)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*,]\s*(\d+)\s*", str(text))
    if not m:
        raise ConfigError(f"{flag} {text!r}: expected BATCHxSEQUENCE, e.g. 8x128")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class Profile:
    """One optimization profile over (batch, sequence) shared by every input."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    def contains(self, shape: Sequence[int]) -> bool:
        return all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))


def profile_problems(min_shape, opt_shape, max_shape, max_positions: Optional[int] = None) -> list[str]:
    """Every problem of a (min, opt, max) profile, each naming the flag to change."""
    p = []
    named = (("--trt-min-shapes", min_shape), ("--trt-opt-shapes", opt_shape), ("--trt-max-shapes", max_shape))
    for flag, shape in named:
        if len(shape) != 2 or any((not isinstance(d, int)) or d < 1 for d in shape):
            p.append(f"{flag} {'x'.join(map(str, shape))}: batch and sequence must be positive integers")
    if p:
        return p
    for axis, label in ((0, "batch"), (1, "sequence")):
        lo, mid, hi = min_shape[axis], opt_shape[axis], max_shape[axis]
        if not lo <= mid <= hi:
            p.append(f"TensorRT profile {label} sizes must satisfy min <= opt <= max (got {lo} <= {mid} <= {hi}; "
                     "fix --trt-min-shapes/--trt-opt-shapes/--trt-max-shapes)")
    if max_positions is not None and max_shape[1] > max_positions:
        p.append(f"--trt-max-shapes sequence {max_shape[1]} exceeds the model's {max_positions} positions")
    return p


def make_profile(min_text: str, opt_text: str, max_text: Optional[str], max_length: int,
                 max_positions: Optional[int] = None) -> Profile:
    """Parse and validate the three shape flags; ``max_text`` None = 64 x max_length. The opt
    sequence is clamped to the max sequence when only the default opt was given."""
    mn = parse_shape(min_text, "--trt-min-shapes")
    op = parse_shape(opt_text, "--trt-opt-shapes")
    mx = parse_shape(max_text, "--trt-max-shapes") if max_text else (DEFAULT_MAX_BATCH, max_length)
    if opt_text == DEFAULT_OPT_SHAPE and op[1] > mx[1]:
        op = (op[0], mx[1])
    problems = profile_problems(mn, op, mx, max_positions)
    if problems:
        raise ConfigError(problems)
    return Profile(mn, op, mx)


# ----------------------------------------------------------------------------- availability
def import_tensorrt():
    """The tensorrt module (>= 10) or BackendUnavailable with the reason."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional back end, imported lazily on purpose
    except ImportError as exc:
        raise BackendUnavailable(f"the tensorrt Python package is not installed ({exc}); {INSTALL_HINT}") from None
    except Exception as exc:  # broken install: missing libnvinfer, CUDA driver mismatch
        raise BackendUnavailable(f"tensorrt cannot be imported: {first_line(exc)}") from None
    major = int(str(getattr(trt, "__version__", "0")).split(".")[0] or 0)
    if major < 10:
        raise BackendUnavailable(f"TensorRT {trt.__version__} is too old: TensorRT >= 10 is required "
                                 "(name-based tensor API)")
    return trt


def availability() -> tuple[bool, str]:
    """(usable, reason). Checks CUDA first, then the tensorrt package."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False, ("no CUDA device (torch.cuda.is_available() is False): TensorRT engines are built "
                           "and run on NVIDIA GPUs only")
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False, "torch is not installed"
    try:
        trt = import_tensorrt()
    except BackendUnavailable as exc:
        return False, str(exc)
    return True, f"TensorRT {trt.__version__}"


def capabilities(trt) -> dict:
    """What this TensorRT offers, detected by feature (never by version string)."""
    flags = getattr(trt, "BuilderFlag", None)
    creation = getattr(trt, "NetworkDefinitionCreationFlag", None)
    return {
        "strongly_typed": creation is not None and hasattr(creation, "STRONGLY_TYPED"),
        "fp16_flag": flags is not None and hasattr(flags, "FP16"),
        "int8_flag": flags is not None and hasattr(flags, "INT8"),
        "tf32_flag": flags is not None and hasattr(flags, "TF32"),
    }


def precision_plan(precision: str, caps: dict, onnx_dir: str | os.PathLike) -> dict:
    """How to build ``precision`` here: {'onnx', 'strongly_typed', 'flags', 'clear_flags'} or
    {'skip': reason}. Pure: tested without TensorRT."""
    onnx_dir = Path(onnx_dir)
    if precision not in PRECISIONS:
        raise ConfigError(f"--trt-precisions: unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    source = onnx_dir / ONNX_SOURCES[precision]
    strongly = caps.get("strongly_typed", False)
    if precision == "fp32":
        return {"onnx": str(source), "strongly_typed": strongly, "flags": [],
                "clear_flags": ["TF32"] if caps.get("tf32_flag") else []}
    if source.is_file() and strongly:
        return {"onnx": str(source), "strongly_typed": True, "flags": [], "clear_flags": []}
    if precision == "fp16" and caps.get("fp16_flag"):  # TensorRT 10 fallback: weak typing from FP32 ONNX
        return {"onnx": str(onnx_dir / ONNX_SOURCES["fp32"]), "strongly_typed": False, "flags": ["FP16"],
                "clear_flags": []}
    if precision == "int8" and source.is_file() and caps.get("int8_flag"):  # explicit Q/DQ, weakly typed
        return {"onnx": str(source), "strongly_typed": False, "flags": ["INT8"], "clear_flags": []}
    if not source.is_file():
        return {"skip": f"{source.name} is missing (its ONNX variant failed or was not built)"}
    return {"skip": f"this TensorRT has neither strongly typed networks nor BuilderFlag.{precision.upper()}"}


# ----------------------------------------------------------------------------- where it was built
def device_facts(trt=None, index: int = 0) -> dict:
    """TensorRT version, GPU name and compute capability of CUDA device ``index`` (for the manifest)."""
    facts = {"tensorrt": None, "gpu": None, "compute_capability": None}
    if trt is not None:
        facts["tensorrt"] = str(trt.__version__)
    try:
        import torch

        if torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name(index)
            facts["compute_capability"] = "%d.%d" % torch.cuda.get_device_capability(index)
    except ImportError:  # pragma: no cover
        pass
    return facts


def compatibility_problems(recorded: dict, current: dict) -> list[str]:
    """Why a plan built where ``recorded`` says cannot be trusted on ``current`` (empty = ok)."""
    p = []
    for key, label in (("tensorrt", "TensorRT version"), ("compute_capability", "GPU compute capability"),
                       ("gpu", "GPU")):
        want, have = recorded.get(key), current.get(key)
        if not want:
            p.append(f"the manifest does not record the {label}")
        elif want != have:
            p.append(f"built for {label} {want}, this machine has {have or 'none'}")
    return p


def check_compatible(plan_path: str | os.PathLike, current: dict) -> dict:
    """The manifest of the plan's directory when the plan may be loaded here; ModelError otherwise."""
    from . import artifacts

    plan_path = Path(plan_path)
    manifest = artifacts.read_manifest(plan_path.parent)
    if manifest is None:
        raise ModelError(f"{plan_path}: no manifest.json beside the engine, so it cannot be checked against this "
                         "GPU/TensorRT (engines are not portable); rebuild it with `python onnx_tensorrt.py --force`")
    recorded = manifest.get("metrics", {})
    problems = compatibility_problems(recorded, current)
    if problems:
        raise ModelError(f"{plan_path} cannot be used here: {'; '.join(problems)}. TensorRT engines are specific "
                         "to the GPU and TensorRT version: rebuild with `python onnx_tensorrt.py --force`")
    return manifest


# ----------------------------------------------------------------------------- build
_LOGGER = None  # TensorRT keeps ONE logger per process: every Builder/Runtime must get the same object


def process_logger(trt):
    """The process-wide trt.ILogger that forwards TensorRT's errors and warnings to our logger.

    TensorRT registers the first logger it is given for the whole process; a logger per Builder or
    Runtime can be freed while TensorRT still calls it (use-after-free when runners overlap), so it
    is created once and kept for the life of the process."""
    global _LOGGER
    if _LOGGER is not None and getattr(_LOGGER, "_trt_module", None) is trt:
        return _LOGGER

    class Forward(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)

    _LOGGER = Forward()
    _LOGGER._trt_module = trt
    return _LOGGER


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def build_engine(trt, plan: dict, plan_path: str | os.PathLike, profile: Profile, workspace_mb: int,
                 logger=None) -> dict:
    """Build one serialized engine as ``plan`` (from :func:`precision_plan`) says."""
    logger = logger or process_logger(trt)
    start = time.perf_counter()
    try:  # a builder that cannot start (no usable GPU, driver mismatch) raises TypeError in the bindings
        builder = trt.Builder(logger)
    except Exception as exc:
        raise ModelError(f"TensorRT cannot create a builder ({_short(exc)}): is the GPU usable and the driver "
                         "new enough for this TensorRT?") from None
    if builder is None:
        raise ModelError("TensorRT cannot create a builder (trt.Builder returned None)")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan["strongly_typed"] else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # from the file's path, never parse(bytes): the parser finds a model's <name>.onnx.data beside it
    if not parser.parse_from_file(plan["onnx"]):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse {plan['onnx']}: {errors or 'unknown parser error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    for name in plan["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan["clear_flags"]:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        opt_profile.set_shape(network.get_input(i).name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"TensorRT failed to build an engine from {plan['onnx']} (see the TensorRT errors above)")
    plan_path = Path(plan_path)
    tmp = plan_path.with_name(f".{plan_path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(serialized)
    os.replace(tmp, plan_path)
    return {"file": plan_path.name, "status": "ok", "reason": None, "size_bytes": plan_path.stat().st_size,
            "onnx": Path(plan["onnx"]).name, "strongly_typed": plan["strongly_typed"],
            "builder_flags": plan["flags"], "cleared_flags": plan["clear_flags"],
            "build_s": round(time.perf_counter() - start, 1)}


def build_engines(onnx_dir: str | os.PathLike, trt_dir: str | os.PathLike, precisions: Sequence[str],
                  profile: Profile, workspace_mb: int, device_index: int = 0) -> dict:
    """Build every requested engine on CUDA device ``device_index``; a failed precision is
    recorded, not fatal."""
    import torch

    trt = import_tensorrt()
    with torch.cuda.device(device_index):
        return _build_all(trt, onnx_dir, trt_dir, precisions, profile, workspace_mb, device_index)


def _build_all(trt, onnx_dir, trt_dir, precisions, profile, workspace_mb, device_index) -> dict:
    caps = capabilities(trt)
    engines = {}
    for precision in precisions:
        plan = precision_plan(precision, caps, onnx_dir)
        if "skip" in plan:
            engines[precision] = {"file": None, "status": "skipped", "reason": plan["skip"], "size_bytes": None}
            log.warning("x trt-%s skipped: %s", precision, plan["skip"])
            continue
        try:
            engines[precision] = build_engine(trt, plan, Path(trt_dir) / PLAN_FILES[precision], profile, workspace_mb)
            log.info("✓ trt-%s built from %s in %.1fs (%.1f MB)", precision, Path(plan["onnx"]).name,
                     engines[precision]["build_s"], engines[precision]["size_bytes"] / 2**20)
        except Exception as exc:  # ModelError, or whatever TensorRT raises (out of memory, bindings): per engine
            reason = str(exc) if isinstance(exc, ModelError) else f"TensorRT raised {_short(exc)}"
            engines[precision] = {"file": None, "status": "failed", "reason": reason, "size_bytes": None}
            log.warning("x trt-%s failed: %s", precision, reason)
    return {"engines": engines, "capabilities": caps, **device_facts(trt, device_index)}


# ----------------------------------------------------------------------------- run
class EngineRunner:
    """Deserialize a plan and run it with torch CUDA tensors as I/O buffers
    (``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3`` on a non-default stream).

    ``device`` (``cuda`` or ``cuda:N``) is honoured throughout: the engine is deserialized, its
    context created and every call run with that device current. :meth:`run` is synchronous (it
    waits for the stream), so timing the call times the engine; ``stream`` is exposed for callers
    that record CUDA events themselves."""

    def __init__(self, plan_path: str | os.PathLike, check_manifest: bool = True, device: str = "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA device: TensorRT engines run on NVIDIA GPUs only")
        trt = import_tensorrt()
        self.trt = trt
        self.path = Path(plan_path)
        if not self.path.is_file():
            raise ModelError(f"TensorRT engine not found: {self.path} (run `python onnx_tensorrt.py` on a GPU machine)")
        self.device = torch.device(device)
        self.index = self.device.index if self.device.index is not None else 0
        if check_manifest:
            check_compatible(self.path, device_facts(trt, self.index))
        with torch.cuda.device(self.index):
            self._open(trt)
            self.stream = torch.cuda.Stream(device=self.device)

    def _open(self, trt) -> None:
        self.runtime = trt.Runtime(process_logger(trt))
        if self.runtime is None:
            raise ModelError(f"{self.path}: TensorRT cannot create a runtime on {self.device}")
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ModelError(f"{self.path}: TensorRT cannot deserialize this engine (corrupt file, or built by "
                             "another TensorRT version/GPU); rebuild with `python onnx_tensorrt.py --force`")
        self.context = self.engine.create_execution_context()
        if self.context is None:  # the bindings return None when the activation memory cannot be allocated
            raise ModelError(f"{self.path}: TensorRT cannot create an execution context on {self.device} "
                             f"(needs {engine_device_memory(self.engine) or '?'} bytes of device memory; "
                             "out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = tuple(n for n in names if n not in self.input_names)
        self.dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.profile = {n: [tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0)] for n in self.input_names}
        self.device_memory_bytes = engine_device_memory(self.engine)

    def _torch_dtype(self, dt):
        import torch

        trt = self.trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                 trt.int8: torch.int8, trt.bool: torch.bool}
        for name, tdt in (("int64", torch.int64), ("bfloat16", torch.bfloat16)):
            if hasattr(trt, name):
                table[getattr(trt, name)] = tdt
        if dt not in table:
            raise ModelError(f"{self.path}: unsupported I/O tensor type {dt}")
        return table[dt]

    def accepts(self, shape: Sequence[int]) -> Optional[str]:
        """None when a (batch, sequence) input fits the engine's profile, else why not."""
        for name in self.input_names:
            lo, _, hi = self.profile[name]
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return (f"shape {'x'.join(map(str, shape))} is outside the engine's profile "
                        f"{'x'.join(map(str, lo))}..{'x'.join(map(str, hi))} (rebuild with larger --trt-max-shapes)")
        return None

    def run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        missing = [n for n in self.input_names if n not in batch]
        if missing:
            raise ModelError(f"{self.path.name} needs input(s) {', '.join(missing)} that the batch lacks")
        keep = []
        with torch.cuda.device(self.index), torch.cuda.stream(self.stream):
            for name in self.input_names:
                arr = np.ascontiguousarray(batch[name])
                why = self.accepts(arr.shape)
                if why:
                    raise ModelError(f"input {name}: {why}")
                t = torch.from_numpy(arr).to(self.device, dtype=self.dtypes[name], non_blocking=True)
                keep.append(t)
                if self.context.set_input_shape(name, tuple(t.shape)) is False:
                    raise ModelError(f"{self.path.name}: TensorRT refused input shape {tuple(t.shape)} for {name}")
                self.context.set_tensor_address(name, t.data_ptr())
            outputs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                outputs[name] = out
                self.context.set_tensor_address(name, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise ModelError(f"{self.path.name}: TensorRT execution failed")
            logits = outputs.get("logits", next(iter(outputs.values()))).float().to("cpu", non_blocking=True)
        self.stream.synchronize()
        return logits.numpy()


def engine_device_memory(engine) -> Optional[int]:
    """The engine's own activation (scratch) memory in bytes: what TensorRT allocates for a context
    outside torch's allocator (``device_memory_size_v2`` in TensorRT >= 10.1, else the older name)."""
    for attr in ("device_memory_size_v2", "device_memory_size"):
        value = getattr(engine, attr, None)
        if value is not None and not callable(value):
            try:
                return int(value)
            except (TypeError, ValueError):
                continue
    return None
