"""The seams every stage shares: the variant registry, the results.json schema, the stage
lifecycle (stage_run) and the permissions of written files."""
import json
import os
import stat

import pytest

from bertopt import artifacts, export, results, tensorrt, variants
from bertopt.errors import MissingArtifact


def test_registry_is_the_one_table_export_and_tensorrt_read():
    assert export.VARIANTS == {s.key: (s.file, s.precision, s.devices)
                               for s in variants.for_stage("onnx", "onnxruntime")}
    assert set(export.FP32_VARIANTS) == {"fp32", "opt"}
    assert tensorrt.ONNX_SOURCES == {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.qdq.onnx"}
    assert tensorrt.PLAN_FILES["fp16"] == "model.fp16.plan"
    names = [s.name for s in variants.REGISTRY.values()]
    assert len(names) == len(set(names))
    for spec in variants.REGISTRY.values():
        assert spec.opener.count(":") == 1, spec.name
        if spec.stage != "trained":
            assert spec.file, spec.name
    with pytest.raises(ValueError, match="registered twice"):
        variants.register(variants.VariantSpec("ort-int8", "int8", "onnxruntime", "int4", "onnx", "x.onnx"))
    assert variants.get("trt-int8").targets == ("gpu",) and variants.get("ort-fp32").targets == ("cpu", "gpu")


def test_a_spec_whose_module_is_missing_is_unavailable_with_the_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)
    ok, why = variants.get("ov-fp32").available()
    assert not ok and "requirements.txt" in why
    assert variants.get("ort-int8").available() == (True, None)


def _minimal_results(**over):
    r = {"schema_version": results.SCHEMA_VERSION, "created": "now", "config": {}, "environment": {},
         "protocol": {"name": "fast"}, "data": {}, "hardware": {}, "recommendation_message": "m", "targets": [],
         "variants": [{"name": "ort-int8", "status": "ok", "backend": "onnxruntime", "precision": "int8",
                       "source": "baseline", "device": "cpu"}],
         "recommendation": {k: None for k in results.RECOMMENDATION} | {"variant": "ort-int8", "reason": "r"}}
    r.update(over)
    return r


def test_results_schema_validates_loads_and_saves(tmp_path):
    good = _minimal_results()
    assert results.problems(good) == []
    path = tmp_path / "results.json"
    results.save(path, good)
    assert results.load(path)["variants"][0]["name"] == "ort-int8"
    assert results.get(good, "recommendation", "variant") == "ort-int8" and results.get(good, "x", "y") is None
    bad = _minimal_results(schema_version=99, variants=[{"name": "a", "status": "weird"}],
                           recommendation={"variant": "nope"})
    found = " | ".join(results.problems(bad))
    assert "schema_version 99" in found and "status 'weird'" in found and "recommendation lacks" in found
    with pytest.raises(results.ResultsError, match="compare.py --force"):
        results.save(tmp_path / "bad.json", bad)
    assert not (tmp_path / "bad.json").exists()  # nothing half-written
    with pytest.raises(MissingArtifact, match="python compare.py"):
        results.load(tmp_path / "missing.json")
    assert results.problems(_minimal_results(schema_version=1)) == []  # version 1 files still read


def test_stage_run_skips_when_current_and_writes_the_manifest_last(tmp_path):
    d = tmp_path / "stage"
    run = artifacts.stage_run(d, "demo", "fp1")
    assert run.current is None
    with run:
        assert run.directory != d and run.directory.parent == d.parent  # built beside the output
        (run.directory / "out.txt").write_text("x")
        assert not artifacts.manifest_path(run.directory).exists() and not d.exists()
        run.finish(status="ok", config={"a": 1}, outputs=["out.txt"])
        assert run.directory == d  # swapped into place by finish()
    m = json.loads(artifacts.manifest_path(d).read_text())
    assert m["stage"] == "demo" and m["fingerprint"] == "fp1" and (d / "stage.log").is_file()
    assert (d / "out.txt").read_text() == "x"
    assert artifacts.stage_run(d, "demo", "fp1").current["fingerprint"] == "fp1"
    assert artifacts.stage_run(d, "demo", "fp1", force=True).current is None
    (d / "stale.txt").write_text("old")
    with artifacts.stage_run(d, "demo", "fp2") as run2:  # a re-run starts from an empty dir (the log is carried)
        assert not (run2.directory / "stale.txt").exists() and not artifacts.manifest_path(run2.directory).exists()
        assert (run2.directory / "stage.log").exists()
        assert artifacts.manifest_path(d).exists() and (d / "stale.txt").exists()  # the previous output stays
    assert artifacts.read_manifest(d)["fingerprint"] == "fp1"  # no finish(): the previous output is kept
    assert artifacts.stage_run(d, "demo", "fp2").current is None  # ... and nothing vouches for fp2
    with artifacts.stage_run(d, "demo", "fp2") as run3:
        run3.finish(status="ok", config={}, outputs=[])
    assert not (d / "stale.txt").exists() and artifacts.read_manifest(d)["fingerprint"] == "fp2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".stage.lock", "stage"]  # no working dir left


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        artifacts.atomic_write_text(tmp_path / "report.html", "<html>")
        artifacts.atomic_write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("report.html", "m.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
