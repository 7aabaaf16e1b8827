"""The table of encoder families: the one place that knows how each architecture is laid out.

For each family (keyed by ``config.model_type``) it records where the stack of transformer blocks
lives, whether the model takes ``token_type_ids``, what ONNX Runtime's transformer optimizer calls
it (or why it has no attention fusion), how its position limit is counted and how layer removal
works. Every other module asks these functions; none special-cases a family by name. A family
that is not in the table gets generic behaviour and one logged warning, and only the operations
that need a missing fact (freezing, pruning) fail, with a one-line reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from .errors import ModelError

log = logging.getLogger("bertopt.families")

_NO_FUSION = ("ONNX Runtime's transformer optimizer has no attention fusion for {what}, so model.opt.onnx "
              "would be no faster than model.onnx")


@dataclass(frozen=True)
class Family:
    name: str
    layers: Optional[str]  # dotted path from ``model.base_model`` to the blocks' ModuleList; None = unknown
    token_type_ids: bool  # takes token_type_ids (used only when config.type_vocab_size > 0)
    ort_model_type: Optional[str]  # onnxruntime.transformers.optimizer model_type; None = no fusion
    no_fusion_reason: str = ""  # why ort_model_type is None
    positions_after_pad: bool = False  # position ids start at pad_token_id + 1 (RoBERTa-style)
    shared_layers: bool = False  # one block's weights repeated num_hidden_layers times (ALBERT)
    per_layer_config: tuple[str, ...] = ()  # config lists with one entry per layer (shrink on removal)
    fixed_first_layer: str = ""  # why layer 0 cannot be pruned ("" = it can)
    known: bool = True


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("bert", "encoder.layer", True, "bert"),
    Family("distilbert", "transformer.layer", False, "bert"),
    Family("roberta", "encoder.layer", False, "bert", positions_after_pad=True),
    Family("xlm-roberta", "encoder.layer", False, "bert", positions_after_pad=True),
    Family("electra", "encoder.layer", True, "bert"),
    Family("albert", "encoder.albert_layer_groups", True, "bert", shared_layers=True),
    Family("deberta", "encoder.layer", True, None,
           _NO_FUSION.format(what="DeBERTa's disentangled (relative-position) attention")),
    Family("deberta-v2", "encoder.layer", True, None,
           _NO_FUSION.format(what="DeBERTa-v2/v3's disentangled (relative-position) attention")),
    Family("mpnet", "encoder.layer", False, None,
           _NO_FUSION.format(what="MPNet's attention with relative position bias"), positions_after_pad=True),
    Family("modernbert", "layers", False, None,
           _NO_FUSION.format(what="ModernBERT's rotary, global/local-window attention"),
           per_layer_config=("layer_types",),
           fixed_first_layer="ModernBERT builds layer 0 without an attention pre-norm (the embedding norm serves "
                             "it), so a pruned model whose first layer had one would not reload the same"),
)}

# tried in order for families outside the table
_GENERIC_LAYER_PATHS = ("encoder.layer", "transformer.layer", "layers", "encoder.layers")
_warned: set[str] = set()


def _config(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def family(model_or_config) -> Family:
    """The table row for this model's ``model_type``; a generic row (and one warning) otherwise."""
    model_type = str(getattr(_config(model_or_config), "model_type", "") or "unknown")
    row = FAMILIES.get(model_type)
    if row is not None:
        return row
    if model_type not in _warned:
        _warned.add(model_type)
        log.warning("model type %r is not in bertopt's families table (%s): using generic behaviour "
                    "(token_type_ids if type_vocab_size > 0, ONNX Runtime's BERT fusion tried, encoder layers "
                    "looked up by common names)", model_type, ", ".join(FAMILIES))
    return Family(model_type, None, True, "bert", known=False)


def takes_token_type_ids(model_or_config) -> bool:
    config = _config(model_or_config)
    return family(config).token_type_ids and int(getattr(config, "type_vocab_size", 0) or 0) > 0


def max_positions(model_or_config) -> int:
    """Longest input in tokens: RoBERTa-style models spend pad_token_id + 1 position rows before
    the first token (514 rows = 512 tokens)."""
    config = _config(model_or_config)
    n = int(getattr(config, "max_position_embeddings", 512))
    if family(config).positions_after_pad:
        n -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    return n


def ort_fusion(model_or_config) -> tuple[Optional[str], str]:
    """(optimizer model_type or None, the reason when None)."""
    row = family(model_or_config)
    return row.ort_model_type, row.no_fusion_reason


def _resolve(root, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def encoder_layers(model):
    """The ModuleList of transformer blocks (for ALBERT: its layer groups, each repeated)."""
    base = getattr(model, "base_model", model)
    row = family(model)
    paths = (row.layers,) if row.layers else _GENERIC_LAYER_PATHS
    for path in paths:
        layers = _resolve(base, path)
        if layers is not None and hasattr(layers, "__len__"):
            return layers
    raise ModelError(f"{type(model).__name__}: cannot find the encoder layers of model type {row.name!r} "
                     f"(looked for {', '.join(paths)}); --freeze-layers and pruning need them")


def shares_layers(model_or_config) -> bool:
    return family(model_or_config).shared_layers


def depth(model_or_config) -> int:
    """Blocks run per forward pass (ALBERT: repetitions of its shared layer)."""
    config = _config(model_or_config)
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        n = getattr(config, "n_layers", None)  # DistilBERT
    if not isinstance(n, int):
        raise ModelError(f"model type {family(config).name!r}: the config has no num_hidden_layers")
    return n


def prunable(model_or_config, position: int) -> bool:
    """Whether the block at ``position`` may be removed (ModernBERT keeps its first layer)."""
    return not (position == 0 and family(model_or_config).fixed_first_layer)
