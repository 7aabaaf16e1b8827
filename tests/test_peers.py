"""tools/peers.py: every entry in its own process, the pipeline's row run as compare ran it."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from bertopt import results

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def peers_module():
    sys.path.insert(0, str(ROOT / "tools"))
    import peers

    return peers


def _results_with(row: dict) -> dict:
    return {"schema_version": results.SCHEMA_VERSION, "created": "now", "config": {}, "environment": {},
            "protocol": {}, "data": {}, "hardware": {}, "variants": [row], "recommendation_message": "",
            "targets": [], "baseline_accuracy": 0.5,
            "recommendation": {"variant": row["name"], "backend": row["backend"], "precision": row["precision"],
                               "source": "baseline", "device": "cpu", "path": row["path"], "model_dir": "",
                               "onnx_variant": "fp32", "reason": "test"}}


def test_peers_runs_each_entry_alone_and_the_pipeline_row_as_compare_did(peers_module, tmp_path, tiny_baseline):
    from bertopt import export as ex

    out = tmp_path / "saved_models"
    shutil.copytree(tiny_baseline, out / "baseline")
    onnx = out / "onnx" / "baseline" / "model.onnx"
    onnx.parent.mkdir(parents=True)
    ex.export_onnx(out / "baseline", onnx, 17, 64)
    row = {"name": "ort-fp32", "status": "ok", "backend": "onnxruntime", "precision": "fp32", "source": "baseline",
           "device": "cpu", "registry": "ort-fp32", "path": str(onnx), "threads": 1,
           "throughput": {"batch_size": 8, "samples_per_s": {"median": 123.0},
                          "mode": {"mode": "streams", "streams": 2}}}
    reports = tmp_path / "reports"
    results.save(reports / "results.json", _results_with(row))
    argv = ["--output-dir", str(out), "--reports-dir", str(reports), "--rounds", "2", "--settle", "0",
            "--peers", "eager-padded,ort-dynamic-int8"]
    assert peers_module.main(argv) == 0
    got = json.loads((reports / "peers.json").read_text())
    assert set(got["entries"]) == {"eager-padded", "ort-dynamic-int8", "bertopt:ort-fp32"}
    for e in got["entries"].values():
        assert len(e["pass_s"]) == 2 and all(s > 0 for s in e["pass_s"]) and 0 <= e["accuracy"] <= 1
    mine = got["entries"]["bertopt:ort-fp32"]
    assert "2 streams" in mine["what"] and "batch 8" in mine["what"] and mine["compare_texts_per_s"] == 123.0
    assert got["best_peer"] == "ort-dynamic-int8" and got["recommended"] == "ort-fp32"
    # the FP32 ONNX row and the eager FP32 model predict the same labels (same model, same texts)
    assert mine["accuracy"] == pytest.approx(got["entries"]["eager-padded"]["accuracy"], abs=0.02)


def test_peers_refuses_rows_compare_did_not_measure(peers_module, tmp_path, tiny_baseline, capsys):
    out = tmp_path / "saved_models"
    shutil.copytree(tiny_baseline, out / "baseline")
    row = {"name": "ort-fp32", "status": "ok", "backend": "onnxruntime", "precision": "fp32", "source": "baseline",
           "device": "cpu", "path": "x.onnx"}
    results.save(tmp_path / "reports" / "results.json", _results_with(row))
    assert peers_module.main(["--output-dir", str(out), "--reports-dir", str(tmp_path / "reports"),
                              "--rows", "ov-int9"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ov-int9" in err
    assert peers_module.main(["--output-dir", str(out), "--reports-dir", str(tmp_path / "nothing")]) == 1
