"""Layer pruning: real layer removal, sensitivity, greedy order, distillation and the prune stage."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from bertopt import artifacts, pruning
from bertopt.config import PruneConfig
from bertopt.errors import ConfigError, MissingArtifact
from bertopt.modeling import encoder_layers

from conftest import make_texts


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tiny4(packaged_model_dir):
    """A 4-layer, 32-wide BERT classifier with random weights (eval mode) and its tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(packaged_model_dir)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=128, num_labels=2)
    return BertForSequenceClassification(config).eval(), tok


@pytest.fixture(scope="module")
def loader4(tiny4):
    from bertopt import data

    _, tok = tiny4
    texts, labels = make_texts(48, seed=3)
    ds = data.EncodedDataset(data.tokenize(texts, tok, 32), labels)
    return data.make_loader(ds, 16, shuffle=False, seed=0, pad_id=tok.pad_token_id, with_token_type_ids=True)


def _batch(tok, n=4):
    texts, _ = make_texts(n, seed=5)
    return dict(tok(texts, padding=True, return_tensors="pt"))


def _logits(model, batch):
    import torch

    with torch.inference_mode():
        return model.eval()(**batch).logits


def _layer_numel(model, i):
    return sum(p.numel() for p in encoder_layers(model)[i].parameters())


def prune_cfg(output_dir, data_dir, **overrides):
    kwargs = dict(dataset=data_dir, output_dir=str(output_dir), epochs=1, batch_size=16, max_length=64,
                  lr=3e-3, warmup_ratio=0.0, seed=0, device="cpu", quiet=True, max_train_samples=96,
                  prune_layers=1)
    kwargs.update(overrides)
    return PruneConfig(**kwargs)


@pytest.fixture()
def out_with_baseline(tmp_path, trained_tiny):
    """A private output dir holding a copy of the tiny trained baseline (2 layers)."""
    shutil.copytree(Path(trained_tiny) / "baseline", tmp_path / "baseline")
    return tmp_path


# ----------------------------------------------------------------------------- layer removal
def test_remove_layer_really_removes_weights(tiny4):
    model, _ = tiny4
    before = sum(p.numel() for p in model.parameters())
    one_layer = _layer_numel(model, 1)
    pruned = pruning.remove_layers(model, [1])

    assert len(encoder_layers(pruned)) == 3 and pruned.config.num_hidden_layers == 3
    assert len(encoder_layers(model)) == 4 and model.config.num_hidden_layers == 4  # the source is untouched
    assert sum(p.numel() for p in pruned.parameters()) == before - one_layer
    keys = pruned.state_dict().keys()
    assert not any(".layer.3." in k for k in keys)
    assert {k.split(".layer.")[1].split(".")[0] for k in keys if ".layer." in k} == {"0", "1", "2"}
    # renumbered: new layer 1 is the old layer 2, new layer 2 the old layer 3
    old, new = model.state_dict(), pruned.state_dict()
    for k in [k for k in old if ".layer.3." in k]:
        assert old[k].equal(new[k.replace(".layer.3.", ".layer.2.")])
    assert old["bert.encoder.layer.0.output.dense.weight"].equal(new["bert.encoder.layer.0.output.dense.weight"])
    assert [lay.attention.self.layer_idx for lay in encoder_layers(pruned)] == [0, 1, 2]


def test_removed_layer_equals_skipping_it(tiny4):
    """The pruned model computes exactly what the full model computes with that block bypassed."""
    model, tok = tiny4
    batch = _batch(tok)
    pruned = pruning.remove_layers(model, [2])
    handle = encoder_layers(model)[2].register_forward_hook(
        lambda mod, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True)
    try:
        bypassed = _logits(model, batch)
    finally:
        handle.remove()
    assert _logits(pruned, batch).allclose(bypassed, atol=1e-6)
    assert not _logits(model, batch).allclose(bypassed, atol=1e-6)  # the layer did matter


