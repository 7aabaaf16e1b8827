"""Structured layer pruning: physical layer removal, per-layer sensitivity, greedy iterative
pruning order and the distillation loss used when re-fine-tuning a pruned model.

Layer removal is real: :func:`remove_layers` returns a deep copy whose encoder ``ModuleList``
no longer holds the removed blocks and whose ``config.num_hidden_layers`` matches, so
``save_pretrained`` writes a plain, smaller model that ``from_pretrained`` loads without any
pruning code (state-dict keys are renumbered ``layer.0 .. layer.N-1``). Where the layers are and
what else shrinks with them (per-layer config lists such as ModernBERT's global/local
``layer_types``) comes from :mod:`bertopt.families`. Shared-weight families (ALBERT: one layer
run ``num_hidden_layers`` times) are pruned by running the shared layer fewer times: a real depth
reduction (fewer FLOPs per token) that removes no parameters.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from . import families
from .errors import ConfigError
from .modeling import encoder_layers

log = logging.getLogger("bertopt.pruning")

METHODS = ("removal", "gradient")


# ----------------------------------------------------------------------------- layer removal
def num_layers(model) -> int:
    """Blocks run per forward pass (ALBERT: repetitions of the shared layer)."""
    if families.shares_layers(model):
        return families.depth(model)
    return len(encoder_layers(model))


def layers_to_remove(n_layers: int, prune_layers: Optional[int] = None, target_layers: Optional[int] = None) -> int:
    """How many layers to remove from an ``n_layers`` model; ConfigError when impossible."""
    if (prune_layers is None) == (target_layers is None):
        raise ConfigError("give exactly one of --prune-layers K or --target-layers N")
    if prune_layers is not None:
        if prune_layers < 1:
            raise ConfigError(f"--prune-layers must be a positive number of layers to remove (got {prune_layers})")
        if prune_layers >= n_layers:
            raise ConfigError(f"--prune-layers {prune_layers} would remove all {n_layers} encoder layers of the "
                              f"model; at most {n_layers - 1} can be removed")
        return prune_layers
    if target_layers < 1:
        raise ConfigError(f"--target-layers must be at least 1 (got {target_layers}); a model needs an encoder layer")
    if target_layers >= n_layers:
        raise ConfigError(f"--target-layers {target_layers} is not fewer than the model's {n_layers} encoder "
                          f"layers: nothing to prune (use at most {n_layers - 1})")
    return n_layers - target_layers


def remove_layers(model, indices: Sequence[int]):
    """A deep copy of ``model`` without the encoder layers at ``indices`` (current positions)."""
    n = num_layers(model)
    drop = sorted(set(int(i) for i in indices))
    bad = [i for i in drop if not 0 <= i < n]
    if bad:
        raise ConfigError(f"layer index {bad[0]} out of range: the model has {n} encoder layers (0..{n - 1})")
    if len(drop) >= n:
        raise ConfigError(f"cannot remove all {n} encoder layers of the model")
    pruned = copy.deepcopy(model)
    if families.shares_layers(pruned):
        _fewer_repetitions(pruned, n - len(drop))
        return pruned
    layers = encoder_layers(pruned)
    for i in reversed(drop):
        del layers[i]  # ModuleList.__delitem__ renumbers the remaining keys 0..N-1
    for new_idx, layer in enumerate(layers):
        for module in layer.modules():  # attention modules index KV caches by their layer number
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    pruned.config.num_hidden_layers = len(layers)
    per_layer = dict.fromkeys(families.family(pruned).per_layer_config + ("layer_types",))  # generic: layer_types
    for name in per_layer:  # per-layer config lists shrink with the model
        values = getattr(pruned.config, name, None)
        if isinstance(values, list) and len(values) == n:
            setattr(pruned.config, name, [v for i, v in enumerate(values) if i not in drop])
    return pruned


def _fewer_repetitions(model, keep: int) -> None:
    """ALBERT-style shared layers: run the shared layer group ``keep`` times instead of N."""
    groups = int(getattr(model.config, "num_hidden_groups", 1) or 1)
    if groups != 1:
        raise ConfigError(f"pruning {families.family(model).name} with {groups} layer groups is not supported "
                          "(only one shared group, as in every released ALBERT)")
    model.config.num_hidden_layers = keep


# ----------------------------------------------------------------------------- sensitivity
@dataclass
class LayerScores:
    """Importance of each current layer of a model (higher = more important)."""

    method: str
    metric: str  # what ``scores`` holds
    scores: list[float]
    details: list[dict] = field(default_factory=list)
    base: dict = field(default_factory=dict)
    prefer_last: bool = False  # equal scores: remove the highest index (shared-layer repetitions)

    def least_important(self, allowed: Optional[Sequence[int]] = None) -> int:
        """Current index of the layer to remove next (among ``allowed``); ties broken by the detail
        tie-break, then index."""
        def key(i):
            tie = self.details[i].get("loss_increase", 0.0) if self.details else 0.0
            return (round(self.scores[i], 12), round(tie, 12), -i if self.prefer_last else i)

        return min(range(len(self.scores)) if allowed is None else allowed, key=key)


def removal_sensitivity(model, loader, device, evaluate: Callable | None = None) -> LayerScores:
    """Remove each layer in turn (a real copy without it) and measure eval accuracy/loss."""
    if evaluate is None:
        from .training import evaluate
    base = evaluate(model, loader, device, desc="eval (all layers)")
    details, scores = [], []
    for i in range(num_layers(model)):
        ev = evaluate(remove_layers(model, [i]), loader, device, desc=f"eval without layer {i}")
        drop = base["accuracy"] - ev["accuracy"]
        details.append({"accuracy": ev["accuracy"], "loss": ev["loss"], "accuracy_drop": drop,
                        "loss_increase": ev["loss"] - base["loss"]})
        scores.append(drop)
        log.info("without layer %d: accuracy %.4f (drop %+.4f), loss %.4f", i, ev["accuracy"], drop, ev["loss"])
    return LayerScores("removal", "accuracy_drop", scores, details,
                       {"accuracy": base["accuracy"], "loss": base["loss"], "n": base["n"]})


def gradient_sensitivity(model, loader, device) -> LayerScores:
    """First-order (gradient x activation) estimate of the loss change from removing each layer.

    Removing block i replaces its output h_out by its input h_in, so per example
    dL ~= <grad_{h_out} L, h_in - h_out> (summed over tokens and features). The score is the mean
    absolute estimate over the evaluation examples: one forward + backward pass per batch instead
    of one evaluation per layer."""
    import torch

    from .logs import progress
    from .training import _to_device

    layers = list(encoder_layers(model))
    n = len(layers)
    captured: dict[int, dict] = {}

    def make_hook(i):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            h_out.retain_grad()
            captured[i] = {"in": h_in.detach(), "out": h_out}

        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()  # no dropout: deterministic scores
    abs_sum = [0.0] * n
    signed_sum = [0.0] * n
    correct, total, loss_sum = 0, 0, 0.0
    try:
        for batch in progress(loader, desc="gradient sensitivity", unit="batch"):
            inputs = _to_device(batch, device, non_blocking=False)
            y = batch["labels"].to(device)
            captured.clear()
            model.zero_grad(set_to_none=True)
            logits = model(**inputs).logits.float()
            loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            loss.backward()
            with torch.no_grad():
                for i in range(n):
                    c = captured[i]
                    delta = c["in"] - c["out"].detach()
                    per_example = (delta * c["out"].grad).flatten(1).sum(1)
                    abs_sum[i] += per_example.abs().sum().item()
                    signed_sum[i] += per_example.sum().item()
                correct += int((logits.argmax(-1) == y).sum())
                total += len(y)
                loss_sum += loss.item()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    total_n = max(total, 1)
    scores = [s / total_n for s in abs_sum]
    details = [{"taylor_importance": scores[i], "estimated_loss_increase": signed_sum[i] / total_n}
               for i in range(n)]
    for i in range(n):
        log.info("layer %d: gradient x activation importance %.5f (estimated loss change %+.5f)", i, scores[i],
                 details[i]["estimated_loss_increase"])
    return LayerScores("gradient", "taylor_importance", scores, details,
                       {"accuracy": correct / total_n if total else float("nan"), "loss": loss_sum / total_n,
                        "n": total})


def shared_layer_sensitivity(model, loader, device, method: str) -> LayerScores:
    """Shared-weight layers (ALBERT): every repetition is the same weights, so removing any one
    gives the same model; one evaluation scores them all (the last repetition is then removed)."""
    from .training import evaluate

    n = num_layers(model)
    base = evaluate(model, loader, device, desc="eval (all repetitions)")
    ev = evaluate(remove_layers(model, [n - 1]), loader, device, desc="eval with one repetition fewer")
    drop = base["accuracy"] - ev["accuracy"]
    log.info("%s shares one layer across %d repetitions (--method %s not needed): one repetition fewer "
             "changes accuracy by %+.4f", families.family(model).name, n, method, -drop)
    detail = {"accuracy": ev["accuracy"], "loss": ev["loss"], "accuracy_drop": drop,
              "loss_increase": ev["loss"] - base["loss"]}
    # equal scores; the tie-break below picks the last repetition
    return LayerScores("removal", "accuracy_drop", [drop] * n, [dict(detail) for _ in range(n)],
                       {"accuracy": base["accuracy"], "loss": base["loss"], "n": base["n"]}, prefer_last=True)


def layer_sensitivity(model, loader, device, method: str = "removal") -> LayerScores:
    if method in METHODS and families.shares_layers(model):
        return shared_layer_sensitivity(model, loader, device, method)
    if method == "removal":
        return removal_sensitivity(model, loader, device)
    if method == "gradient":
        return gradient_sensitivity(model, loader, device)
    raise ConfigError(f"--method must be one of {', '.join(METHODS)} (got {method!r})")


# ----------------------------------------------------------------------------- greedy pruning
@dataclass
class PruneResult:
    model: object
    removed: list[int]  # original layer indices, in removal order
    kept: list[int]  # original layer indices, in model order
    steps: list[dict]
    initial: LayerScores


def greedy_prune(model, k: int, scorer: Callable[[object], LayerScores]) -> PruneResult:
    """Remove ``k`` layers one at a time, re-scoring the remaining layers after every removal
    (a layer's importance changes once its neighbours are gone). ``scorer(model)`` returns the
    LayerScores of the current model; the result maps everything back to original indices."""
    n = num_layers(model)
    layers_to_remove(n, prune_layers=k)
    original = list(range(n))
    current = model
    steps, removed, initial = [], [], None
    for step in range(k):
        scores = scorer(current)
        if initial is None:
            initial = scores
        allowed = [i for i in range(len(scores.scores)) if families.prunable(current, i)]
        if len(allowed) < len(scores.scores) and step == 0:
            log.info("layer 0 is kept: %s", families.family(current).fixed_first_layer)
        pick = scores.least_important(allowed)
        orig = original[pick]
        steps.append({"step": step + 1, "layers_before": len(original), "layer_indices": list(original),
                      "scores": scores.scores, "details": scores.details, "base": scores.base,
                      "removed_position": pick, "removed_layer": orig})
        log.info("step %d/%d: removing original layer %d (score %.5f among %s)", step + 1, k, orig,
                 scores.scores[pick], [round(s, 5) for s in scores.scores])
        current = remove_layers(current, [pick])
        removed.append(orig)
        del original[pick]
    return PruneResult(current, removed, original, steps, initial)


# ----------------------------------------------------------------------------- distillation
def distillation_loss(student_logits, teacher_logits, labels, temperature: float = 2.0, alpha: float = 0.5):
    """``alpha`` * T^2 * KL(teacher_T || student_T) + (1 - ``alpha``) * CE(student, labels)
    (Hinton et al.: the T^2 factor keeps the soft-target gradients on the CE scale); one output
    (regression): ``alpha`` * MSE(student, teacher) + (1 - ``alpha``) * MSE(student, labels)."""
    import torch.nn.functional as F

    if student_logits.shape[-1] == 1:  # regression: match the teacher's score (MSE) instead of a softmax
        s = student_logits.float().view(-1)
        return alpha * F.mse_loss(s, teacher_logits.float().view(-1)) + (1.0 - alpha) * F.mse_loss(s, labels.float())
    t = float(temperature)
    kd = F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1),
                  F.log_softmax(teacher_logits.float() / t, dim=-1), reduction="batchmean", log_target=True)
    ce = F.cross_entropy(student_logits.float(), labels)
    return alpha * (t * t) * kd + (1.0 - alpha) * ce


class DistillLoss:
    """A ``loss_fn`` for :func:`bertopt.training.train`: runs the frozen teacher on the same batch."""

    def __init__(self, teacher, temperature: float = 2.0, alpha: float = 0.5):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature = temperature
        self.alpha = alpha

    def __call__(self, logits, labels, inputs):
        import torch

        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits.float()
        return distillation_loss(logits, teacher_logits, labels, self.temperature, self.alpha)


# ----------------------------------------------------------------------------- plot
def plot_sensitivity(scores: LayerScores, path, removed: Sequence[int] = (), title: str = "") -> None:
    """Bar chart of per-layer importance (accuracy drop or gradient importance); removed layers
    are drawn in a different colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(scores.scores)
    values = [100.0 * s for s in scores.scores] if scores.metric == "accuracy_drop" else list(scores.scores)
    ylabel = ("accuracy drop when removed (points)" if scores.metric == "accuracy_drop"
              else "gradient x activation importance")
    colors = ["#d62728" if i in set(removed) else "#1f77b4" for i in range(n)]
    fig, ax = plt.subplots(figsize=(max(5.5, 0.45 * n + 2.5), 3.6))
    ax.bar(range(n), values, color=colors)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(n))
    ax.set_xlabel("encoder layer")
    ax.set_ylabel(ylabel)
    ax.set_title((title or f"layer sensitivity ({scores.method}); red = pruned").replace("; ", "\n"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
