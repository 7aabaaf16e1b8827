"""Width pruning (heads, FFN neurons) for every family, the prune stage's --heads/--ffn-width, and the
compression search (--compress auto) with a fake scorer and on the tiny baseline."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

import family_models as fm
from conftest import write_splits

from bertopt import compress, modeling, width
from bertopt.config import PruneConfig

FAMILIES = list(fm.FAMILIES)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    return write_splits(tmp_path_factory.mktemp("width_data"), 96, 48)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, packaged_model_dir) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("width_families")
    return {f: fm.build(f, base / f, packaged_model_dir) for f in FAMILIES}


def _load(d):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)


def _logits(model, tok, texts=("a good film indeed", "the plot was dull and the acting was poor")):
    import torch

    batch = dict(tok(list(texts), padding=True, return_tensors="pt"))
    if not modeling.uses_token_type_ids(model):
        batch.pop("token_type_ids", None)
    with torch.inference_mode():
        return model.eval()(**batch).logits


def _zero_heads_and_neurons(model, heads=(1, 3), neurons=range(5)):
    """Zero the output-projection columns of ``heads`` and the FFN output columns of ``neurons``
    in every block: those heads / neurons then contribute nothing."""
    import torch

    row, d = width.spec(model), width.head_size(model)
    with torch.no_grad():
        for block in width.blocks(model):
            out = width._get(block, row.out)
            for h in heads:
                out.weight[:, h * d:(h + 1) * d] = 0
            width._get(block, row.ffn_out).weight[:, list(neurons)] = 0


# ----------------------------------------------------------------------------- every family
@pytest.mark.parametrize("family", FAMILIES)
def test_family_head_and_ffn_pruning_is_exact_reloads_and_exports(family, family_dirs, small_data, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from bertopt.onnx_stage import OnnxConfig, run

    model, tok = _load(family_dirs[family])
    assert width.unsupported_reason(model) == ""
    n, w = len(width.blocks(model)), width.ffn_width(model)
    _zero_heads_and_neurons(model)
    reference = _logits(model, tok)
    pruned = width.shrink(model, [[0, 2]] * n, [list(range(5, w))] * n)
    assert width.num_heads(pruned) == 2 and width.ffn_width(pruned) == w - 5
    assert width.num_heads(model) == 4 and width.ffn_width(model) == w  # the source is untouched
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert torch.allclose(_logits(pruned, tok), reference, atol=1e-5)

    out = tmp_path / "pruned"
    pruned.save_pretrained(out)
    tok.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())[width.HEADS_KEY] == 2
    with pytest.raises(Exception, match="mismatch|size"):  # transformers cannot express fewer heads: refused
        AutoModelForSequenceClassification.from_pretrained(out)
    loaded = modeling.load_model(str(out))
    assert torch.allclose(_logits(loaded, tok), reference, atol=1e-5)

    common = dict(dataset=small_data, output_dir=str(tmp_path / "out"), max_length=48, batch_size=16, seed=0,
                  device="cpu", quiet=True)
    assert run(OnnxConfig(source=str(out), variants="opt,int8,qdq", calibration_samples=16, **common)).status == "ok"
    manifest = json.loads((tmp_path / "out" / "onnx" / "pruned" / "manifest.json").read_text())
    variants = manifest["metrics"]["variants"]
    assert variants["fp32"]["status"] == "ok" and variants["fp32"]["parity"]["max_abs_diff"] <= 1e-4
    for name in ("int8", "qdq"):
        assert variants[name]["status"] in ("ok", "rejected") and variants[name]["parity"]["eval"]["rows"] > 0, name
    if family not in ("deberta", "deberta-v2", "mpnet", "modernbert"):  # ORT fuses the pruned attention
        assert variants["opt"]["status"] == "ok" and variants["opt"]["fused_operators"].get("Attention", 0) >= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_family_ffn_pruned_model_loads_with_the_auto_classes(family, family_dirs, tmp_path):
    import torch

    model, tok = _load(family_dirs[family])
    n, w = len(width.blocks(model)), width.ffn_width(model)
    _zero_heads_and_neurons(model, heads=())
    reference = _logits(model, tok)
    pruned = width.shrink(model, None, [list(range(5, w))] * n)
    pruned.save_pretrained(tmp_path)
    loaded, info = _load_info(tmp_path)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert width.ffn_width(loaded) == w - 5 and width.auto_loadable(loaded)
    assert torch.allclose(_logits(loaded, tok), reference, atol=1e-5)


def _load_info(d):
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(d, output_loading_info=True)
    return model.eval(), info


def test_importance_scores_zeroed_heads_and_neurons_lowest(family_dirs, small_data):
    from bertopt import data

    model, tok = _load(family_dirs["bert"])
    _zero_heads_and_neurons(model)
    texts = [l.split("\t")[0] for l in (Path(small_data) / "train.tsv").read_text().splitlines()[1:33]]
    ds = data.EncodedDataset(data.tokenize(texts, tok, 32), [i % 2 for i in range(len(texts))])
    loader = data.make_loader(ds, 16, shuffle=False, seed=0, pad_id=tok.pad_token_id, with_token_type_ids=True)
    import torch

    imp = width.importance(model, loader, torch.device("cpu"), torch.nn.functional.cross_entropy)
    assert imp["batches"] == 2 and len(imp["heads"]) == 3 and len(imp["heads"][0]) == 4
    for heads, neurons in zip(imp["heads"], imp["neurons"]):
        assert heads[1] == heads[3] == 0 and min(heads[0], heads[2]) > 0
        assert max(neurons[:5]) == 0 and max(neurons[5:]) > 0
    assert width.keep_indices(imp["heads"], 2) == [[0, 2]] * 3
    assert all(not any(j < 5 for j in keep) for keep in width.keep_indices(imp["neurons"], 20))
    assert width.keep_indices([[3, 1, 2], [0, 5, 4]], 1, shared=True) == [[1], [1]]


def test_width_requests_that_cannot_be_met_are_one_line(family_dirs):
    from transformers import AutoConfig

    from bertopt.errors import ConfigError

    config = AutoConfig.from_pretrained(family_dirs["bert"])
    with pytest.raises(ConfigError, match="has 4 attention heads per layer"):
        width.check_request(config, 5, None)
    with pytest.raises(ConfigError, match="FFN width is 37"):
        width.check_request(config, None, 38)
    with pytest.raises(ConfigError, match="keep 1..4"):
        width.check_request(config, 0, None)
    width.check_request(config, 4, 37)  # the full width is allowed (nothing removed)


# ----------------------------------------------------------------------------- the prune stage
def _cfg(out, data, **over):
    kwargs = dict(dataset=data, output_dir=str(out), epochs=1, batch_size=16, max_length=64, lr=3e-3,
                  warmup_ratio=0.0, seed=0, device="cpu", quiet=True, max_train_samples=96)
    kwargs.update(over)
    return PruneConfig(**kwargs)


@pytest.fixture()
def out_with_baseline(tmp_path, trained_tiny):
    shutil.copytree(Path(trained_tiny) / "baseline", tmp_path / "baseline")
    return tmp_path


def test_prune_stage_heads_and_ffn_width_with_distillation(out_with_baseline, tiny_data_dir):
    from bertopt.prune_stage import run_prune

    result = run_prune(_cfg(out_with_baseline, tiny_data_dir, heads=2, ffn_width=20))
    assert result.status == "ok"
    d = out_with_baseline / "pruned"
    m = json.loads((d / "manifest.json").read_text())["metrics"]
    assert (m["heads_before"], m["heads_after"], m["ffn_before"], m["ffn_after"]) == (4, 2, 37, 20)
    assert m["layers_before"] == m["layers_after"] == 2 and m["distill"] is True
    assert m["parameters_after"] < m["parameters_before"] and m["loads_with_auto_classes"] is False
    rec = json.loads((d / "width.json").read_text())
    assert rec["split"] == "train" and len(rec["kept_heads"]) == 2 and all(len(k) == 2 for k in rec["kept_heads"])
    model = modeling.load_model(str(d))
    assert width.num_heads(model) == 2 and width.ffn_width(model) == 20


@pytest.mark.parametrize("flags, text", [
    (["--heads", "0"], "--heads must be a positive integer"),
    (["--heads", "5"], "has 4 attention heads per layer"),
    (["--ffn-width", "38"], "FFN width is 37"),
    (["--compress", "auto", "--heads", "2"], "--compress auto chooses the shape itself"),
])
def test_impossible_width_requests_exit_1_and_write_nothing(flags, text, out_with_baseline, tiny_data_dir, capsys):
    import prune

    rc = prune.main(["--output-dir", str(out_with_baseline), "--dataset", tiny_data_dir, "--device", "cpu",
                     "--quiet"] + flags)
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if text in line]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in "\n".join(err)
    assert not (out_with_baseline / "pruned").exists()


def test_compress_auto_enables_the_prune_stage_in_main():
    from bertopt import cli
    from bertopt.stages import PRUNE

    parser = cli.argparse.ArgumentParser()
    PRUNE.add_args(parser)
    assert PRUNE.enabled_by(parser.parse_args(["--compress", "auto"]))
    assert PRUNE.enabled_by(parser.parse_args(["--heads", "6"]))
    assert not PRUNE.enabled_by(parser.parse_args([]))
    cfg = PRUNE.build_config(parser.parse_args(["--auto", "--time-budget", "30", "--no-distill"]))
    assert cfg.compress == "auto" and cfg.time_budget == 30 and cfg.distill is False
    assert PRUNE.build_config(parser.parse_args(["--heads", "2"])).distill is True  # distillation is the default


# ----------------------------------------------------------------------------- the search
def test_grid_lists_every_smaller_shape():
    shapes = compress.grid(6, 12, 1536)
    assert compress.Shape(6, 12, 1536) not in shapes and len(shapes) == 4 * 3 * 4 - 1
    assert {s.layers for s in shapes} == {6, 5, 4, 3} and {s.heads for s in shapes} == {12, 9, 6}
    assert {s.ffn for s in shapes} == {1536, 1152, 768, 384}
    assert {(s.heads, s.ffn) for s in compress.grid(4, 4, 37, width=False)} == {(4, 37)}


@pytest.mark.parametrize("first_ok", [0, 3, 7, 11])
def test_search_keeps_the_fastest_shape_within_budget_on_a_fake_scorer(first_ok):
    ordered = [compress.Shape(12 - i, 4, 37) for i in range(12)][::-1]  # fastest first
    timings = {s: {"forward_s": 0.01 * (i + 1), "parameters": 100 * (i + 1)} for i, s in enumerate(ordered)}
    # faster shapes score worse; shapes from index first_ok on are within 1 point of 0.90
    metric = {s: 0.90 - (0.05 if i < first_ok else 0.005) for i, s in enumerate(ordered)}
    calls = []

    def scorer(s):
        calls.append(s)
        return metric[s]

    best, tried = compress.search(ordered, timings, 0.2, 0.90, 0.01, scorer, max_tries=10)
    assert best == ordered[first_ok]
    assert len(tried) == len(calls) <= math.ceil(math.log2(len(ordered))) + 1
    assert [t.shape for t in tried] == calls and all(t.within_budget == (metric[t.shape] >= 0.89) for t in tried)
    assert tried[0].speedup == pytest.approx(0.2 / timings[calls[0]]["forward_s"], rel=1e-3)


def test_search_without_a_shape_within_budget_returns_none():
    ordered = [compress.Shape(i, 2, 8) for i in (1, 2, 3)]
    timings = {s: {"forward_s": 0.01 * s.layers, "parameters": s.layers} for s in ordered}
    best, tried = compress.search(ordered, timings, 0.05, 0.9, 0.01, lambda s: 0.5, max_tries=5)
    assert best is None and tried and not any(t.within_budget for t in tried)


def test_prune_stage_compress_auto_records_every_shape_tried(out_with_baseline, tiny_data_dir):
    from bertopt.prune_stage import run_prune

    cfg = _cfg(out_with_baseline, tiny_data_dir, compress="auto", time_budget=1.0, max_candidates=2,
               search_rows=64, search_accuracy_budget=0.99, sensitivity_samples=32)
    result = run_prune(cfg)
    d = out_with_baseline / "pruned"
    search = json.loads((d / "search.json").read_text())
    assert "slice of train" in search["split"] and search["search_rows"] == 64
    assert 1 <= len(search["tried"]) <= 2 and search["shapes_timed"]
    for t in search["tried"]:
        assert {"shape", "parameters", "forward_ms", "speedup", "metric", "time_s", "within_budget"} <= set(t)
    assert result.status == "ok" and search["chosen"] == search["tried"][-1]["shape"]  # budget 0.99: all pass
    m = json.loads((d / "manifest.json").read_text())["metrics"]
    assert m["shape"] == search["chosen"] and m["search"]["chosen"] == search["chosen"]
    assert m["parameters_after"] < m["parameters_before"]
    modeling.load_model(str(d))


# ----------------------------------------------------------------------------- results.json and the report
def _search_record():
    return {"split": "train rows the baseline did not train on (55349 of 67349)", "search_rows": 1000,
            "metric": "accuracy", "unpruned_search_metric": 0.88, "budget": 0.01, "time_budget_s": 60,
            "unpruned": {"shape": "6L/12H/1536F", "forward_ms": 40.0, "parameters": 22_700_000},
            "speed": "forward time of one 32-row batch", "chosen": "4L/12H/768F", "search_time_s": 512.0,
            "tried": [{"shape": "3L/6H/384F", "layers": 3, "heads": 6, "ffn": 384, "parameters": 13_000_000,
                       "forward_ms": 9.0, "speedup": 4.4, "metric": 0.80, "drop": 0.08, "within_budget": False,
                       "time_s": 80.0},
                      {"shape": "4L/12H/768F", "layers": 4, "heads": 12, "ffn": 768, "parameters": 17_000_000,
                       "forward_ms": 20.0, "speedup": 2.0, "metric": 0.875, "drop": 0.005, "within_budget": True,
                       "time_s": 81.0}]}


def test_report_shows_the_compression_search_from_results_json(tmp_path):
    import re

    from test_report import sample_results

    from bertopt import report, results

    res = sample_results()
    res["compression_search"] = _search_record()
    assert not [p for p in results.problems(res) if "compression_search" in p]
    html = report.render_html(res)
    assert '<section id="compression-search">' in html and "4L/12H/768F" in html and "3L/6H/384F" in html
    assert re.search(r'<figure class="plot" id="fig-search">\s*<svg', html)
    assert "not on the eval split" in html
    res["compression_search"] = {"tried": [{"shape": "x"}]}
    assert any("compression_search" in p for p in results.problems(res))


def test_compare_carries_the_search_records_into_results_json(tmp_path):
    from bertopt import artifacts
    from bertopt.compare.assemble import pruning_records

    assert pruning_records(tmp_path) == {}
    artifacts.search_path(tmp_path).parent.mkdir(parents=True)
    artifacts.search_path(tmp_path).write_text(json.dumps(_search_record()))
    found = pruning_records(tmp_path)
    assert set(found) == {"compression_search"} and found["compression_search"]["chosen"] == "4L/12H/768F"
    assert [t["shape"] for t in found["compression_search"]["tried"]] == ["3L/6H/384F", "4L/12H/768F"]


def _pair_data(d, regression: bool):
    import random

    from conftest import FILL

    topics = {"sport": ["goal", "match", "team"], "money": ["bank", "price", "market"], "food": ["bread", "soup"]}
    rng = random.Random(5)
    for name, n in (("train.tsv", 160), ("dev.tsv", 48)):
        rows = ["sentence1\tsentence2\tlabel"]
        for _ in range(n):
            a, b = rng.choice(sorted(topics)), rng.choice(sorted(topics))
            s1 = " ".join([rng.choice(FILL), rng.choice(topics[a]), rng.choice(FILL)])
            s2 = " ".join([rng.choice(FILL), rng.choice(topics[b]), rng.choice(FILL)])
            label = f"{4.0 * (a == b) + rng.random():.2f}" if regression else str(int(a == b))
            rows.append(f"{s1}\t{s2}\t{label}")
        (d / name).write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("regression", [False, True], ids=["pairs", "regression"])
def test_width_pruning_of_pair_and_regression_models_distils_and_scores_the_task(regression, tmp_path,
                                                                                  tiny_model_dir):
    import benchmark
    import prune
    from transformers import AutoModel

    enc = tmp_path / "encoder"
    AutoModel.from_pretrained(tiny_model_dir).save_pretrained(enc)
    for f in Path(tiny_model_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy(f, enc / f.name)
    d = tmp_path / "data"
    d.mkdir()
    _pair_data(d, regression)
    out = tmp_path / "out"
    common = ["--dataset", str(d), "--output-dir", str(out), "--quiet", "--max-length", "32", "--epochs", "1",
              "--lr", "1e-3", "--device", "cpu"]
    assert benchmark.main(common + ["--model", str(enc)]) == 0
    assert prune.main(common + ["--heads", "2", "--ffn-width", "16"]) == 0
    manifest = json.loads((out / "pruned" / "manifest.json").read_text())
    m = manifest["metrics"]
    assert manifest["data"]["task"] == ("regression" if regression else "classification")
    assert m["metric_name"] == ("pearson" if regression else "f1") and m["distill"] is True
    assert math.isfinite(m["pruned_eval_metric"]) and (m["heads_after"], m["ffn_after"]) == (2, 16)


def test_compress_auto_keeps_the_unpruned_model_when_no_shape_meets_the_budget(out_with_baseline, tiny_data_dir,
                                                                               monkeypatch):
    import prune

    from bertopt.onnx_stage import OnnxConfig, resolve_sources

    monkeypatch.setattr(compress, "search", lambda ordered, timings, base_s, base_metric, budget, fit, tries,
                        deadline=None: (None, []))
    rc = prune.main(["--output-dir", str(out_with_baseline), "--dataset", tiny_data_dir, "--device", "cpu", "--quiet",
                     "--auto", "--search-rows", "48", "--sensitivity-samples", "16", "--max-train-samples", "96"])
    assert rc == 0
    manifest = json.loads((out_with_baseline / "pruned" / "manifest.json").read_text())
    assert manifest["status"] == "skipped" and "no smaller shape met the budget" in manifest["reason"]
    assert "unpruned model is kept" in manifest["reason"] and manifest["metrics"]["search"]["chosen"] is None
    assert not (out_with_baseline / "pruned" / "model.safetensors").exists()
    cfg = OnnxConfig(source="baseline,pruned", output_dir=str(out_with_baseline), dataset=tiny_data_dir, quiet=True)
    assert [s.name for s in resolve_sources(cfg)] == ["baseline"]  # the pipeline goes on with the baseline
