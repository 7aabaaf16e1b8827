"""GPU measurement: the synchronised wall-clock timer for GPU calls, the measured matmul peak per
compute type (fp32, tf32, fp16, bf16, int8) a GPU row's fraction of peak is taken against, and the
GPU memory figures of the memory probe (torch's allocator, NVML per process by UUID, a TensorRT
engine's own device memory), each labelled with what it covers.

torch and pynvml are imported inside the functions: nothing here runs without a GPU, and the
tests drive it with fakes (or on the CPU, where the code path allows).
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Mapping, Optional, Sequence


class CudaTimer:
    """Times one synchronous GPU call: synchronise the device, run, synchronise again, wall clock.

    Every predictor returns host arrays (its call ends with a device-to-host copy), so this times
    the whole call on every stream it uses. CUDA events recorded on the default stream would not:
    a TensorRT engine runs on its own stream, and the events would bracket nothing of its work."""

    def __init__(self, device: str = "cuda"):
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> float:
        import torch

        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0


# precision of a variant row -> the compute type whose peak it is measured against
COMPUTE_TYPES = {"fp32": "fp32", "tf32": "tf32", "fp16": "fp16", "bf16": "bf16", "int8": "int8", "int4": "int8"}


def gpu_matmul_peaks(device: str = "cuda", sizes: Sequence[int] = (4096, 8192), repeats: int = 5) -> dict:
    """The GPU's measured dense matmul peak per compute type (GFLOP/s, or GOP/s for int8), at
    sizes that fill a large GPU: fp32 with TF32 off, tf32, fp16, bf16 and int8 (``torch._int_mm``).
    A variant's fraction of peak is taken against the peak of its own compute type, so fp16/int8
    rows are not divided by the FP32 figure (which put them above 100%)."""
    import torch

    peaks = {}
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for ctype in ("fp32", "tf32", "fp16", "bf16", "int8"):
            torch.backends.cuda.matmul.allow_tf32 = ctype == "tf32"
            try:
                peaks[ctype] = _gpu_peak_one(ctype, device, sizes, repeats)
            except Exception as exc:  # e.g. int8 matmul or bf16 not supported on this GPU
                peaks[ctype] = {"gflops": None, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return peaks


def _gpu_peak_one(ctype: str, device: str, sizes: Sequence[int], repeats: int) -> dict:
    import torch

    runs = []
    for n in sizes:
        if ctype == "int8":
            a = torch.randint(-64, 64, (n, n), dtype=torch.int8, device=device)
            b = torch.randint(-64, 64, (n, n), dtype=torch.int8, device=device)
            op = lambda: torch._int_mm(a, b)  # noqa: E731 - int8 x int8 -> int32, the tensor-core path
        else:
            dt = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[ctype]
            a, b = torch.randn(n, n, dtype=dt, device=device), torch.randn(n, n, dtype=dt, device=device)
            op = lambda: a @ b  # noqa: E731
        op()
        timer, best = CudaTimer(device), math.inf
        for _ in range(repeats):
            best = min(best, timer(op))
        runs.append({"n": n, "best_s": best, "gflops": 2 * n ** 3 / best / 1e9})
    return {"gflops": max(r["gflops"] for r in runs), "runs": runs,
            "method": f"best of {repeats} synchronised calls, n x n at n in {list(sizes)}"}


def compute_type(precision: str) -> str:
    """The matmul type a row of ``precision`` runs (int4 weight-only rows compute in int8)."""
    return COMPUTE_TYPES.get(str(precision).lower(), "fp32")


def peak_for(precision: str, peaks: Optional[Mapping], tf32: bool = False) -> tuple[Optional[float], Optional[str]]:
    """(peak FLOP/s, compute type) a row of ``precision`` is measured against, from ``peaks``
    (compute type -> measured entry; GPU rows: gpu_matmul_peaks, CPU rows: the CPU's per-type
    peaks); fp32 rows that run with TF32 enabled are measured against the TF32 peak."""
    ctype = compute_type(precision)
    if ctype == "fp32" and tf32:
        ctype = "tf32"
    entry = (peaks or {}).get(ctype) or {}
    return (entry["gflops"] * 1e9, ctype) if entry.get("gflops") else (None, ctype)


# what each GPU memory figure of the memory probe covers (stored beside the figures in results.json)
GPU_MEMORY_NOTES = {
    "cuda_max_allocated_mb": "torch's caching allocator only (misses ONNX Runtime's and TensorRT's own allocations)",
    "nvml_process_used_mb": "this process on this GPU, every allocator and the CUDA context (NVML, by process id)",
    "trt_engine_device_memory_mb": "the TensorRT engine's own activation memory (engine.device_memory_size_v2)",
}


def gpu_uuid(index: int) -> Optional[str]:
    """NVML's UUID string ("GPU-...") of torch's CUDA device ``index``: NVML numbers GPUs by
    physical index, torch by CUDA_VISIBLE_DEVICES order, so the handle must come by UUID."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is None:
        return None
    text = str(uuid)
    return text if text.startswith("GPU-") else f"GPU-{text}"


def nvml_process_memory(index: int, pid: Optional[int] = None, nvml=None) -> dict:
    """GPU memory NVML attributes to process ``pid`` (default: this one) on torch's device ``index``:
    {"nvml_process_used_mb": float} or {"nvml_error": why}. ``nvml`` is the pynvml module (injectable)."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
        uuid = gpu_uuid(index)
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid) if uuid else nvml.nvmlDeviceGetHandleByIndex(index)
        pid = os.getpid() if pid is None else pid
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return {"nvml_process_used_mb": proc.usedGpuMemory / 2**20, "gpu_uuid": uuid}
        return {"nvml_error": f"NVML lists no memory for process {pid} on {uuid or index} "
                              "(another PID namespace, e.g. a container without --pid=host?)"}
    except Exception as exc:  # nvidia-ml-py missing, no NVML, no permission
        return {"nvml_error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}".strip()}


def gpu_memory(predictor, device: str) -> dict:
    import torch

    index = torch.device(device).index or 0
    torch.cuda.synchronize(index)
    out = {"cuda_max_allocated_mb": torch.cuda.max_memory_allocated(index) / 2**20,
           **nvml_process_memory(index), "gpu_memory_notes": dict(GPU_MEMORY_NOTES)}
    engine_bytes = getattr(getattr(predictor, "runner", None), "device_memory_bytes", None)
    if engine_bytes is not None:
        out["trt_engine_device_memory_mb"] = engine_bytes / 2**20
    return out
