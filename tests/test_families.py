"""Every encoder family through every stage, on tiny random-weight models built in code
(tests/family_models.py): fine-tune -> prune -> every ONNX variant with parity -> compare --quick
-> one request to the local endpoint; plus the families table's facts and the bad-input errors."""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

import family_models as fm
from conftest import make_texts, write_splits, write_table

from bertopt import families, modeling
from bertopt.errors import ConfigError, ModelError

FAMILIES = list(fm.FAMILIES)
NO_FUSION = {"deberta", "deberta-v2", "mpnet", "modernbert"}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    return write_splits(tmp_path_factory.mktemp("family_data"), 96, 48)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, packaged_model_dir) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("families")
    return {f: fm.build(f, base / f, packaged_model_dir) for f in FAMILIES}


def _logits(model, tokenizer, texts=("a good film", "the plot was dull and the acting was poor")):
    import torch

    enc = tokenizer(list(texts), padding=True, return_tensors="pt",
                    return_token_type_ids=modeling.uses_token_type_ids(model))
    with torch.no_grad():
        return model.eval()(**enc).logits


# ----------------------------------------------------------------------------- the table
def test_table_covers_the_ten_families_and_their_facts(family_dirs):
    from transformers import AutoConfig

    assert set(FAMILIES) <= set(families.FAMILIES)
    cfg = {f: AutoConfig.from_pretrained(d) for f, d in family_dirs.items()}
    assert {f for f in FAMILIES if families.takes_token_type_ids(cfg[f])} == {"bert", "electra", "albert"}
    assert {f for f in FAMILIES if families.ort_fusion(cfg[f])[0] is None} == NO_FUSION
    assert families.max_positions(cfg["roberta"]) == 128  # 130 rows - (pad id 1 + 1)
    assert families.max_positions(cfg["bert"]) == 128 and families.max_positions(cfg["modernbert"]) == 128
    assert families.ort_fusion(cfg["deberta"])[1].startswith("ONNX Runtime's transformer optimizer has no")


def test_unknown_family_is_generic_with_a_warning(caplog):
    from transformers import BertConfig

    config = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=37, num_hidden_layers=2)
    config.model_type = "my-encoder"
    row = families.family(config)  # logs one warning (other tests' stage logging may detach caplog)
    assert not row.known and row.ort_model_type == "bert" and "my-encoder" in families._warned
    assert families.takes_token_type_ids(config) and families.max_positions(config) == 512


def test_fusion_skipped_by_the_table_or_when_an_unknown_family_fuses_nothing(family_dirs, tmp_path):
    from transformers import AutoConfig

    from bertopt import export as ex
    from bertopt.converters import build_fused

    src = tmp_path / "model.onnx"
    ex.export_onnx(family_dirs["deberta"], src, max_length=32)
    config = AutoConfig.from_pretrained(family_dirs["deberta"])
    with pytest.raises(ex.VariantUnavailable, match="disentangled"):
        build_fused(config, src, tmp_path / "a.onnx")  # the table knows: not even tried
    config.model_type = "my-deberta-like"
    with pytest.raises(ex.VariantUnavailable, match="fused 0 Attention.*not in the families table"):
        build_fused(config, src, tmp_path / "b.onnx")  # unknown: tried, nothing fused -> skipped, not failed


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_removal_reloads_the_same_model(family, family_dirs, tmp_path):
    """Pruned copies are plain models: save_pretrained + from_pretrained give the same logits,
    and the per-layer config (ModernBERT's global/local pattern) follows the kept layers."""
    from transformers import AutoModelForSequenceClassification

    from bertopt import pruning

    model = modeling.load_model(str(family_dirs[family]))
    tok = modeling.load_tokenizer(str(family_dirs[family]))
    n = pruning.num_layers(model)
    pruned = pruning.remove_layers(model, [1])
    assert pruning.num_layers(pruned) == n - 1 and pruned.config.num_hidden_layers == n - 1
    if family == "modernbert":
        assert pruned.config.layer_types == [t for i, t in enumerate(model.config.layer_types) if i != 1]
    pruned.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert again.config.num_hidden_layers == n - 1
    before, after = _logits(pruned, tok), _logits(again, tok)
    assert (before - after).abs().max().item() < 1e-5
    assert (before - _logits(model, tok)).abs().max().item() > 1e-6  # a layer really went


