"""Quantization-aware training with NVIDIA ModelOpt (``nvidia-modelopt``, imported lazily).

Fake quantization goes in with the settings TensorRT's explicit INT8 takes and ONNX Runtime and
OpenVINO accept: symmetric signed INT8, zero-point 0, weights per output channel, activations per
tensor (ModelOpt's ``INT8_DEFAULT_CFG``, max calibration). Only the encoder's Linear layers are
quantized (their inputs and weights): LayerNorm inputs, the pooler and the classifier stay float,
as in the post-training Q/DQ variant. The exported ONNX is then put in the form every consumer
reads: scales/zero-points as initializers, weights stored as INT8 (the weight QuantizeLinear
folded) and laid out ``[in, out]`` for MatMul with the scale on axis 1 (the output channel).

Why ModelOpt and not NNCF (both checked on torch 2.13.0 / transformers 5.25, see the README):
ModelOpt quantizes a transformers model in place with a forward loop, trains on CPU through
plain ``torch`` fake-quant ops and exports QuantizeLinear/DequantizeLinear from the same modules
through ``torch.onnx.export`` (the TensorRT path it is built for). NNCF 3.4's PyTorch path traced
and calibrated MiniLM, then had to JIT-compile its C++ fake-quant extension
(``quantized_functions_cpu``) at first use, which hit NNCF's 180 s load timeout on the 2-core build
machine (a compiler toolchain at run time, minutes per fresh environment); its TRANSFORMER preset
also applies SmoothQuant, which rewrites weights, not the plain TensorRT recipe.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from .errors import PipelineError

log = logging.getLogger("bertopt.qat")

INSTALL_HINT = "pip install -r requirements-qat.txt (nvidia-modelopt)"
# quantizers left off: everything that is not an encoder Linear's input or weight
DISABLED = ("*LayerNorm*", "*layernorm*", "*layer_norm*", "*classifier*", "*pooler*", "*pre_classifier*",
            "*output_quantizer", "*bmm_quantizer", "*embeddings*")


class QatUnavailable(PipelineError):
    """QAT cannot run here or on this model (recorded as 'skipped' with the reason)."""


def modelopt():
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise QatUnavailable(f"nvidia-modelopt is not installed ({INSTALL_HINT}): {exc}") from None
    return mtq


def quant_config() -> dict:
    """INT8_DEFAULT_CFG (weights axis 0 of the [out, in] Linear weight = per output channel,
    activations per tensor, 8 bits signed, max calibration) with :data:`DISABLED` switched off."""
    import copy

    mtq = modelopt()
    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    rules = cfg["quant_cfg"]
    extra = [{"quantizer_name": p, "enable": False} for p in DISABLED]
    cfg["quant_cfg"] = rules + extra if isinstance(rules, list) else dict(rules, **{p: {"enable": False}
                                                                                    for p in DISABLED})
    return cfg


def insert_fake_quant(model, calibrate: Callable[[object], None]) -> dict:
    """Quantize ``model`` in place (fake quant + max calibration through ``calibrate(model)``);
    QatUnavailable when no Linear of the encoder got a quantizer (a family the library cannot
    quantize) or ModelOpt fails on the architecture."""
    mtq = modelopt()
    try:
        mtq.quantize(model, quant_config(), forward_loop=calibrate)
    except Exception as exc:  # ModelOpt on an architecture it does not handle
        raise QatUnavailable(f"ModelOpt cannot quantize {type(model).__name__}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    counts = quantizer_counts(model)
    if not counts["weight"]:
        raise QatUnavailable(f"ModelOpt found no Linear layer to quantize in {type(model).__name__} "
                             f"(model type {getattr(model.config, 'model_type', '?')!r})")
    return counts


def quantizer_counts(model) -> dict:
    weight = act = 0
    for name, module in model.named_modules():
        if type(module).__name__ != "TensorQuantizer" or not getattr(module, "is_enabled", False):
            continue
        if name.endswith("weight_quantizer"):
            weight += 1
        elif name.endswith("input_quantizer"):
            act += 1
    return {"weight": weight, "activation": act}


def dropout_off(model) -> int:
    """Set every Dropout's p to 0 (QAT fine-tunes a converged model: no regularisation noise)."""
    import torch

    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
            n += 1
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)
    return n


