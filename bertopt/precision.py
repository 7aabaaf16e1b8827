"""Devices and precisions: which device to train on and what fp32/amp/fp16/bf16 means there."""
from __future__ import annotations

import contextlib
import functools
import time
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


NATIVE_CPU_MATH = {"bf16": ("amx_bf16", "avx512_bf16")}


def cpu_math_support(kind: str) -> tuple[bool, str]:
    """Whether this CPU has native ``kind`` (bf16) matmul, with the evidence (its /proc/cpuinfo
    flags): a bf16 inference row elsewhere would measure an emulation, so it is skipped instead."""
    wanted = NATIVE_CPU_MATH[kind]
    found = sorted(cpu_flags() & set(wanted))
    if found:
        return True, f"CPU has native {kind} math ({', '.join(found)})"
    return False, (f"this CPU has no native {kind} math (none of {', '.join(wanted)} in its flags): a {kind} row "
                   "would measure an emulation")


# `amp` on CPU picks bf16 only where it is measurably faster than fp32 here: native bf16 flags are
# not enough (AVX512-BF16 without AMX measured 0.77x fp32 training on a Xeon, 2.1x on an AMD EPYC)
AMP_MIN_SPEEDUP = 1.1


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup(batch: int = 16, seq: int = 32, hidden: int = 384, reps: int = 3) -> tuple[float, float]:
    """Seconds per training forward + backward of one BERT encoder layer (``hidden`` wide, 4x
    feed-forward, dropout on; a ``batch`` x ``seq`` input) in fp32 and under bf16 autocast on this
    CPU, best of ``reps`` after one warm-up each; measured once per process (well under a second)."""
    import torch
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    torch.manual_seed(0)
    config = BertConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=hidden // 32)
    config._attn_implementation = "sdpa"  # what load_model gives a BERT-layout model
    layer = BertLayer(config)
    layer.train()
    x = torch.randn(batch, seq, hidden)

    def best(bf16: bool) -> float:
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = layer(x)
            (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()
            times.append(time.perf_counter() - t0)
            layer.zero_grad(set_to_none=True)
        return min(times[1:])

    return best(False), best(True)


def cpu_native_bf16(amp: bool = False) -> tuple[bool, str]:
    """Whether bf16 autocast should run on this CPU, with the evidence. Without native bf16 math
    (AMX-BF16 or AVX512-BF16) it is emulated: no. For ``amp`` (the mixed-precision stage's default:
    only where it pays) native math must also measure at least ``AMP_MIN_SPEEDUP`` x fp32 in
    :func:`cpu_bf16_speedup`; an explicit bf16 request runs wherever the math is native."""
    found = sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"})
    if not found:
        return False, ("CPU has no native bf16 math (neither AMX-BF16 nor AVX512-BF16): bf16 autocast is "
                       "emulated there and runs 10-15x slower than fp32; pass --force to run it anyway")
    native = f"CPU has native bf16 math ({', '.join(found)})"
    if not amp:
        return True, native
    fp32_s, bf16_s = cpu_bf16_speedup()
    ratio = fp32_s / bf16_s
    probe = (f"bf16 autocast measured {ratio:.2f}x fp32 on a BERT layer's training step here "
             f"({1e3 * fp32_s:.1f} vs {1e3 * bf16_s:.1f} ms)")
    if ratio < AMP_MIN_SPEEDUP:
        return False, f"{native}, but {probe}: amp needs {AMP_MIN_SPEEDUP}x; --precision bf16 runs it anyway"
    return True, f"{native}; {probe}"


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
