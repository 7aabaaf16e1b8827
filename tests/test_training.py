"""The training loop, freezing, precision resolution and the two training stages."""
import json
from pathlib import Path

import pytest

from bertopt import artifacts, modeling, precision, training
from bertopt.errors import ConfigError, MissingArtifact
from bertopt.train_stage import run_baseline, run_mixed_precision
from conftest import tiny_train_config

MANIFEST_KEYS = {"schema_version", "stage", "status", "reason", "created", "git_revision", "fingerprint",
                 "config", "environment", "inputs", "outputs", "metrics"}


def test_baseline_stage_outputs_and_learning(trained_tiny):
    directory = trained_tiny / "baseline"
    files = {p.name for p in directory.iterdir()}
    assert files == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "labels.json", "manifest.json", "stage.log"}
    manifest = json.loads((directory / "manifest.json").read_text())
    assert MANIFEST_KEYS <= set(manifest)
    assert manifest["status"] == "ok" and manifest["stage"] == "baseline"
    assert set(manifest["outputs"]) == files - {"manifest.json", "stage.log"}
    for key in ("torch", "transformers", "python", "cpu"):
        assert manifest["environment"][key]
    m = manifest["metrics"]
    for key in ("train_time_s", "samples_per_s", "peak_memory_mb", "final_eval_accuracy",
                "best_eval_accuracy", "loss_curve", "epochs"):
        assert m[key] is not None, key
    assert m["train_samples"] == 1200 and m["samples_per_s"] > 0 and m["peak_memory_mb"] > 50
    # the separable task is learned: the loss goes down and the accuracy is far above chance
    curve = [p["loss"] for p in m["loss_curve"]]
    assert curve[-1] < 0.5 * curve[0]
    assert m["best_eval_accuracy"] >= 0.9
    # a plain save_pretrained directory
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(directory)
    assert model.config.id2label == {0: "negative", 1: "positive"}


def test_rerun_is_noop_and_force_reruns(trained_tiny, tiny_model_dir, tiny_data_dir):
    cfg = tiny_train_config(tiny_model_dir, tiny_data_dir, trained_tiny)
    before = (trained_tiny / "baseline" / "manifest.json").read_text()
    assert run_baseline(cfg).status == "up-to-date"
    assert (trained_tiny / "baseline" / "manifest.json").read_text() == before
    forced = run_baseline(tiny_train_config(tiny_model_dir, tiny_data_dir, trained_tiny, force=True))
    assert forced.status == "ok"
    after = json.loads((trained_tiny / "baseline" / "manifest.json").read_text())
    # seeded and reproducible: the same loss curve again
    assert after["metrics"]["loss_curve"] == json.loads(before)["metrics"]["loss_curve"]
    assert after["created"] >= json.loads(before)["created"]


def test_changed_config_reruns(tmp_path, tiny_model_dir, tiny_data_dir):
    assert run_baseline(tiny_train_config(tiny_model_dir, tiny_data_dir, tmp_path, epochs=1)).status == "ok"
    assert run_baseline(tiny_train_config(tiny_model_dir, tiny_data_dir, tmp_path, epochs=1)).status == "up-to-date"
    assert run_baseline(tiny_train_config(tiny_model_dir, tiny_data_dir, tmp_path, epochs=1, lr=1e-3)).status == "ok"


def test_killed_stage_leaves_nothing_downstream_accepts(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    cfg = tiny_train_config(tiny_model_dir, tiny_data_dir, tmp_path, epochs=1)
    assert run_baseline(cfg).status == "ok"
    previous = artifacts.read_manifest(tmp_path / "baseline")
    weights = (tmp_path / "baseline" / "model.safetensors").read_bytes()

    def killed(*a, **k):
        raise KeyboardInterrupt  # the process dies right before its manifest

    monkeypatch.setattr(artifacts, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        run_baseline(tiny_train_config(tiny_model_dir, tiny_data_dir, tmp_path, epochs=1, force=True))
    directory = tmp_path / "baseline"
    work = tmp_path / ".baseline.work"  # the run built beside the stage dir (bertopt.staging) ...
    assert (work / "model.safetensors").exists() and not (work / "manifest.json").exists()
    assert artifacts.require_manifest(directory, "baseline") == previous  # ... the previous output stays valid
    assert (directory / "model.safetensors").read_bytes() == weights
    with pytest.raises(MissingArtifact, match="python benchmark.py"):  # a dir without a manifest is never used
        artifacts.require_manifest(work, "baseline")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    artifacts.atomic_write_json(target, {"v": 1})
    import os

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        artifacts.atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left behind


def test_freeze_layers(tiny_model_dir):
    model = modeling.load_model(tiny_model_dir)
    counts = modeling.freeze_layers(model, 1)
    layers = modeling.encoder_layers(model)
    assert all(not p.requires_grad for p in modeling.embeddings(model).parameters())
    assert all(not p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    frozen = sum(p.numel() for p in modeling.embeddings(model).parameters()) + sum(
        p.numel() for p in layers[0].parameters())
    assert counts["parameters"] - counts["trainable_parameters"] == frozen
    with pytest.raises(ConfigError, match="exceeds the model's 2 encoder layers"):
        modeling.freeze_layers(modeling.load_model(tiny_model_dir), 3)


def test_frozen_weights_do_not_change_in_training(tmp_path, tiny_model_dir, tiny_data_dir):
    import torch
    from transformers import AutoModelForSequenceClassification

    run_baseline(tiny_train_config(tiny_model_dir, tiny_data_dir, tmp_path, epochs=1, freeze_layers=1))
    before = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForSequenceClassification.from_pretrained(tmp_path / "baseline").state_dict()
    assert torch.equal(before["bert.encoder.layer.0.output.dense.weight"], after["bert.encoder.layer.0.output.dense.weight"])
    assert torch.equal(before["bert.embeddings.word_embeddings.weight"], after["bert.embeddings.word_embeddings.weight"])
    assert not torch.equal(before["bert.encoder.layer.1.output.dense.weight"], after["bert.encoder.layer.1.output.dense.weight"])


def test_precision_resolution_on_cpu(monkeypatch):
    import torch

    cpu = torch.device("cpu")
    assert training.resolve_precision("fp32", cpu).autocast_dtype is None
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    plan = training.resolve_precision("amp", cpu)
    assert not plan.available and "no native bf16" in plan.reason and "--force" in plan.reason
    # native bf16 flags: amp (the default) runs bf16 only where the probe measures it faster than fp32
    # (AVX512-BF16 without AMX measured slower on one Xeon, 2x faster on an AMD EPYC)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512_bf16", "amx_bf16"})
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: (0.030, 0.012))
    plan = training.resolve_precision("amp", cpu)
    assert plan.available and plan.autocast_dtype == torch.bfloat16 and not plan.grad_scaler
    assert "measured 2.50x fp32" in plan.reason
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: (0.030, 0.039))
    plan = training.resolve_precision("amp", cpu)
    assert not plan.available and "measured 0.77x fp32" in plan.reason and "--precision bf16" in plan.reason
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: (0.030, 0.028))  # 1.07x: below the bar
    assert not training.resolve_precision("amp", cpu).available
    assert training.resolve_precision("bf16", cpu).available
    assert not training.resolve_precision("fp16", cpu).available