def test_albert_freezing_and_pruning_say_what_they_do(family_dirs):
    from bertopt import pruning

    model = modeling.load_model(str(family_dirs["albert"]))
    with pytest.raises(ConfigError, match="repeats one shared layer 3 times"):
        modeling.freeze_layers(model, 1)
    counts = modeling.freeze_layers(model, 3)  # all: only the classifier head trains
    head = sum(p.numel() for p in model.classifier.parameters())
    assert counts["trainable_parameters"] == head + sum(p.numel() for p in model.albert.pooler.parameters())
    pruned = pruning.remove_layers(model, [2])
    assert pruned.config.num_hidden_layers == 2  # one repetition fewer, same parameters
    assert modeling.param_counts(pruned)["parameters"] == counts["parameters"]


def test_modernbert_keeps_its_first_layer(monkeypatch):
    from types import SimpleNamespace

    from bertopt import pruning

    model = SimpleNamespace(config=SimpleNamespace(model_type="modernbert", num_hidden_layers=3))
    monkeypatch.setattr(pruning, "num_layers", lambda m: 3)
    monkeypatch.setattr(pruning, "remove_layers", lambda m, idx: m)
    result = pruning.greedy_prune(model, 1, lambda m: pruning.LayerScores("removal", "accuracy_drop",
                                                                          [-1.0, 0.5, 0.2]))
    assert result.removed == [2]  # layer 0 has the lowest score but cannot go


# ----------------------------------------------------------------------------- defaults
def test_default_learning_rate_follows_model_size(family_dirs, caplog):
    from bertopt.config import TrainConfig

    assert modeling.default_lr(22_700_000)[0] == 1e-4  # the packaged MiniLM: unchanged
    assert modeling.default_lr(110_000_000)[0] == 3e-5 and modeling.default_lr(335_000_000)[0] == 2e-5
    model = modeling.load_model(str(family_dirs["bert"]))
    assert modeling.resolve_lr(TrainConfig(), model).lr == 1e-4
    assert modeling.default_lr(modeling.param_counts(model)["parameters"])[1].startswith("default for small")
    assert modeling.resolve_lr(TrainConfig(lr=5e-3), model).lr == 5e-3  # --lr wins


# ----------------------------------------------------------------------------- bad input
def _config_dir(tmp_path, config) -> str:
    config.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("kind", ["decoder", "seq2seq"])
