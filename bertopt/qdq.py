"""Explicit Q/DQ INT8 models: the CPU form of a TensorRT Q/DQ file, the structural check TensorRT
needs, and the accuracy-aware search that keeps the most sensitive quantized nodes in float.

Why two files (measured with ONNX Runtime 1.32 on an AVX512-VNNI EPYC, MiniLM-L6):
TensorRT's explicit quantization wants *signed* INT8 activations with zero-point 0. ONNX Runtime's
CPU execution provider only fuses ``DequantizeLinear -> MatMul -> QuantizeLinear`` into an integer
``QLinearMatMul`` for signed activations after its ``QDQS8ToU8`` transformer has turned the pair
into uint8, and that transformer only rewrites a ``QuantizeLinear`` with a single consumer. In a
BERT the LayerNorm output feeds Q, K and V (and the intermediate input feeds the residual), so
those MatMuls, 24 of 42 in MiniLM, ran as ``DequantizeLinear`` + float ``MatMul`` + a re-quantize:
the static INT8 model was ~3x slower than FP32 at batch 1. :func:`cpu_qdq` does that s8 -> u8
rewrite on every activation pair offline: ``q_u8 = q_s8 + 128`` with zero-point 128 and the same
scale is the same set of real values (saturation bounds included), so the CPU file is the TensorRT
file's calibration, bit for bit in value, and every quantized MatMul becomes a U8S8 QLinearMatMul.
Weights stay signed int8, per channel.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

log = logging.getLogger("bertopt.qdq")

Q_OPS = ("QuantizeLinear",)
DQ_OPS = ("DequantizeLinear",)


def _constants(graph) -> set:
    return {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}


def cpu_qdq(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
    """Rewrite the signed activation Q/DQ pairs of ``src`` to unsigned (zero-point + 128) so ONNX
    Runtime's CPU provider runs integer kernels; weight DequantizeLinear nodes (constant int8
    input) are left as they are. Returns the count of rewritten nodes."""
    from onnx import numpy_helper

    from .export import load_onnx

    model = load_onnx(src)
    graph = model.graph
    consts = _constants(graph)
    inits = {i.name: i for i in graph.initializer}
    activation_q = [n for n in graph.node if n.op_type in Q_OPS and n.input[0] not in consts
                    and len(n.input) > 2 and _int8(inits.get(n.input[2]))]
    quantized = {n.output[0] for n in activation_q}
    activation_dq = [n for n in graph.node if n.op_type in DQ_OPS and n.input[0] in quantized]
    made: dict[str, str] = {}
    for node in activation_q + activation_dq:
        zp = node.input[2]
        if zp not in made:
            values = numpy_helper.to_array(inits[zp]).astype(np.int16) + 128
            made[zp] = f"{zp}_u8"
            graph.initializer.append(numpy_helper.from_array(values.astype(np.uint8), made[zp]))
        node.input[2] = made[zp]
    used = {i for n in graph.node for i in n.input}
    for old in [i for i in graph.initializer if i.name in made and i.name not in used]:
        graph.initializer.remove(old)
    from . import model_files

    model_files.save(model, dst)  # the pipeline's one rule: external data above the threshold
    return {"method": "signed activation Q/DQ -> uint8 (zero-point + 128), same scales",
            "rewritten_quantize": len(activation_q), "rewritten_dequantize": len(activation_dq),
            "from_file": Path(src).name}


def _int8(tensor) -> bool:
    import onnx

    return tensor is not None and tensor.data_type == onnx.TensorProto.INT8


# ----------------------------------------------------------------------------- TensorRT check
def weight_axis(consumer, input_index: int) -> Optional[int]:
    """The output-channel axis of a weight feeding ``consumer`` at ``input_index`` (MatMul B:
    [K, N] -> 1; Gemm B: 0 with transB else 1); None when the input is not a weight."""
    if consumer.op_type == "MatMul" and input_index == 1:
        return 1
    if consumer.op_type == "Gemm" and input_index == 1:
        trans = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans else 1
    return None


def trt_problems(path_or_model) -> list[str]:
    """What TensorRT's explicit INT8 (TensorRT 10/11) would refuse or mis-read in a Q/DQ model:
    every scale positive and finite, every zero-point 0 and INT8 (signed), weights per-channel
    on the output axis, activations per-tensor. An empty list means the file passes."""
    from onnx import numpy_helper

    from .export import load_onnx

    model = load_onnx(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consts = _constants(graph)
    consumers: dict[str, list] = {}
    for n in graph.node:
        for k, i in enumerate(n.input):
            consumers.setdefault(i, []).append((n, k))
    problems = []
    qdq = [n for n in graph.node if n.op_type in Q_OPS + DQ_OPS]
    if not qdq:
        return ["no QuantizeLinear/DequantizeLinear node: not an explicitly quantized model"]
    for n in qdq:
        scale = inits.get(n.input[1])
        if scale is None:
            problems.append(f"{n.name}: scale {n.input[1]} is not an initializer")
            continue
        s = numpy_helper.to_array(scale)
        if not (np.isfinite(s).all() and (s > 0).all()):
            problems.append(f"{n.name}: scale not positive and finite (min {s.min():g})")
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is None or not _int8(zp):
            problems.append(f"{n.name}: zero-point is not INT8 (signed INT8 is what TensorRT takes)")
        elif np.any(numpy_helper.to_array(zp) != 0):
            problems.append(f"{n.name}: zero-point not 0 (TensorRT quantization is symmetric)")
        weight = n.op_type in DQ_OPS and n.input[0] in consts
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if weight:
            for user, k in consumers.get(n.output[0], []):
                want = weight_axis(user, k)
                if want is not None and (s.ndim != 1 or s.size <= 1 or axis != want):
                    problems.append(f"{n.name}: weight of {user.op_type} {user.name} not per-channel on "
                                    f"axis {want} (scale shape {list(s.shape)}, axis {axis})")
        elif s.size != 1:
            problems.append(f"{n.name}: activation scale is per-channel (TensorRT wants per-tensor)")
    return problems


# ----------------------------------------------------------------------------- accuracy-aware PTQ
QUANTIZED_OPS = ("MatMul", "Gemm")


def quantized_nodes(path_or_model) -> list[str]:
    """Names of the MatMul/Gemm nodes that read a DequantizeLinear output (graph order)."""
    from .export import load_onnx

    model = load_onnx(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    dq = {o for n in model.graph.node if n.op_type in DQ_OPS for o in n.output}
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and any(i in dq for i in n.input)]


def keep_float(src: str | os.PathLike, dst: str | os.PathLike, names: Sequence[str]) -> dict:
    """Put ``names`` back in float in a Q/DQ model without re-calibrating: each reads its
    activation before the QuantizeLinear and its weight dequantized once, offline; quantizers
    nobody reads any more are removed. Every other node keeps its calibrated scales, which is
    what quantize_static(nodes_to_exclude=...) with the same calibration data gives."""
    from .export import load_onnx

    model = load_onnx(src)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    wanted = set(names)
    for node in graph.node:
        if node.name not in wanted:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type not in DQ_OPS:
                continue
            if dq.input[0] in inits:
                node.input[k] = _dequantized_weight(graph, dq, inits)
            elif dq.input[0] in producer and producer[dq.input[0]].op_type in Q_OPS:
                node.input[k] = producer[dq.input[0]].input[0]
    _bypass_unused_activation_pairs(graph)
    _drop_unread(graph)
    from . import model_files

    model_files.save(model, dst)  # the pipeline's one rule: external data above the threshold
    return {"kept_float": [n for n in names], "method": "Q/DQ removed around the nodes (same calibration)"}


def _dequantized_weight(graph, dq, inits) -> str:
    from onnx import numpy_helper

    out = f"{dq.input[0]}_float"
    if out not in inits:
        q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
        zp = (numpy_helper.to_array(inits[dq.input[2]]).astype(np.float32) if len(dq.input) > 2 and dq.input[2]
              else np.zeros_like(scale))
        if scale.ndim == 1 and scale.size > 1:
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % q.ndim
            shape = [1] * q.ndim
            shape[axis] = scale.size
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        inits[out] = numpy_helper.from_array(((q - zp) * scale).astype(np.float32), out)
        graph.initializer.append(inits[out])
    return out


def _bypass_unused_activation_pairs(graph) -> None:
    """An activation Q/DQ pair that no quantized node reads any more only adds rounding (e.g. to
    the residual Add beside Q/K/V): its readers take the float tensor, as the quantizer would have
    left them had those nodes been excluded from the start."""
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for dq in [n for n in graph.node if n.op_type in DQ_OPS]:
        q = producer.get(dq.input[0])
        if q is None or q.op_type not in Q_OPS:
            continue
        users = readers.get(dq.output[0], [])
        if any(u.op_type in QUANTIZED_OPS for u in users):
            continue
        for u in users:
            for k, name in enumerate(u.input):
                if name == dq.output[0]:
                    u.input[k] = q.input[0]


def _drop_unread(graph) -> None:
    """Remove Q/DQ nodes (and initializers) that nothing reads, until none is left."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in Q_OPS + DQ_OPS and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    read = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)