# ----------------------------------------------------------------------------- ONNX
def export(model, input_names, dst: str | os.PathLike, opset: int = 17) -> dict:
    """torch.onnx.export of the fake-quant model (Q/DQ pairs from ModelOpt's symbolic functions),
    then :func:`canonicalize`."""
    import warnings

    import torch

    from . import export as ex

    model = model.eval()
    batch = ex.dummy_batch(input_names, batch=2, seq=8, vocab=model.config.vocab_size)
    args = tuple(torch.from_numpy(batch[n]) for n in input_names)
    names = list(input_names)

    class _Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return self.inner(**dict(zip(names, inputs))).logits

    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[ex.OUTPUT_NAME] = {0: "batch"}
    dst = Path(dst)
    raw = dst.with_name(f".{dst.name}.raw")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(model), args, str(raw), input_names=names, output_names=[ex.OUTPUT_NAME],
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False)
    facts = canonicalize(raw, dst)
    raw.unlink()
    return dict(facts, opset=opset, exporter="torchscript (dynamo=False) + ModelOpt Q/DQ symbolics")


def canonicalize(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
    """Constants -> initializers; weight QuantizeLinear folded into INT8 initializers; a
    ``DQ(axis 0) -> Transpose -> MatMul`` weight re-laid as ``DQ(axis 1) -> MatMul``."""
    import onnx

    model = onnx.load(str(src))
    graph = model.graph
    _constants_to_initializers(graph)
    folded = _fold_weight_quantizers(graph)
    transposed = _drop_weight_transposes(graph)
    from .qdq import _drop_unread

    _drop_unread(graph)
    onnx.checker.check_model(model)
    from . import model_files

    model_files.save(model, dst)  # the pipeline's one rule: external data above the threshold
    return {"weight_quantizers_folded": folded, "weight_transposes_folded": transposed}


def _constants_to_initializers(graph) -> None:
    from onnx import numpy_helper

    for node in [n for n in graph.node if n.op_type == "Constant"]:
        attr = next((a for a in node.attribute if a.name == "value"), None)
        if attr is None:
            continue
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(attr.t), node.output[0]))
        graph.node.remove(node)


def _fold_weight_quantizers(graph) -> int:
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    n = 0
    for q in [x for x in graph.node if x.op_type == "QuantizeLinear" and x.input[0] in inits]:
        w = numpy_helper.to_array(inits[q.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[q.input[1]]).astype(np.float32)
        zp = numpy_helper.to_array(inits[q.input[2]]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.int8)
        if scale.ndim == 1 and scale.size > 1:
            axis = next((a.i for a in q.attribute if a.name == "axis"), 1) % w.ndim
            shape = [1] * w.ndim
            shape[axis] = scale.size
            scale, zpb = scale.reshape(shape), zp.reshape(shape).astype(np.float32)
        else:
            zpb = zp.astype(np.float32)
        info = np.iinfo(zp.dtype)
        qw = np.clip(np.rint(w / scale) + zpb, info.min, info.max).astype(zp.dtype)
        name = f"{q.input[0]}_quantized"
        graph.initializer.append(numpy_helper.from_array(qw, name))
        for node in graph.node:
            for k, i in enumerate(node.input):
                if i == q.output[0]:
                    node.input[k] = name
        n += 1
    return n


def _drop_weight_transposes(graph) -> int:
    """DQ(int8 [out, in], axis 0) -> Transpose(perm 1,0) -> MatMul  =>  DQ(int8 [in, out], axis 1) -> MatMul."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    n = 0
    for t in [x for x in graph.node if x.op_type == "Transpose"]:
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        dq = next((x for x in graph.node if x.op_type == "DequantizeLinear" and x.output[0] == t.input[0]), None)
        if dq is None or perm != [1, 0] or dq.input[0] not in inits or len(readers.get(dq.output[0], [])) != 1:
            continue
        w = numpy_helper.to_array(inits[dq.input[0]])
        name = f"{dq.input[0]}_t"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
        dq.input[0] = name
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        for a in list(dq.attribute):
            if a.name == "axis":
                dq.attribute.remove(a)
        dq.attribute.append(helper.make_attribute("axis", 1 - axis % 2))
        for node in readers.get(t.output[0], []):
            for k, i in enumerate(node.input):
                if i == t.output[0]:
                    node.input[k] = dq.output[0]
        graph.node.remove(t)
        n += 1
    return n


def fake_quant_logits(model, batches: Iterable[dict]) -> list[np.ndarray]:
    """The fake-quant PyTorch model's logits on numpy feeds (the parity reference of the export)."""
    import torch

    out = []
    model.eval()
    with torch.no_grad():
        for b in batches:
            out.append(model(**{k: torch.from_numpy(np.asarray(v)) for k, v in b.items()}).logits.float().numpy())
    return out


def library_versions() -> dict:
    from importlib import metadata

    out: dict[str, Optional[str]] = {}
    for name in ("nvidia-modelopt", "torch", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