def test_decoder_and_seq2seq_models_are_refused(kind, tmp_path, small_data, capsys):
    import benchmark
    from transformers import GPT2Config, T5Config

    config = (GPT2Config(n_layer=1, n_embd=16, n_head=2) if kind == "decoder"
              else T5Config(num_layers=1, d_model=16, num_heads=2, d_ff=32, d_kv=8))
    argv = ["--model", _config_dir(tmp_path / "m", config), "--dataset", small_data, "--output-dir",
            str(tmp_path / "out"), "--epochs", "1", "--device", "cpu", "--quiet"]
    assert benchmark.main(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ("decoder-only" if kind == "decoder" else "encoder-decoder") in errors[0]
    assert "Traceback" not in err and not (tmp_path / "out" / "baseline" / "manifest.json").exists()


def test_config_without_weights_is_one_clear_error(tmp_path, family_dirs):
    from transformers import AutoConfig

    d = _config_dir(tmp_path, AutoConfig.from_pretrained(family_dirs["roberta"]))
    with pytest.raises(ModelError, match="has a config.json but no weights"):
        modeling.load_model(d, num_labels=2)


def test_head_size_must_match_the_labels(tmp_path, family_dirs, small_data, capsys):
    import benchmark

    argv = ["--model", str(family_dirs["electra"]), "--dataset", small_data, "--output-dir", str(tmp_path),
            "--epochs", "1", "--device", "cpu", "--quiet"]
    with pytest.raises(ModelError, match="trained 2-label classification head but the data has 3 labels"):
        modeling.load_model(str(family_dirs["electra"]), num_labels=3, label_names=["a", "b", "c"])
    three = tmp_path / "three"
    t, _ = make_texts(30, seed=3)
    write_table(three / "train.tsv", t, [i % 3 for i in range(30)])
    argv[3] = str(three)
    assert benchmark.main(argv) == 1
    assert "2-label classification head" in capsys.readouterr().err


# ----------------------------------------------------------------------------- every stage
def _stages(model_dir: Path, data: str, out: Path) -> dict:
    from bertopt.config import PruneConfig, TrainConfig
    from bertopt.onnx_stage import OnnxConfig, run
    from bertopt.prune_stage import run_prune
    from bertopt.train_stage import run_baseline

    common = dict(dataset=data, output_dir=str(out), max_length=48, batch_size=16, seed=0, device="cpu",
                  quiet=True, epochs=1)
    assert run_baseline(TrainConfig(model=str(model_dir), lr=5e-3, **common)).status == "ok"
    assert run_prune(PruneConfig(prune_layers=1, lr=5e-3, sensitivity_samples=16, **common)).status == "ok"
    # every ONNX Runtime variant (the OpenVINO rows have their own tests)
    assert run(OnnxConfig(source="baseline", variants="opt,int8,int4,fp16,qdq", calibration_samples=32,
                          **common)).status == "ok"
    assert run(OnnxConfig(source="pruned", variants="opt", **common)).status == "ok"
    return {s: json.loads((out / "onnx" / s / "manifest.json").read_text()) for s in ("baseline", "pruned")}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_through_every_stage(family, family_dirs, small_data, tmp_path):
    import compare
    from bertopt.aws import local
    from bertopt.aws.config import AwsDeployConfig

    out = tmp_path / "out"
    manifests = _stages(family_dirs[family], small_data, out)
    for source, manifest in manifests.items():
        assert manifest["status"] == "ok"
        variants = manifest["metrics"]["variants"]
        assert set(variants) == ({"fp32", "opt", "int8", "int4", "fp16", "qdq"} if source == "baseline"
                                 else {"fp32", "opt"})
        assert variants["fp32"]["status"] == "ok" and variants["fp32"]["parity"]["max_abs_diff"] <= 1e-4
        opt = variants["opt"]
        if family in NO_FUSION:
            assert opt["status"] == "skipped" and "no attention fusion" in opt["reason"]
            assert source == "pruned" or variants["int8"]["from_file"] == "model.onnx"
        else:
            assert opt["status"] == "ok" and opt["fused_operators"].get("Attention", 0) >= 1
        for name, v in variants.items():
            if v["status"] != "skipped":  # every built variant was checked against PyTorch
                assert v["status"] in ("ok", "rejected") and v["parity"]["eval"]["rows"] > 0, (name, v)
        assert manifest["metrics"]["max_positions"] == 128
    pruned = json.loads((out / "pruned" / "manifest.json").read_text())["metrics"]
    assert pruned["layers_after"] == pruned["layers_before"] - 1

    reports = tmp_path / "reports"
    argv = ["--output-dir", str(out), "--reports-dir", str(reports), "--quick", "--quiet", "--threads", "1",
            "--sweep-batches", "1", "--sweep-seqs", "16", "--latency-requests", "3", "--skip-memory",
            "--repeats", "1", "--warmup", "0"]
    assert compare.main(argv) == 0
    results = json.loads((reports / "results.json").read_text())
    ok = {r["name"] for r in results["variants"] if r["status"] == "ok"}
    assert {"torch-fp32", "ort-fp32", "pruned-ort-fp32"} <= ok, ok
    assert results["recommendation"]["variant"] in ok

    cfg = AwsDeployConfig(output_dir=str(out), reports_dir=str(reports), local=True, port=0, quiet=True)
    archive, model_dir, handler, model = local.prepare_local(cfg)
    endpoint = local.LocalEndpoint(local.InvocationsApp(handler, model), "127.0.0.1", 0, threads=1).start()
    try:
        req = urllib.request.Request(endpoint.url + "/invocations", method="POST",
                                     data=json.dumps({"inputs": ["a great film", "dull"]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = json.loads(resp.read())
    finally:
        endpoint.stop()
    labels = json.loads((out / "baseline" / "labels.json").read_text())
    assert len(answer) == 2 and all(a["label"] in labels and 0 <= a["score"] <= 1 for a in answer)
