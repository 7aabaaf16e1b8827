"""Scripts: --help, clear one-line errors with exit code 1, main.py stage selection, config files."""
import subprocess
import sys
from pathlib import Path

import pytest

import main as main_script
from conftest import ROOT, make_texts, write_table

SCRIPTS = sorted(p.name for p in ROOT.glob("*.py"))


def test_every_script_is_listed():
    assert {"main.py", "benchmark.py", "mixed_precision.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_of_every_script(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and "--output-dir" in out.stdout
    assert "Traceback" not in out.stderr


def _run(capsys, fn, argv):
    code = fn(argv)
    captured = capsys.readouterr()
    return code, captured.err


def _one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def bench():
    import benchmark

    return benchmark.main


def test_wrong_model_path(capsys, bench, tmp_path, tiny_data_dir):
    code, err = _run(capsys, bench, ["--model", str(tmp_path / "nope"), "--dataset", tiny_data_dir,
                                     "--output-dir", str(tmp_path / "o"), "--quiet"])
    assert code == 1
    assert "no such model directory" in _one_error_line(err)
    assert not (tmp_path / "o" / "baseline" / "manifest.json").exists()


def test_column_less_and_unreadable_data(capsys, bench, tmp_path, tiny_model_dir):
    (tmp_path / "x.csv").write_text("")
    code, err = _run(capsys, bench, ["--model", tiny_model_dir, "--dataset", str(tmp_path / "x.csv"),
                                     "--output-dir", str(tmp_path / "o"), "--quiet"])
    assert code == 1 and "x.csv" in _one_error_line(err)
    (tmp_path / "y.csv").write_text("alpha,beta\n1,2\n3,4\n")
    code, err = _run(capsys, bench, ["--model", tiny_model_dir, "--dataset", str(tmp_path / "y.csv"),
                                     "--output-dir", str(tmp_path / "o"), "--quiet"])
    assert code == 1 and "--text-column" in _one_error_line(err)


@pytest.mark.parametrize("flags,needle", [
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--max-length", "0"], "--max-length must be a positive integer"),
    (["--max-length", "4096"], "exceeds the model's limit of 128"),
    (["--freeze-layers", "9"], "exceeds the model's 2 encoder layers"),
])
def test_bad_values(capsys, bench, tmp_path, tiny_model_dir, tiny_data_dir, flags, needle):
    code, err = _run(capsys, bench, ["--model", tiny_model_dir, "--dataset", tiny_data_dir, "--output-dir",
                                     str(tmp_path / "o"), "--quiet", *flags])
    assert code == 1
    assert needle in _one_error_line(err)


@pytest.mark.parametrize("flags,needle", [
    (["--save-every", "-1"], "--save-every must be an integer >= 0 (0 = checkpoint at epoch ends only; got -1)"),
    (["--eval-every", "-5"], "--eval-every must be an integer >= 0 (0 = evaluate at epoch ends only; got -5)"),
    (["--early-stopping-patience", "-2"], "--early-stopping-patience must be an integer >= 0 (0 = off; got -2)"),
    (["--save-total-limit", "0"], "--save-total-limit must be >= 1 (got 0)"),
])
def test_bad_checkpoint_values_fail_up_front(capsys, bench, tmp_path, tiny_model_dir, tiny_data_dir, flags, needle):
    """Checked with the config, before any data, model or stage directory is touched."""
    code, err = _run(capsys, bench, ["--model", tiny_model_dir, "--dataset", tiny_data_dir, "--output-dir",
                                     str(tmp_path / "o"), "--quiet", *flags])
    assert code == 1 and _one_error_line(err).endswith(needle)
    assert not (tmp_path / "o").exists()


def test_unwritable_output_dir(capsys, bench, tmp_path, tiny_model_dir, tiny_data_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, err = _run(capsys, bench, ["--model", tiny_model_dir, "--dataset", tiny_data_dir,
                                     "--output-dir", str(blocker / "sub"), "--quiet"])
    assert code == 1
    assert "cannot write to output directory" in _one_error_line(err)


def test_error_line_in_a_real_process(tmp_path):
    out = subprocess.run([sys.executable, "benchmark.py", "--batch-size", "0", "--output-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: --batch-size must be a positive integer")
    assert "Traceback" not in out.stderr


def test_config_file_and_flag_precedence(tmp_path):
    from bertopt import cli
    from bertopt.config import TrainConfig
    from bertopt.stages import BASELINE
    import argparse

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("batch-size: 8\nepochs: 5\nlr: 0.001\n")
    parser = argparse.ArgumentParser()
    BASELINE.add_args(parser)
    cfg = BASELINE.build_config(cli.parse(parser, ["--config", str(cfg_file), "--epochs", "2"]))
    assert (cfg.batch_size, cfg.epochs, cfg.lr) == (8, 2, 0.001)
    bad = tmp_path / "bad.json"
    bad.write_text('{"batch_sise": 8}')
    parser = argparse.ArgumentParser()
    BASELINE.add_args(parser)
    with pytest.raises(Exception, match="unknown option 'batch_sise'"):
        cli.parse(parser, ["--config", str(bad)])


def test_underscore_aliases(tmp_path):
    from bertopt import cli
    from bertopt.stages import BASELINE
    import argparse

    parser = argparse.ArgumentParser()
    BASELINE.add_args(parser)
    cfg = BASELINE.build_config(cli.parse(parser, ["--model_path", "some/dir"]))
    assert cfg.model == "some/dir"


def test_main_stage_selection(monkeypatch, capsys, tmp_path):
    calls = []
    from bertopt import stages

    fake = []
    for s in stages.STAGES:
        def run(cfg, _name=s.name):
            from bertopt.cli import StageResult

            calls.append(_name)
            return StageResult(_name, "ok", 0.0, "fine")
        fake.append(stages.Stage(s.name, s.script, s.description, s.add_args, s.build_config, run,
                                 s.optional, s.enabled_by))
    monkeypatch.setattr(main_script, "STAGES", fake)
    monkeypatch.setattr(main_script, "by_name", lambda: {s.name: s for s in fake})
    base = ["--output-dir", str(tmp_path), "--quiet"]

    assert main_script.main(base + ["--stages", "mixed_precision"]) == 0
    assert calls == ["mixed_precision"]
    calls.clear()
    assert main_script.main(base + ["--skip", "mixed_precision"]) == 0
    assert "mixed_precision" not in calls and calls[0] == "baseline"
    non_optional = [s.name for s in fake if not s.optional]
    calls.clear()
    assert main_script.main(base) == 0
    assert calls == non_optional
    out = capsys.readouterr().out
    assert "pipeline ok" in out and "--max-train-samples 12000" in out
    assert main_script.main(base + ["--stages", "nosuch"]) == 1
    assert "unknown stage(s) nosuch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main_script.main(base + ["--no-such-flag"])
    assert exc.value.code == 2


def test_main_stops_at_first_failing_stage(monkeypatch, capsys, tmp_path):
    from bertopt import stages
    from bertopt.cli import StageResult
    from bertopt.errors import DataError

    def boom(cfg):
        raise DataError("the data is bad")

    calls = []
    fake = [stages.Stage("a", "a.py", "", stages.add_baseline_args, stages.build_baseline, boom),
            stages.Stage("b", "b.py", "", stages.add_baseline_args, stages.build_baseline,
                         lambda cfg: calls.append("b") or StageResult("b", "ok"))]
    monkeypatch.setattr(main_script, "STAGES", fake)
    monkeypatch.setattr(main_script, "by_name", lambda: {s.name: s for s in fake})
    assert main_script.main(["--output-dir", str(tmp_path), "--quiet"]) == 1
    assert calls == []
    captured = capsys.readouterr()
    assert "error: the data is bad" in captured.err and "pipeline failed" in captured.out


# ----------------------------------------------------------------------------- the flag namespace
def test_a_flag_defined_twice_with_another_meaning_is_an_error():
    import argparse

    from bertopt import cli

    parser = cli.new_parser("x")
    cli.add(parser, "--budget", type=float, help="one thing")
    cli.add(parser, "--budget", type=float, help="one thing")  # the same meaning: shared, added once
    with pytest.raises(cli.FlagConflict, match="--budget"):
        cli.add(parser, "--budget", type=float, help="another thing")
    with pytest.raises(cli.FlagConflict):
        cli.add(parser, "--budget", type=int, help="one thing")
    assert isinstance(parser.parse_args(["--budget", "0.5"]), argparse.Namespace)


def test_every_parser_builds_and_budgets_have_distinct_names():
    import compare
    import onnx_tensorrt

    import main as main_script
    from bertopt.compare.config import CompareConfig
    from bertopt.onnx_stage import OnnxConfig

    parser = main_script.build_parser()  # every stage's flags in one namespace: no FlagConflict
    ns = parser.parse_args(["--accuracy-budget", "0.02", "--onnx-accuracy-budget", "0.03"])
    assert ns.accuracy_budget == 0.02 and ns.onnx_accuracy_budget == 0.03
    from bertopt.stages import by_name

    assert by_name()["onnx_tensorrt"].build_config(ns).onnx_accuracy_budget == 0.03
    assert by_name()["compare"].build_config(ns).accuracy_budget == 0.02
    assert {"onnx_accuracy_budget"} <= {f for f in OnnxConfig.__dataclass_fields__}
    assert "accuracy_budget" not in OnnxConfig.__dataclass_fields__ and "accuracy_budget" in CompareConfig.__dataclass_fields__
    for script in (compare, onnx_tensorrt):
        with pytest.raises(SystemExit) as e:
            script.main(["--help"])
        assert e.value.code == 0


def test_old_or_abbreviated_spellings_fail_with_one_line(capsys):
    import onnx_tensorrt

    import main as main_script

    assert onnx_tensorrt.main(["--accuracy-budget", "0.02"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: --accuracy-budget is now --onnx-accuracy-budget"
    assert onnx_tensorrt.main(["--variant", "int8"]) == 1
    assert "--variants" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no prefix matching: --sweep-b is not --sweep-batches
        main_script.build_parser().parse_args(["--sweep-b", "1"])


def test_help_defaults_come_from_the_dataclasses(monkeypatch, capsys):
    import dataclasses

    import onnx_tensorrt
    from bertopt.onnx_stage import OnnxConfig

    field = {f.name: f for f in dataclasses.fields(OnnxConfig)}["int4_block_size"]
    monkeypatch.setattr(field, "default", 64)
    with pytest.raises(SystemExit):
        onnx_tensorrt.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "INT4 quantization block size (default: 64)" in out


def test_main_applies_each_stages_pipeline_defaults():
    import main as main_script
    from bertopt.stages import by_name

    parser = main_script.build_parser()
    ns = parser.parse_args([])
    applied = main_script._apply_defaults(parser, ns, by_name()["compare"].pipeline_defaults(ns, {"compare"}))
    assert applied == ["--protocol fast"] and by_name()["compare"].build_config(ns).protocol()["name"] == "fast"
    ns = parser.parse_args(["--protocol", "full"])
    assert main_script._apply_defaults(parser, ns, {"protocol_name": "fast"}) == [] and ns.protocol_name == "full"