def test_cpu_bf16_probe_times_a_real_layer_in_both_precisions():
    precision.cpu_bf16_speedup.cache_clear()
    fp32_s, bf16_s = precision.cpu_bf16_speedup()
    assert 0 < fp32_s < 5 and 0 < bf16_s < 60 and fp32_s != bf16_s
    assert precision.cpu_bf16_speedup() == (fp32_s, bf16_s)  # measured once per process


def test_mixed_precision_skipped_without_native_bf16(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    result = run_mixed_precision(tiny_train_config(tiny_model_dir, tiny_data_dir, tmp_path))
    assert result.status == "skipped"
    manifest = json.loads((tmp_path / "mixed_precision" / "manifest.json").read_text())
    assert manifest["status"] == "skipped" and "bf16" in manifest["reason"]
    assert not (tmp_path / "mixed_precision" / "model.safetensors").exists()


def test_mixed_precision_runs_bf16_when_supported_or_forced(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    result = run_mixed_precision(tiny_train_config(tiny_model_dir, tiny_data_dir, tmp_path, force=True))
    assert result.status == "ok"
    m = json.loads((tmp_path / "mixed_precision" / "manifest.json").read_text())["metrics"]
    assert m["precision"] == "bf16" and m["best_eval_accuracy"] > 0.5


def test_baseline_refuses_reduced_precision(tmp_path, tiny_model_dir, tiny_data_dir):
    with pytest.raises(ConfigError, match="FP32 by definition"):
        run_baseline(tiny_train_config(tiny_model_dir, tiny_data_dir, tmp_path, precision="bf16"))


def test_config_collects_every_problem():
    from bertopt.config import TrainConfig

    with pytest.raises(ConfigError) as err:
        TrainConfig(batch_size=0, max_length=0, lr=-1, device="tpu")
    text = str(err.value)
    for flag in ("--batch-size", "--max-length", "--lr", "--device"):
        assert flag in text


def test_the_loop_reads_the_loss_only_at_log_steps_with_the_same_numbers(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                         monkeypatch):
    """No ``loss.item()`` host sync per step: the losses stay on the device and are read at the
    log steps; the logged means equal the per-step losses' means exactly (grad-accum included)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from bertopt import data

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [f"{'good fine' if i % 2 else 'bad awful'} movie number {i}" for i in range(96)]
    ds = data.EncodedDataset(data.tokenize(texts, tok, 32), [i % 2 for i in range(96)])
    loader = data.make_loader(ds, 8, shuffle=True, seed=0, pad_id=tok.pad_token_id, with_token_type_ids=True)
    cfg = tiny_train_config(tiny_model_dir, tiny_data_dir, tmp_path, epochs=1, log_every=4, grad_accum_steps=2)
    device = training.resolve_device("cpu")
    training.seed_everything(0)
    model = modeling.load_model(tiny_model_dir, 2, ["negative", "positive"])
    seen, reads = [], []

    def loss_fn(logits, labels, inputs):
        loss = torch.nn.functional.cross_entropy(logits, labels)
        seen.append(loss.detach().clone())
        return loss

    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or real_item(t))
    monkeypatch.setattr(training, "evaluate", lambda *a, **k: {"accuracy": 0.5, "loss": 0.7})
    m = training.train(model, loader, loader, cfg, device, training.resolve_precision("fp32", device),
                       loss_fn=loss_fn).metrics
    monkeypatch.undo()
    assert len(seen) == 12 and m["optimizer_steps"] == 6
    assert len(reads) < len(seen) // 2  # the old loop read every micro-batch's loss
    per_step = [real_item(v / 2) * 2 for v in seen]  # what the loop logs: (loss / accum) * accum
    assert [p["step"] for p in m["loss_curve"]] == [4, 6]
    assert [p["loss"] for p in m["loss_curve"]] == [float(np.mean(per_step[:8])), float(np.mean(per_step[8:]))]