def test_pruned_model_round_trips_through_from_pretrained(tiny4, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, tok = tiny4
    pruned = pruning.remove_layers(model, [0, 3])
    pruned.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 2
    loaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert len(encoder_layers(loaded)) == 2
    batch = _batch(tok)
    assert _logits(loaded, batch).allclose(_logits(pruned, batch), atol=1e-6)


@pytest.mark.parametrize("kwargs, text", [
    ({"prune_layers": 4}, "would remove all 4 encoder layers"),
    ({"prune_layers": 7}, "would remove all 4 encoder layers"),
    ({"prune_layers": -1}, "--prune-layers must be a positive number"),
    ({"prune_layers": 0}, "--prune-layers must be a positive number"),
    ({"target_layers": 0}, "--target-layers must be at least 1"),
    ({"target_layers": 4}, "nothing to prune"),
    ({"target_layers": 2, "prune_layers": 2}, "exactly one of"),
    ({}, "exactly one of"),
])
def test_layers_to_remove_rejects_impossible_requests(kwargs, text):
    with pytest.raises(ConfigError, match=text):
        pruning.layers_to_remove(4, **kwargs)


def test_layers_to_remove_counts():
    assert pruning.layers_to_remove(6, target_layers=4) == 2
    assert pruning.layers_to_remove(6, prune_layers=5) == 5


def test_remove_layers_rejects_all_or_out_of_range(tiny4):
    model, _ = tiny4
    with pytest.raises(ConfigError, match="cannot remove all 4"):
        pruning.remove_layers(model, [0, 1, 2, 3])
    with pytest.raises(ConfigError, match="out of range"):
        pruning.remove_layers(model, [4])


def test_prune_config_validation_names_flags():
    with pytest.raises(ConfigError) as exc:
        PruneConfig(prune_layers=-2, method="magic", distill_alpha=2.0)
    msg = str(exc.value)
    assert "--prune-layers must be a positive integer" in msg
    assert "--method must be one of removal, gradient" in msg
    assert "--distill-alpha" in msg
    with pytest.raises(ConfigError, match="--prune-layers K .* or --target-layers N"):
        PruneConfig()
    assert PruneConfig(target_layers=4, sensitivity_samples="all").sensitivity_samples is None


# ----------------------------------------------------------------------------- sensitivity
def test_removal_sensitivity_scores_every_layer(tiny4, loader4):
    from bertopt.training import evaluate, resolve_device

    model, _ = tiny4
    device = resolve_device("cpu")
    scores = pruning.removal_sensitivity(model, loader4, device)
    assert scores.method == "removal" and scores.metric == "accuracy_drop"
    assert len(scores.scores) == len(scores.details) == 4
    base = evaluate(model, loader4, device)["accuracy"]
    assert scores.base["accuracy"] == base
    for i, (s, d) in enumerate(zip(scores.scores, scores.details)):
        without = evaluate(pruning.remove_layers(model, [i]), loader4, device)
        assert d["accuracy"] == without["accuracy"]
        assert s == pytest.approx(base - without["accuracy"])
        assert math.isfinite(d["loss_increase"])


def test_gradient_sensitivity_scores_every_layer_and_cleans_up(tiny4, loader4):
    from bertopt.training import resolve_device

    model, _ = tiny4
    scores = pruning.gradient_sensitivity(model, loader4, resolve_device("cpu"))
    assert scores.method == "gradient" and len(scores.scores) == 4
    assert all(math.isfinite(s) and s >= 0 for s in scores.scores)
    assert any(s > 0 for s in scores.scores)
    assert all(math.isfinite(d["estimated_loss_increase"]) for d in scores.details)
    assert not any(layer._forward_hooks for layer in encoder_layers(model))  # hooks removed
    assert all(p.grad is None for p in model.parameters())
    again = pruning.gradient_sensitivity(model, loader4, resolve_device("cpu"))
    assert again.scores == scores.scores  # deterministic (eval mode, no dropout)


def test_gradient_sensitivity_approximates_small_removal_effect(tiny4, loader4):
    """First-order check: scaling a layer's residual contribution by (1 - eps) changes the loss by
    about eps x the signed estimate (the estimate is the linearisation at eps = 1)."""
    import torch

    from bertopt.training import evaluate, resolve_device

    model, _ = tiny4
    device = resolve_device("cpu")
    scores = pruning.gradient_sensitivity(model, loader4, device)
    layer = encoder_layers(model)[1]
    eps = 1e-3

    def shrink(mod, args, kwargs, out):
        h_in = args[0] if args else kwargs["hidden_states"]
        return out - eps * (out - h_in)

    base = evaluate(model, loader4, device)["loss"]
    handle = layer.register_forward_hook(shrink, with_kwargs=True)
    try:
        nudged = evaluate(model, loader4, device)["loss"]
    finally:
        handle.remove()
    estimate = scores.details[1]["estimated_loss_increase"]
    assert (nudged - base) / eps == pytest.approx(estimate, rel=0.05, abs=1e-4)
    assert torch.is_grad_enabled()


# ----------------------------------------------------------------------------- greedy order
def test_greedy_maps_positions_back_to_original_layers(tiny4):
    """A scorer keyed on the layers' identity: the greedy loop re-scores the shrunken model each step
    and reports original indices."""
    model, _ = tiny4
    model = pruning.remove_layers(model, [])  # a copy we can tag
    for i, layer in enumerate(encoder_layers(model)):
        layer._orig = i
    importance = {0: 0.9, 1: 0.2, 2: 0.5, 3: 0.1}
    seen = []

    def scorer(m):
        ids = [layer._orig for layer in encoder_layers(m)]
        seen.append(ids)
        # once layer 3 is gone, layer 0 becomes the least important (importance changes with neighbours)
        table = {**importance, **({0: 0.05} if 3 not in ids else {})}
        return pruning.LayerScores("test", "score", [table[i] for i in ids])

    result = pruning.greedy_prune(model, 3, scorer)
    assert seen == [[0, 1, 2, 3], [0, 1, 2], [1, 2]]
    assert result.removed == [3, 0, 1] and result.kept == [2]
    assert [s["layers_before"] for s in result.steps] == [4, 3, 2]
    assert len(encoder_layers(result.model)) == 1 and encoder_layers(result.model)[0]._orig == 2
    assert len(encoder_layers(model)) == 4


def test_greedy_order_is_reproducible_with_a_fixed_seed(tiny4, loader4):
    from bertopt.training import resolve_device, seed_everything

    model, _ = tiny4
    device = resolve_device("cpu")
    runs = []
    for _ in range(2):
        seed_everything(7)
        r = pruning.greedy_prune(model, 2, lambda m: pruning.removal_sensitivity(m, loader4, device))
        runs.append((r.removed, [s["scores"] for s in r.steps]))
    assert runs[0] == runs[1]
    assert len(runs[0][0]) == 2 and len(set(runs[0][0])) == 2


def test_greedy_rejects_pruning_everything(tiny4):
    model, _ = tiny4
    with pytest.raises(ConfigError, match="all 4 encoder layers"):
        pruning.greedy_prune(model, 4, lambda m: None)


def test_least_important_breaks_ties_by_loss_then_index():
    s = pruning.LayerScores("removal", "accuracy_drop", [0.0, 0.0, 0.1],
                            [{"loss_increase": 0.3}, {"loss_increase": 0.1}, {"loss_increase": 0.0}])
    assert s.least_important() == 1
    assert pruning.LayerScores("gradient", "x", [0.2, 0.2]).least_important() == 0


# ----------------------------------------------------------------------------- distillation
def test_distillation_loss_terms():
    import torch

    torch.manual_seed(0)
    student, teacher = torch.randn(8, 2), torch.randn(8, 2)
    labels = torch.randint(0, 2, (8,))
    ce = torch.nn.functional.cross_entropy(student, labels)
    assert pruning.distillation_loss(student, teacher, labels, 2.0, 0.0).item() == pytest.approx(ce.item())
    assert pruning.distillation_loss(student, student, labels, 2.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    kd = pruning.distillation_loss(student, teacher, labels, 3.0, 1.0)
    p_t = torch.softmax(teacher / 3, -1)
    manual = 9 * (p_t * (p_t.log() - torch.log_softmax(student / 3, -1))).sum(-1).mean()
    assert kd.item() == pytest.approx(manual.item(), rel=1e-5)


def test_train_uses_the_loss_fn_hook(tiny4, loader4, tiny_model_dir, tiny_data_dir, tmp_path):
    """training.train calls a given loss_fn with (logits, labels, inputs) instead of plain CE."""
    from conftest import tiny_train_config

    from bertopt import training

    model, _ = tiny4
    student = pruning.remove_layers(model, [0, 1])
    calls = []
    distill = pruning.DistillLoss(pruning.remove_layers(model, []), temperature=2.0, alpha=0.5)

    def spy(logits, labels, inputs):
        calls.append((tuple(logits.shape), tuple(labels.shape), sorted(inputs)))
        return distill(logits, labels, inputs)

    cfg = tiny_train_config(tiny_model_dir, tiny_data_dir, tmp_path, epochs=1)
    device = training.resolve_device("cpu")
    training.train(student, loader4, loader4, cfg, device, training.resolve_precision("fp32", device), loss_fn=spy)
    assert len(calls) == len(loader4)
    assert calls[0][0][1] == 2 and "input_ids" in calls[0][2] and "labels" not in calls[0][2]
    assert not any(p.requires_grad for p in distill.teacher.parameters())


# ----------------------------------------------------------------------------- the stage
EXPECTED_FILES = {"config.json", "labels.json", "manifest.json", "model.safetensors", "sensitivity.json",
                  "sensitivity.png", "stage.log", "tokenizer.json", "tokenizer_config.json"}


def test_prune_stage_writes_a_plain_smaller_model(out_with_baseline, tiny_data_dir):
    from transformers import AutoModelForSequenceClassification

    from bertopt.prune_stage import run_prune

    cfg = prune_cfg(out_with_baseline, tiny_data_dir, distill=True)
    result = run_prune(cfg)
    assert result.status == "ok" and "2->1 layers" in result.key_metric
    d = out_with_baseline / "pruned"
    assert {p.name for p in d.iterdir()} == EXPECTED_FILES
    manifest = artifacts.require_manifest(d, "pruned")
    assert manifest["stage"] == "pruned"
    m = manifest["metrics"]
    for key in ("removed_layers", "kept_layers", "parameters_before", "parameters_after", "source_eval_accuracy",
                "accuracy_before_finetune", "accuracy_after_finetune", "best_eval_accuracy", "train_time_s",
                "sensitivity_method", "distill"):
        assert key in m, key
    assert m["layers_before"] == 2 and m["layers_after"] == 1 and m["distill"] is True
    assert sorted(m["removed_layers"] + m["kept_layers"]) == [0, 1]
    assert m["parameters_after"] < m["parameters_before"]
    assert 0.0 <= m["accuracy_before_finetune"] <= 1.0 and 0.0 <= m["accuracy_after_finetune"] <= 1.0
    assert m["train_time_s"] > 0 and m["train_samples"] == 96
    assert manifest["inputs"]["source"].endswith("baseline")

    sens = json.loads((d / "sensitivity.json").read_text())
    assert sens["method"] == "removal" and [row["layer"] for row in sens["layers"]] == [0, 1]
    assert all(math.isfinite(row["score"]) for row in sens["layers"])
    assert sens["removed_layers"] == m["removed_layers"] and len(sens["greedy_steps"]) == 1
    assert (d / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"

    model = AutoModelForSequenceClassification.from_pretrained(d)
    assert model.config.num_hidden_layers == 1 and len(encoder_layers(model)) == 1
    assert sum(p.numel() for p in model.parameters()) == m["parameters_after"]

    again = run_prune(cfg)
    assert again.status == "up-to-date"


def test_prune_stage_gradient_method_from_a_plain_source_dir(out_with_baseline, tiny_data_dir, tmp_path):
    from bertopt.prune_stage import run_prune

    src = tmp_path / "plain_model"
    shutil.copytree(out_with_baseline / "baseline", src, ignore=shutil.ignore_patterns("manifest.json", "*.log"))
    out = tmp_path / "elsewhere"
    result = run_prune(prune_cfg(out, tiny_data_dir, prune_source=str(src), target_layers=1, prune_layers=None,
                                 method="gradient", sensitivity_samples=40))
    assert result.status == "ok"
    m = artifacts.require_manifest(out / "pruned", "pruned")["metrics"]
    assert m["sensitivity_method"] == "gradient" and m["sensitivity_rows"] == 40 and m["layers_after"] == 1
    sens = json.loads((out / "pruned" / "sensitivity.json").read_text())
    assert sens["metric"] == "taylor_importance" and len(sens["layers"]) == 2


def test_prune_stage_without_baseline_names_the_command(tmp_path, tiny_data_dir):
    from bertopt.prune_stage import run_prune

    with pytest.raises(MissingArtifact, match=r"baseline.*python benchmark\.py"):
        run_prune(prune_cfg(tmp_path, tiny_data_dir))


def test_prune_script_rejects_pruning_all_layers_without_touching_output(out_with_baseline, tiny_data_dir,
                                                                         capsys):
    import prune

    marker = out_with_baseline / "pruned" / "keep.txt"
    marker.parent.mkdir()
    marker.write_text("previous output")
    code = prune.main(["--output-dir", str(out_with_baseline), "--dataset", tiny_data_dir,
                       "--prune-layers", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: --prune-layers 2 would remove all 2 encoder layers" in err and "Traceback" not in err
    assert marker.read_text() == "previous output"
    assert prune.main(["--output-dir", str(out_with_baseline), "--prune-layers", "-3"]) == 1
    assert "--prune-layers must be a positive integer" in capsys.readouterr().err


def test_prune_is_an_optional_stage_after_mixed_precision():
    import main
    from bertopt.stages import STAGES

    names = [s.name for s in STAGES]
    assert names.index("prune") == names.index("mixed_precision") + 1
    parser = main.build_parser()
    assert "prune" not in [s.name for s in main.select(parser.parse_args([]))]
    assert "prune" in [s.name for s in main.select(parser.parse_args(["--target-layers", "4"]))]
    stage = {s.name: s for s in STAGES}["prune"]
    cfg = stage.build_config(parser.parse_args(["--prune-layers", "2", "--precision", "bf16", "--distill"]))
    assert cfg.prune_layers == 2 and cfg.precision == "fp32" and cfg.distill is True
    # in main.py --source is onnx_tensorrt's (stage names); the prune stage takes --prune-source there
    ns = parser.parse_args(["--prune-layers", "1", "--source", "baseline", "--prune-source", "/m"])
    assert ns.source == "baseline" and stage.build_config(ns).prune_source == "/m"


def test_prune_script_accepts_source_alias():
    import argparse

    from bertopt.stages import add_prune_args

    parser = argparse.ArgumentParser()
    add_prune_args(parser, standalone=True)
    assert parser.parse_args(["--source", "/some/model"]).prune_source == "/some/model"
