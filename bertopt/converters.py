"""The ONNX stage's converters: the registry's ``builder`` of each ONNX-stage variant
(:mod:`bertopt.variants`), called by :func:`bertopt.onnx_stage.build_variant` as
``(cfg, ref, out_dir, spec, built) -> manifest facts``. The pure src -> dst functions they wrap live
in :mod:`bertopt.export`."""
from __future__ import annotations

from pathlib import Path

from . import export as ex
from . import families, variants, width


def build_opt(cfg, ref, out_dir: Path, spec, built: dict) -> dict:
    return build_fused(ref.config, out_dir / spec.built_from, out_dir / spec.file)


def build_fused(config, src: Path, dst: Path) -> dict:
    """model.opt.onnx with the optimizer type the families table names. VariantUnavailable where
    the architecture has no attention fusion (known, or found out for a family outside the table);
    a table family that should fuse but fuses nothing is an export bug and fails."""
    model_type, reason = families.ort_fusion(config)
    if model_type is None:
        raise ex.VariantUnavailable(reason)
    try:
        heads = width.num_heads(config)  # a head-pruned model: fewer heads than hidden / head size
        return dict(ex.optimize(src, dst, heads, heads * width.head_size(config), model_type),
                    model_type=model_type)
    except ex.NoAttentionFused as exc:
        if families.family(config).known:
            raise
        raise ex.VariantUnavailable(f"{exc} (model type {config.model_type!r} is not in the families table)") from None


def _int8(cfg, base: Path, dst: Path) -> dict:
    reduce_range, why = ((cfg.int8_reduce_range, "set by --int8-reduce-range")
                         if cfg.int8_reduce_range is not None else ex.default_reduce_range())
    facts = ex.quantize_int8(base, dst, per_channel=cfg.int8_per_channel, reduce_range=reduce_range)
    return dict(facts, reduce_range_reason=why, from_file=base.name)


def build_int8(cfg, ref, out_dir: Path, spec, built: dict) -> dict:
    opt_ok = built.get("opt", {}).get("status") == "ok"
    return _int8(cfg, out_dir / (spec.built_from if opt_ok else variants.by_key("onnx", "fp32").file), out_dir / spec.file)


def build_int8_unfused(cfg, ref, out_dir: Path, spec, built: dict) -> dict:
    int8 = built.get("int8", {})
    if int8.get("status") == "ok" and int8.get("from_file") == spec.built_from:
        raise ex.VariantUnavailable("int8 is already the unfused graph's INT8 (the fused graph was not built)")
    return _int8(cfg, out_dir / spec.built_from, out_dir / spec.file)


def build_int4(cfg, ref, out_dir: Path, spec, built: dict) -> dict:
    src = out_dir / spec.built_from
    return dict(ex.quantize_int4(src, out_dir / spec.file, block_size=cfg.int4_block_size), from_file=src.name)


def build_fp16(cfg, ref, out_dir: Path, spec, built: dict) -> dict:
    src = out_dir / spec.built_from
    return dict(ex.convert_fp16(src, out_dir / spec.file), from_file=src.name)


def build_qdq(cfg, ref, out_dir: Path, spec, built: dict) -> dict:
    """One calibration, two files: the signed TensorRT Q/DQ model (trt-int8's input, checked
    against what TensorRT's explicit quantization takes) and its CPU form (``spec.file``)."""
    from . import qdq

    src = out_dir / spec.built_from
    trt_file = out_dir / variants.get("trt-int8").built_from
    feeds = ref.calibration_feeds(cfg.calibration_samples, fixed_shape=cfg.calibration_method != "minmax")
    facts = ex.quantize_qdq(src, trt_file, feeds, per_channel=cfg.qdq_per_channel,
                            method=cfg.calibration_method, exclude_ffn_output=cfg.qdq_exclude == "ffn-output")
    problems = qdq.trt_problems(trt_file)
    return dict(facts, from_file=src.name, tensorrt_file=trt_file.name,
                tensorrt_check=problems[:5] or "ok", cpu_form=qdq.cpu_qdq(trt_file, out_dir / spec.file))


def build_ov_int8(cfg, ref, out_dir: Path, spec, built: dict) -> dict:
    src = out_dir / spec.built_from
    feeds = ref.calibration_feeds(cfg.calibration_samples)
    return dict(ex.quantize_nncf(src, out_dir / spec.file, feeds), from_file=src.name)
