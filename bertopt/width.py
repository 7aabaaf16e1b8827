"""Physical width pruning: attention heads and FFN neurons, the same count kept in every layer.

Importance (higher = keep): a head's is Michel et al. (2019)'s gate sensitivity |dL/d gate_h|, a
neuron's |activation x gradient| (the same first-order quantity for a gate on the neuron), both
accumulated batch by batch over training rows (:func:`importance`). Removal (:func:`shrink`)
replaces the projections by smaller ``nn.Linear``s (no masks): Q/K/V rows and the attention output
projection's columns per removed head; the FFN input rows and output columns per removed neuron.

What transformers 5.x can express in a config: every family's FFN width is ``intermediate_size``
(DistilBERT ``hidden_dim``), so an FFN-pruned model is a plain model the Auto classes load.
transformers 5 dropped ``pruned_heads``/``prune_heads``, and every family derives the head size
as hidden / num_heads (DeBERTa-v2 reads ``attention_head_size`` but sizes its output projection
hidden x hidden; ModernBERT's ``head_dim`` sizes only the rotary table), so fewer heads of the same
size cannot be described in any of the 10 families' configs: a head-pruned model gets
``bertopt_attention_heads`` in config.json and loads through :func:`bertopt.modeling.load_model`
(the Auto classes refuse it with a size-mismatch error, never load it wrongly); its ONNX export is
the deliverable. This module knows each family's module names (:data:`SPECS`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from . import families
from .errors import ConfigError

log = logging.getLogger("bertopt.width")

HEADS_KEY = "bertopt_attention_heads"  # config.json key for head counts the config cannot express


@dataclass(frozen=True)
class WidthSpec:
    attn: str  # block -> attention module holding the Q/K/V projections (and the head-count attributes)
    qkv: tuple[str, ...]  # Linear(s) under ``attn`` laid out head by head (h*d + i)
    out: str  # block -> the attention output projection (input columns = heads)
    ffn_in: str  # block -> the FFN's first Linear (rows = neurons)
    ffn_out: str  # block -> the FFN's second Linear (columns = neurons)
    head_attrs: tuple[str, ...] = ("num_attention_heads",)  # attributes of ``attn`` holding the head count
    fused_qkv: str = ""  # one Linear for Q, K and V: "3hd" (ModernBERT) or "h3d" (DeBERTa: per head q,k,v)
    head_vectors: tuple[str, ...] = ()  # per-head bias Parameters under ``attn``
    optional_qkv: tuple[str, ...] = ()  # per-head Linears that exist only with some settings
    glu: bool = False  # the FFN's first Linear holds [input; gate] (2 x width rows)
    shared_heads: str = ""  # why every layer must keep the same heads ("" = each layer its own)
    ffn_key: str = "intermediate_size"


_BERT = WidthSpec("attention.self", ("query", "key", "value"), "attention.output.dense", "intermediate.dense",
                  "output.dense")
SPECS: dict[str, WidthSpec] = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT,
    "distilbert": WidthSpec("attention", ("q_lin", "k_lin", "v_lin"), "attention.out_lin", "ffn.lin1", "ffn.lin2",
                            head_attrs=("n_heads",), ffn_key="hidden_dim"),
    "albert": WidthSpec("attention", ("query", "key", "value"), "attention.dense", "ffn", "ffn_output"),
    "deberta": WidthSpec("attention.self", (), "attention.output.dense", "intermediate.dense", "output.dense",
                         fused_qkv="h3d", head_vectors=("q_bias", "v_bias"), optional_qkv=("pos_proj", "pos_q_proj")),
    "deberta-v2": WidthSpec("attention.self", ("query_proj", "key_proj", "value_proj"), "attention.output.dense",
                            "intermediate.dense", "output.dense", optional_qkv=("pos_key_proj", "pos_query_proj")),
    "mpnet": WidthSpec("attention.attn", ("q", "k", "v"), "attention.attn.o", "intermediate.dense", "output.dense",
                       shared_heads="MPNet's relative position bias is one table for all layers, one column per head"),
    "modernbert": WidthSpec("attn", (), "attn.Wo", "mlp.Wi", "mlp.Wo", head_attrs=(), fused_qkv="3hd", glu=True),
}


def spec(model_or_config) -> Optional[WidthSpec]:
    return SPECS.get(families.family(model_or_config).name)


def unsupported_reason(model_or_config) -> str:
    """'' when width pruning is supported, else the one-line reason."""
    config = getattr(model_or_config, "config", model_or_config)
    row = spec(config)
    if row is None:
        return (f"width pruning knows no module layout for model type {config.model_type!r} "
                f"(supported: {', '.join(SPECS)}); depth pruning still applies")
    if row.fused_qkv == "h3d" and getattr(config, "talking_head", False):
        return "DeBERTa with talking heads mixes all heads in every layer, so a head cannot be removed alone"
    return ""


def _get(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _set(root, path: str, value) -> None:
    *parent, last = path.split(".")
    setattr(_get(root, ".".join(parent)) if parent else root, last, value)


def blocks(model) -> list:
    """The transformer blocks that own weights (ALBERT: its shared layer(s))."""
    layers = families.encoder_layers(model)
    if families.shares_layers(model):
        return [lay for group in layers for lay in group.albert_layers]
    return list(layers)


def _config(model):
    return getattr(model, "config", model)


def num_heads(model_or_config) -> int:
    """Attention heads per layer now (a pruned model's smaller count)."""
    config = _config(model_or_config)
    stored = getattr(config, HEADS_KEY, None)
    if stored:
        return int(stored)
    return int(getattr(config, "num_attention_heads", None) or getattr(config, "n_heads"))


def head_size(model_or_config) -> int:
    config = _config(model_or_config)
    explicit = getattr(config, "attention_head_size", None)
    if explicit:
        return int(explicit)
    hidden = int(getattr(config, "hidden_size", None) or getattr(config, "dim"))
    return hidden // int(getattr(config, "num_attention_heads", None) or getattr(config, "n_heads"))


def ffn_width(model_or_config) -> int:
    config = _config(model_or_config)
    row = spec(config)
    return int(getattr(config, row.ffn_key if row else "intermediate_size"))


def check_request(model_or_config, heads: Optional[int], ffn: Optional[int]) -> None:
    """ConfigError (one line) for an impossible --heads / --ffn-width on this model."""
    if heads is None and ffn is None:
        return
    reason = unsupported_reason(model_or_config)
    if reason:
        raise ConfigError(f"--heads/--ffn-width: {reason}")
    h, w = num_heads(model_or_config), ffn_width(model_or_config)
    if heads is not None and not 1 <= heads <= h:
        raise ConfigError(f"--heads {heads}: the model has {h} attention heads per layer; keep 1..{h}")
    if ffn is not None and not 1 <= ffn <= w:
        raise ConfigError(f"--ffn-width {ffn}: the model's FFN width is {w}; keep 1..{w}")


# ----------------------------------------------------------------------------- importance
def _gate_hook(gate, repeat: int):
    def hook(module, args):
        x = args[0]
        g = gate.repeat_interleave(repeat) if repeat > 1 else gate
        return (x * g.to(x.dtype),) + tuple(args[1:])

    return hook


def importance(model, loader, device, loss_fn: Callable, max_batches: Optional[int] = None) -> dict:
    """{"heads": [[per-head score] per block], "neurons": [[per-neuron score] per block], "batches": n}:
    |d loss / d gate| summed batch by batch, for a gate (all ones) on each head's context output and
    each FFN neuron's activation. Head scores are normalised per layer (L2, as Michel et al.)."""
    import torch

    from .logs import progress

    def _to_device(batch, device, non_blocking):  # (not training's: the serving archive vendors this module)
        return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items() if k not in ("labels", "index")}

    row = spec(model)
    d = head_size(model)
    bl = blocks(model)
    gates, handles = [], []
    for b in bl:
        hg = torch.ones(num_heads(model), device=device, requires_grad=True)
        ng = torch.ones(_get(b, row.ffn_out).in_features, device=device, requires_grad=True)
        handles.append(_get(b, row.out).register_forward_pre_hook(_gate_hook(hg, d)))
        handles.append(_get(b, row.ffn_out).register_forward_pre_hook(_gate_hook(ng, 1)))
        gates.append((hg, ng))
    head_sum = [torch.zeros_like(h) for h, _ in gates]
    neuron_sum = [torch.zeros_like(n) for _, n in gates]
    was_training, n = model.training, 0
    model.eval()
    try:
        for batch in progress(loader, desc="width importance", unit="batch"):
            if max_batches is not None and n >= max_batches:
                break
            inputs = _to_device(batch, device, non_blocking=False)
            y = batch["labels"].to(device)
            model.zero_grad(set_to_none=True)
            for hg, ng in gates:
                hg.grad = ng.grad = None
            loss = loss_fn(model(**inputs).logits.float(), y)
            loss.backward()
            with torch.no_grad():
                for i, (hg, ng) in enumerate(gates):
                    head_sum[i] += hg.grad.abs()
                    neuron_sum[i] += ng.grad.abs()
            n += 1
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    heads = [(h / (h.norm() + 1e-20)).tolist() for h in head_sum]
    return {"heads": heads, "neurons": [s.tolist() for s in neuron_sum], "batches": n}


