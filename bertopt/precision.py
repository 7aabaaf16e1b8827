"""Devices and precisions: which device to train on and what fp32/amp/fp16/bf16 means there."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import BackendUnavailable


def resolve_device(name: str = "auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"--device {name}: no CUDA device is available here (use --device cpu)")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendUnavailable(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        return dev
    return torch.device("cpu")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_native_bf16(amp: bool = False) -> tuple[bool, str]:
    """Whether this CPU has native bf16 math (AMX-BF16 or AVX512-BF16), with the evidence. For
    ``amp`` (the mixed-precision stage's default: only where it pays) AMX-BF16 is required: with
    AVX512-BF16 alone bf16 autocast measured slower than FP32 (Xeon, 2 cores, MiniLM: training 84
    vs 109 samples/s, inference 181 vs 274 samples/s)."""
    flags = cpu_flags()
    found = sorted(flags & {"amx_bf16", "avx512_bf16"})
    if amp and found == ["avx512_bf16"]:
        return False, ("CPU has AVX512-BF16 but no AMX-BF16: bf16 autocast measured slower than fp32 on such a "
                       "CPU (training 84 vs 109 samples/s); --precision bf16 runs it anyway")
    if found:
        return True, f"CPU has native bf16 math ({', '.join(found)})"
    return False, ("CPU has no native bf16 math (neither AMX-BF16 nor AVX512-BF16): bf16 autocast is "
                   "emulated there and runs 10-15x slower than fp32; pass --force to run it anyway")


@dataclass
class PrecisionPlan:
    name: str  # fp32 | fp16 | bf16
    device_type: str
    autocast_dtype: Optional[object] = None  # torch dtype, None = fp32
    grad_scaler: bool = False
    available: bool = True
    reason: str = ""

    def autocast(self):
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)


def resolve_precision(requested: str, device) -> PrecisionPlan:
    """Map fp32/amp/fp16/bf16 to what this device can do; ``available`` False says why not."""
    import torch

    dtype = device.type
    if requested == "fp32":
        return PrecisionPlan("fp32", dtype)
    if dtype == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        # native bf16 math starts at compute capability 8.0 (Ampere); torch.cuda.is_bf16_supported()
        # also says True on T4/V100, where bf16 is emulated and slower than fp32
        bf16_ok = major >= 8
        if requested == "bf16" and not bf16_ok:
            return PrecisionPlan("bf16", dtype, available=False,
                                 reason=f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
                                        "has no native bf16 math (needs 8.0+); use --precision fp16")
        if requested == "fp16" or (requested == "amp" and not bf16_ok):
            reason = "CUDA fp16 autocast with GradScaler"
            if major < 7:
                reason += " (no tensor cores before compute capability 7.0: expect little speed-up)"
            return PrecisionPlan("fp16", dtype, torch.float16, grad_scaler=True, reason=reason)
        return PrecisionPlan("bf16", dtype, torch.bfloat16, reason="CUDA bf16 autocast (no loss scaling needed)")
    # CPU
    if requested == "fp16":
        return PrecisionPlan("fp16", dtype, available=False,
                             reason="fp16 autocast training is CUDA-only; on CPU use --precision bf16")
    ok, why = cpu_native_bf16(amp=requested == "amp")
    return PrecisionPlan("bf16", dtype, torch.bfloat16, available=ok, reason=why)