@dataclass
class SearchResult:
    kept_float: list[str]
    steps: list[dict] = field(default_factory=list)
    met_budget: bool = False
    sensitivity: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kept_float": list(self.kept_float), "steps": list(self.steps), "met_budget": self.met_budget,
                "sensitivity": dict(self.sensitivity)}


def accuracy_aware(candidates: Sequence[str], score: Callable[[list[str]], float], reference: float,
                   budget: float, max_steps: int = 8, sensitivity: Optional[dict] = None,
                   group: int = 1) -> SearchResult:
    """Greedy: rank ``candidates`` (quantized nodes) by sensitivity, then keep the most sensitive
    ones in float, ``group`` more per step, until ``score(excluded)`` is within ``budget`` of
    ``reference`` or ``max_steps`` steps have been scored. ``score`` builds and scores the model
    with those nodes left in float on a split that is not the reported one. ``sensitivity``
    (node -> metric lost when only that node is quantized; larger = keep in float first) is
    measured as ``reference - score(every other candidate in float)`` when not given. Every step is recorded."""
    result = SearchResult(kept_float=[])
    start = score([])
    result.steps.append({"kept_float": [], "score": start, "delta": start - reference})
    if start >= reference - budget:
        result.met_budget = True
        return result
    if sensitivity is None:
        sensitivity = {c: reference - score([x for x in candidates if x != c]) for c in candidates}
    result.sensitivity = dict(sensitivity)
    ranked = sorted(candidates, key=lambda c: -sensitivity.get(c, 0.0))
    kept: list[str] = []
    for step in range(max_steps):
        nxt = ranked[len(kept):len(kept) + max(group, 1)]
        if not nxt:
            break
        kept = kept + nxt
        value = score(list(kept))
        result.steps.append({"kept_float": list(kept), "score": value, "delta": value - reference})
        log.info("accuracy-aware INT8 step %d: %d node(s) in float, metric %.4f (%+.2f pt)",
                 step + 1, len(kept), value, (value - reference) * 100)
        if value >= reference - budget:
            result.met_budget = True
            break
    met = [s for s in result.steps if s["score"] >= reference - budget]
    best = min(met, key=lambda s: len(s["kept_float"])) if met else max(result.steps, key=lambda s: s["score"])
    result.kept_float = list(best["kept_float"])
    return result