def keep_indices(scores: Sequence[Sequence[float]], keep: int, shared: bool = False) -> list[list[int]]:
    """Per block, the ``keep`` highest-scoring indices (ascending); ``shared``: one set chosen by the
    summed scores for every block. Ties keep the lower index."""
    if shared:
        total = [sum(col) for col in zip(*scores)]
        best = sorted(sorted(range(len(total)), key=lambda j: (-total[j], j))[:keep])
        return [list(best) for _ in scores]
    return [sorted(sorted(range(len(s)), key=lambda j: (-s[j], j))[:keep]) for s in scores]


# ----------------------------------------------------------------------------- removal
def _rows(keep: Sequence[int], d: int, n: int, layout: str = "hd") -> list[int]:
    """Row indices of the kept heads in a projection laid out ``hd`` (h*d+i), ``3hd`` (Q, K, V
    blocks of n heads) or ``h3d`` (per head q, k, v)."""
    if layout == "3hd":
        return [t * n * d + h * d + i for t in range(3) for h in keep for i in range(d)]
    if layout == "h3d":
        return [h * 3 * d + j for h in keep for j in range(3 * d)]
    return [h * d + i for h in keep for i in range(d)]


def _sliced(linear, rows=None, cols=None):
    import torch

    w = linear.weight.detach()
    if rows is not None:
        w = w[torch.as_tensor(rows, device=w.device)]
    if cols is not None:
        w = w[:, torch.as_tensor(cols, device=w.device)]
    bias = linear.bias is not None
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias:
            b = linear.bias.detach()
            new.bias.copy_(b[torch.as_tensor(rows, device=b.device)] if rows is not None else b)
    new.train(linear.training)
    return new


