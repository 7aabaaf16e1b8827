"""Variant discovery: the rows of the comparison, found through the stage manifests (never by
globbing files) and named through the variant registry (:mod:`bertopt.variants`). The trained
stages give PyTorch eager rows, ``onnx/<source>/manifest.json`` one row per ONNX-stage variant
(ONNX Runtime and OpenVINO), ``tensorrt/<source>/manifest.json`` one per engine. Rows that cannot
run here keep their reason."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import artifacts, model_files, variants
from ..errors import PipelineError
from .config import BASELINE_ROW, PADDED_BATCH, PADDED_LENGTH, REFERENCE, SOURCE_PREFIX


@dataclass
class Variant:
    """One row of the comparison: a model, a runtime, a precision and a device."""

    name: str
    backend: str           # torch | onnxruntime | tensorrt | openvino
    precision: str
    source: str            # baseline | mixed_precision | pruned
    device: str            # cpu | cuda
    kind: str              # torch | onnx | tensorrt (the stage directory it comes from)
    path: Optional[str] = None        # model dir / .onnx / .xml file / .plan file
    registry: Optional[str] = None    # its bertopt.variants entry (how to open it)
    model_dir: Optional[str] = None   # the directory with tokenizer + config.json
    variant: Optional[str] = None     # the ONNX manifest's variant key / engine precision
    batching: str = "dynamic"         # dynamic | padded
    status: str = "ok"                # ok | skipped | rejected | failed | missing
    reason: Optional[str] = None
    size_bytes: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def spec(self, threads: int) -> dict:
        """What :func:`bertopt.runtimes.open_from_dict` needs (JSON-able: it also crosses into the
        fresh-process memory probe)."""
        return {"spec": self.registry, "name": self.name, "path": self.path, "device": self.device,
                "threads": threads}

    def open(self, threads: int):
        from ..runtimes import open_predictor

        return open_predictor(self.registry, self.path, device=self.device, threads=threads, name=self.name)


def _dir_size(directory: Path) -> int:
    return model_files.model_bytes(directory)


def _model_size(path: Path, recorded: Optional[int]) -> Optional[int]:
    """A model file's bytes as they are now, its external data included (the manifest's figure
    when the file is gone)."""
    try:
        return model_files.model_bytes(path)
    except (OSError, PipelineError):
        return recorded


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _ort_cuda_available() -> bool:
    try:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:  # pragma: no cover
        return False


NO_CUDA = "needs an NVIDIA GPU with CUDA; this machine has none"


def discover(output_dir: str | os.PathLike, device_pref: str = "auto") -> tuple[list[Variant], dict]:
    """Every variant the manifests under ``output_dir`` describe, plus the manifests read.

    The baseline stage is required (MissingArtifact otherwise); everything else is optional and
    shows up as a row with a reason when absent, skipped, rejected or unable to run here."""
    out = Path(output_dir)
    manifests: dict[str, dict] = {}
    baseline_dir = artifacts.stage_dir(out, "baseline")
    manifests["baseline"] = artifacts.require_manifest(baseline_dir, "baseline")
    cuda = device_pref != "cpu" and _cuda_available()
    ort_cuda = cuda and _ort_cuda_available()
    rows: list[Variant] = []
    size = _dir_size(baseline_dir)
    common = dict(backend="torch", precision="fp32", source="baseline", kind="torch", registry="torch-fp32",
                  path=str(baseline_dir), model_dir=str(baseline_dir), size_bytes=size)
    ref = reference_model(manifests["baseline"])
    elsewhere = {} if ref["trained_here"] else {"reference_model": ref["name"], "trained_elsewhere": True}
    note = "" if ref["trained_here"] else f"; the --trained model {ref['name']}, fine-tuned elsewhere"
    rows.append(Variant(REFERENCE, device="cpu", batching="padded", **common, extra={
        "note": f"eager FP32, every input padded to {PADDED_LENGTH}, batch {PADDED_BATCH}{note}", **elsewhere}))
    rows.append(Variant(BASELINE_ROW, device="cpu", **common,
                        extra={"note": f"eager FP32 reference{note}", **elsewhere} if elsewhere else {}))
    if cuda:
        rows.append(Variant(BASELINE_ROW + "-cuda", device="cuda", **common))

    sources = ["baseline"] + _trained_rows(out, rows, manifests, cuda)
    for source in sources:
        prefix = SOURCE_PREFIX[source]
        onnx_dir = artifacts.stage_dir(out, "onnx") / source
        m = artifacts.read_manifest(onnx_dir)
        if m is None:
            rows.append(Variant(f"{prefix}ort", backend="onnxruntime", precision="-", source=source, device="cpu",
                                kind="onnx", status="missing",
                                reason=f"no ONNX export of {source} ({onnx_dir}/manifest.json): run "
                                       f"`{artifacts.producing_command('onnx')}`"))
        else:
            manifests[f"onnx/{source}"] = m
            rows += _onnx_rows(m, onnx_dir, source, prefix, ort_cuda)
        qat_dir = artifacts.stage_dir(out, "qat") / source  # optional stage (--qat): no row when absent
        m = artifacts.read_manifest(qat_dir)
        if m is not None:
            manifests[f"qat/{source}"] = m
            rows += _onnx_rows(m, qat_dir, source, prefix, ort_cuda, stage="qat")
        trt_dir = artifacts.stage_dir(out, "tensorrt") / source
        m = artifacts.read_manifest(trt_dir)
        if m is None:
            if f"onnx/{source}" in manifests:
                rows.append(Variant(f"{prefix}trt", backend="tensorrt", precision="-", source=source, device="cuda",
                                    kind="tensorrt", status="missing",
                                    reason=f"no TensorRT manifest for {source}: run "
                                           f"`{artifacts.producing_command('tensorrt')}` (needs an NVIDIA GPU)"))
            continue
        manifests[f"tensorrt/{source}"] = m
        rows += _trt_rows(m, trt_dir, onnx_dir, source, prefix, cuda)
    return rows, manifests


def reference_model(baseline: dict) -> dict:
    """Which model is the FP32 reference: fine-tuned here by the baseline stage, or a --trained
    model fine-tuned elsewhere (with where it came from: path or hub id + revision, file hashes)."""
    origin = baseline.get("origin") or {}
    if origin.get("trained_here") is False:
        return {"name": origin.get("model"), "trained_here": False,
                **{k: origin.get(k) for k in ("kind", "path", "revision", "files")}}
    return {"name": (baseline.get("config") or {}).get("model"), "trained_here": True}


def _trained_rows(out: Path, rows: list, manifests: dict, cuda: bool) -> list[str]:
    """The mixed-precision and pruned stages' eager rows (appended to ``rows``); returns the
    sources whose ONNX exports to look for."""
    from ..precision import cpu_native_bf16

    sources = []
    for stage in ("mixed_precision", "pruned"):
        d = artifacts.stage_dir(out, stage)
        m = artifacts.read_manifest(d)
        if m is None:
            continue
        manifests[stage] = m
        prefix = SOURCE_PREFIX[stage]
        if stage == "mixed_precision":
            prec = (m.get("metrics") or {}).get("precision") or "amp"
            name = f"{prefix}torch-{prec}"
            reg = f"torch-{prec}" if f"torch-{prec}" in variants.REGISTRY else "torch-fp32"  # amp: no autocast
            base = dict(backend="torch", precision=prec, source=stage, kind="torch", path=str(d), registry=reg,
                        model_dir=str(d), size_bytes=_dir_size(d) if m.get("status") == "ok" else None)
            if m.get("status") != "ok":
                rows.append(Variant(name, device="cpu", status=m.get("status") or "failed",
                                    reason=m.get("reason") or "the mixed-precision stage did not finish", **base))
                continue
            sources.append(stage)
            if prec == "bf16":
                ok, why = cpu_native_bf16()
                rows.append(Variant(name, device="cpu", status="ok" if ok else "skipped",
                                    reason=None if ok else why, **base))
                if cuda:
                    rows.append(Variant(name + "-cuda", device="cuda", **base))
            else:  # fp16 inference is CUDA-only
                rows.append(Variant(name, device="cuda", status="ok" if cuda else "skipped",
                                    reason=None if cuda else f"fp16 inference {NO_CUDA}", **base))
        else:
            if m.get("status") != "ok":
                rows.append(Variant(f"{prefix}torch-fp32", backend="torch", precision="fp32", source=stage,
                                    device="cpu", kind="torch", status=m.get("status") or "failed",
                                    reason=m.get("reason") or "the pruning stage did not finish"))
                continue
            sources.append(stage)
            rows.append(Variant(f"{prefix}torch-fp32", backend="torch", precision="fp32", source=stage,
                                device="cpu", kind="torch", path=str(d), model_dir=str(d), size_bytes=_dir_size(d),
                                registry="torch-fp32"))
    return sources


def _onnx_rows(manifest: dict, onnx_dir: Path, source: str, prefix: str, ort_cuda: bool,
               stage: str = "onnx") -> list[Variant]:
    rows = []
    metrics = manifest.get("metrics") or {}
    if manifest.get("status") != "ok":
        return [Variant(f"{prefix}{'ort' if stage == 'onnx' else stage}", backend="onnxruntime", precision="-",
                        source=source, device="cpu", kind="onnx", status=manifest.get("status") or "failed",
                        reason=manifest.get("reason") or f"the {stage} stage did not finish")]
    for key, v in (metrics.get("variants") or {}).items():
        devices = v.get("devices") or ["cpu"]
        spec = variants.by_key(stage, key)
        if spec is None:  # written by a newer checkout: show it, do not guess how to open it
            rows.append(Variant(f"{prefix}{key}", backend=v.get("backend") or "?", precision=v.get("precision") or "-",
                                source=source, device="cpu", kind="onnx", status="skipped",
                                reason=f"variant {key!r} is not in this checkout's registry"))
            continue
        base = dict(backend=spec.backend, precision=v.get("precision") or spec.precision, source=source,
                    kind="onnx", registry=spec.name,
                    path=str(onnx_dir / v["file"]) if v.get("file") else None, model_dir=str(onnx_dir),
                    variant=key, size_bytes=_model_size(onnx_dir / v["file"], v.get("size_bytes"))
                    if v.get("file") else v.get("size_bytes"),
                    extra={"export_parity": v.get("parity"), "export_accuracy": v.get("accuracy"),
                           "export_accuracy_delta": v.get("accuracy_delta")})
        status, reason = v.get("status") or "failed", v.get("reason")
        name = prefix + spec.name
        if status != "ok":
            rows.append(Variant(name, device=devices[0], status=status, reason=reason or f"{status} by the ONNX stage",
                                **base))
            continue
        if "cpu" in devices:
            rows.append(Variant(name, device="cpu", **base))
        if "cuda" in devices:
            cname = name + "-cuda" if "cpu" in devices else name
            rows.append(Variant(cname, device="cuda", status="ok" if ort_cuda else "skipped",
                                reason=None if ort_cuda else f"{NO_CUDA} (and onnxruntime-gpu)", **base))
    return rows


def _trt_rows(manifest: dict, trt_dir: Path, onnx_dir: Path, source: str, prefix: str, cuda: bool) -> list[Variant]:
    if manifest.get("status") != "ok":
        return [Variant(f"{prefix}trt", backend="tensorrt", precision="-", source=source, device="cuda",
                        kind="tensorrt", status=manifest.get("status") or "failed",
                        reason=manifest.get("reason") or "the TensorRT stage did not finish")]
    rows = []
    for prec, e in ((manifest.get("metrics") or {}).get("engines") or {}).items():
        status = e.get("status") or "failed"
        if status == "ok" and not cuda:
            status, reason = "skipped", NO_CUDA
        else:
            reason = e.get("reason")
        spec = variants.by_key("tensorrt", prec)
        rows.append(Variant(prefix + spec.name, backend="tensorrt", precision=prec, source=source, device="cuda",
                            kind="tensorrt", registry=spec.name, path=str(trt_dir / e["file"]) if e.get("file") else None,
                            model_dir=str(onnx_dir), variant=prec, size_bytes=e.get("size_bytes"),
                            status=status, reason=reason))
    return rows