def _shrink_heads(block, row: WidthSpec, keep: Sequence[int], d: int, n: int) -> None:
    import torch

    attn = _get(block, row.attn)
    rows = _rows(keep, d, n)
    for name in row.qkv + tuple(p for p in row.optional_qkv if getattr(attn, p, None) is not None):
        setattr(attn, name, _sliced(getattr(attn, name), rows=rows))
    if row.fused_qkv:
        name = "Wqkv" if row.fused_qkv == "3hd" else "in_proj"
        setattr(attn, name, _sliced(getattr(attn, name), rows=_rows(keep, d, n, row.fused_qkv)))
    for name in row.head_vectors:
        old = getattr(attn, name)
        setattr(attn, name, torch.nn.Parameter(old.detach()[torch.as_tensor(rows, device=old.device)].clone()))
    _set(block, row.out, _sliced(_get(block, row.out), cols=rows))
    for name in row.head_attrs:
        setattr(attn, name, len(keep))
    if hasattr(attn, "all_head_size"):
        attn.all_head_size = len(keep) * d


def _shrink_shared_bias(model, keep: Sequence[int]) -> None:
    """MPNet: the encoder's relative position bias table keeps one column per kept head."""
    import torch

    encoder = model.base_model.encoder
    old = encoder.relative_attention_bias
    new = torch.nn.Embedding(old.num_embeddings, len(keep), device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight.detach()[:, torch.as_tensor(list(keep), device=old.weight.device)])
    encoder.relative_attention_bias = new
    encoder.n_heads = len(keep)


def _shrink_ffn(block, row: WidthSpec, keep: Sequence[int]) -> None:
    first = _get(block, row.ffn_in)
    rows = list(keep)
    if row.glu:
        width = first.out_features // 2
        rows = rows + [width + j for j in keep]
    _set(block, row.ffn_in, _sliced(first, rows=rows))
    _set(block, row.ffn_out, _sliced(_get(block, row.ffn_out), cols=list(keep)))


def shrink(model, heads_keep: Optional[Sequence[Sequence[int]]] = None,
           neurons_keep: Optional[Sequence[Sequence[int]]] = None, copy_model: bool = True):
    """``model`` (a deep copy unless ``copy_model`` is False) with only the kept heads / FFN neurons
    of every block (one index list per block from :func:`blocks`; every list the same length)."""
    import copy

    reason = unsupported_reason(model)
    if reason:
        raise ConfigError(reason)
    row = spec(model)
    out = copy.deepcopy(model) if copy_model else model
    bl = blocks(out)
    d, n = head_size(out), num_heads(out)
    config = out.config
    if heads_keep is not None and len(heads_keep[0]) < n:
        if len({len(k) for k in heads_keep}) != 1 or len(heads_keep) != len(bl):
            raise ValueError("heads_keep needs one list per block, all the same length")
        k = len(heads_keep[0])
        if row.shared_heads:
            if any(list(h) != list(heads_keep[0]) for h in heads_keep):
                raise ValueError(f"every layer must keep the same heads: {row.shared_heads}")
            _shrink_shared_bias(out, heads_keep[0])
        for b, keep in zip(bl, heads_keep):
            _shrink_heads(b, row, keep, d, n)
        setattr(config, HEADS_KEY, k)
    if neurons_keep is not None and len(neurons_keep[0]) < ffn_width(out):
        if len({len(k) for k in neurons_keep}) != 1 or len(neurons_keep) != len(bl):
            raise ValueError("neurons_keep needs one list per block, all the same length")
        for b, keep in zip(bl, neurons_keep):
            _shrink_ffn(b, row, keep)
        setattr(config, row.ffn_key, len(neurons_keep[0]))
    return out


def auto_loadable(model_or_config) -> bool:
    """Whether transformers' Auto classes load the saved model without bertopt."""
    return not getattr(_config(model_or_config), HEADS_KEY, None)


def load_pruned(path: str, config, model_cls, **kwargs):
    """A saved model whose head count only bertopt knows (``bertopt_attention_heads``): build it at
    full width from the config, remove heads down to the stored count, then load the weights."""
    from pathlib import Path

    from safetensors.torch import load_file

    k = int(getattr(config, HEADS_KEY))
    delattr(config, HEADS_KEY)
    for key, value in kwargs.items():
        if key in ("problem_type", "num_labels", "id2label", "label2id"):
            setattr(config, key, value)
    model = model_cls.from_config(config, **({"attn_implementation": kwargs["attn_implementation"]}
                                             if "attn_implementation" in kwargs else {}))
    n = len(blocks(model))
    model = shrink(model, heads_keep=[list(range(k))] * n, copy_model=False)
    files = sorted(Path(path).glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids") and "decoder" not in m]
    if missing or unexpected:
        raise ValueError(f"{path}: the pruned weights do not match ({len(missing)} missing, e.g. "
                         f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
