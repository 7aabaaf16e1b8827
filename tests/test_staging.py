"""Never lose the last good result (bertopt.staging): a killed or failed run leaves the previous
complete output valid and a working directory beside it that a rerun of the same configuration
resumes; one run per stage output (a second refuses naming the first's pid, a dead holder's lock is
taken over); a full disk is one line with the previous output intact.

The kill tests run the real scripts' main() in subprocesses through a worker that SIGKILLs itself
at a chosen point (after an optimizer step, after the ONNX export, inside compare's outputs).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bertopt import artifacts, staging
from bertopt.errors import PipelineError
from conftest import tiny_train_config
from test_distributed import ROOT, _clean_env, _run

WORKER = r'''
import json, os, signal, sys, time
from pathlib import Path
sys.path.insert(0, os.environ["BERTOPT_ROOT"])
script, argv = sys.argv[1], sys.argv[2:]
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
rank = int(os.environ.get("RANK", "0"))
if script in ("benchmark", "prune"):
    from bertopt import training
    orig = training._Run.optimizer_step
    kill_at, kill_rank = int(os.environ.get("KILL_AT_STEP", "0")), int(os.environ.get("KILL_RANK", "0"))
    pause = os.environ.get("PAUSE_FILE")
    def optimizer_step(self):
        orig(self)
        if kill_at and self.state.step == kill_at and rank == kill_rank:
            kill()
        if pause and self.state.step == 1:  # hold the lock until the test says go
            Path(pause + ".reached").touch()
            while not os.path.exists(pause):
                time.sleep(0.05)
    training._Run.optimizer_step = optimizer_step
elif script == "onnx_tensorrt":
    from bertopt import export
    orig_export = export.export_onnx
    def export_onnx(*a, **k):  # model.onnx is written into the working dir, then the run dies
        out = orig_export(*a, **k)
        kill()
        return out
    export.export_onnx = export_onnx
elif script == "compare":
    from bertopt import artifacts, results
    from bertopt.compare import measure, stage
    measure.measure = lambda cfg: json.loads(os.environ["CANNED_RESULTS"])
    def render(res, reports):  # results.json is written in the working dir; half the outputs, then death
        artifacts.atomic_write_text(Path(reports) / artifacts.RESULTS_CSV, "partial\n")
        if os.environ.get("KILL_IN_OUTPUTS"):
            kill()
        for name in (artifacts.SUMMARY_FILE, artifacts.REPORT_FILE):
            artifacts.atomic_write_text(Path(reports) / name, "new " + name)
        return list(artifacts.REPORT_FILES)
    stage._render_outputs = render
module = __import__(script)
sys.exit(module.main(argv))
'''


@contextlib.contextmanager
def _listening(caplog):
    """caplog's handler on bertopt.staging itself: an earlier stage run in this process stops the
    bertopt loggers propagating to the root, where caplog listens."""
    log = logging.getLogger("bertopt.staging")
    log.addHandler(caplog.handler)
    try:
        yield
    finally:
        log.removeHandler(caplog.handler)


def _env(**extra) -> dict:
    return _clean_env({k: str(v) for k, v in extra.items()})


def _worker(tmp_path: Path) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


def _train_args(model: str, data: str, out: Path, **over) -> list[str]:
    values = {"model": model, "dataset": data, "output-dir": str(out), "epochs": 2, "max-length": 64,
              "lr": 1e-2, "warmup-ratio": 0, "seed": 0, "device": "cpu", "batch-size": 16,
              "eval-batch-size": 50, "save-every": 3, "max-train-samples": 120}
    values.update({k.replace("_", "-"): v for k, v in over.items()})
    return [a for k, v in values.items() for a in (f"--{k}", str(v))]


def _digest(directory: Path) -> dict:
    """Every file's sha256 (the stage log aside, which a rerun appends to)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != artifacts.STAGE_LOG
            and not any(part.startswith(".") for part in p.relative_to(directory).parts)}


def _onnx_cfg(out: Path, **kw):
    from bertopt.onnx_stage import OnnxConfig

    return OnnxConfig(**{"output_dir": str(out), "quiet": True, "variants": "fp32", "calibration_samples": 16, **kw})


@pytest.fixture()
def pipeline(tmp_path, trained_tiny) -> Path:
    """A private copy of the tiny trained baseline with its ONNX stage built on it."""
    from bertopt.onnx_stage import run as run_onnx

    out = tmp_path / "saved"
    shutil.copytree(trained_tiny / "baseline", out / "baseline")
    assert run_onnx(_onnx_cfg(out)).status == "ok"
    return out


def _assert_previous_still_good(out: Path, baseline_before: dict, manifest_before: dict) -> None:
    from transformers import AutoModelForSequenceClassification

    from bertopt.onnx_stage import run as run_onnx

    base = out / "baseline"
    assert _digest(base) == baseline_before  # weights, tokenizer, labels and manifest untouched
    assert artifacts.read_manifest(base) == manifest_before
    AutoModelForSequenceClassification.from_pretrained(base)  # still loads
    assert run_onnx(_onnx_cfg(out)).status == "up-to-date"  # downstream still matches its input


# ----------------------------------------------------------------------------- acceptance: killed training
def test_a_killed_baseline_run_with_another_config_leaves_the_previous_model_then_resumes(
        tmp_path, pipeline, tiny_model_dir, tiny_data_dir):
    out, base = pipeline, pipeline / "baseline"
    before, manifest = _digest(base), artifacts.read_manifest(base)
    cmd = [sys.executable, str(_worker(tmp_path)), "benchmark"] + _train_args(tiny_model_dir, tiny_data_dir, out)
    job = _run(cmd, ROOT, _env(KILL_AT_STEP=5))
    assert job.returncode == -signal.SIGKILL, job.stdout[-3000:]
    work = staging.sibling(base, staging.WORK_SUFFIX)
    assert (work / "checkpoints").is_dir() and not (work / artifacts.MANIFEST).exists()
    _assert_previous_still_good(out, before, manifest)

    job = _run(cmd, ROOT, _clean_env())  # the same config again: resumes from the working dir's checkpoint
    assert job.returncode == 0, job.stdout[-3000:]
    assert "resuming in" in job.stdout and "resuming from" in job.stdout
    assert "taking over the lock" in job.stdout  # the SIGKILLed run never released it
    m = artifacts.read_manifest(base)
    assert m["fingerprint"] != manifest["fingerprint"] and m["resumed"] is True
    assert m["metrics"]["resumed_from"][0]["step"] == 3
    assert m["config"]["max_train_samples"] == 120 and not work.exists()
    assert not (base / "checkpoints").exists()


def test_a_run_with_another_config_discards_the_killed_runs_working_dir(tmp_path, pipeline, tiny_model_dir,
                                                                       tiny_data_dir, caplog):
    from bertopt.train_stage import run_baseline

    out, base = pipeline, pipeline / "baseline"
    cmd = [sys.executable, str(_worker(tmp_path)), "benchmark"] + _train_args(tiny_model_dir, tiny_data_dir, out)
    job = _run(cmd, ROOT, _env(KILL_AT_STEP=4))
    assert job.returncode == -signal.SIGKILL, job.stdout[-3000:]
    cfg = tiny_train_config(tiny_model_dir, tiny_data_dir, out, max_train_samples=48, epochs=1)
    with caplog.at_level("WARNING", logger="bertopt.staging"), _listening(caplog):
        assert run_baseline(cfg).status == "ok"
    assert any("discarding" in r.getMessage() and "cannot resume" in r.getMessage() for r in caplog.records)
    m = artifacts.read_manifest(base)
    assert m["config"]["max_train_samples"] == 48 and m["metrics"]["resumed_from"] == []


def test_a_killed_torchrun_baseline_leaves_the_previous_model_then_resumes(tmp_path, pipeline, tiny_model_dir,
                                                                           tiny_data_dir):
    out, base = pipeline, pipeline / "baseline"
    before, manifest = _digest(base), artifacts.read_manifest(base)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                str(_worker(tmp_path)), "benchmark"]
    args = _train_args(tiny_model_dir, tiny_data_dir, out, batch_size=8)
    job = _run(torchrun + args, ROOT, _env(KILL_AT_STEP=5, KILL_RANK=1))
    assert job.returncode != 0
    work = staging.sibling(base, staging.WORK_SUFFIX)
    assert (work / "checkpoints").is_dir()
    _assert_previous_still_good(out, before, manifest)
    job = _run(torchrun + args, ROOT, _clean_env())
    assert job.returncode == 0, job.stdout[-3000:]
    m = artifacts.read_manifest(base)
    assert m["metrics"]["world_size"] == 2 and m["metrics"]["resumed_from"][0]["step"] == 3
    assert not work.exists()


# ----------------------------------------------------------------------------- acceptance: ONNX and compare
def test_a_killed_onnx_run_leaves_the_previous_onnx_stage(tmp_path, pipeline):
    from bertopt.onnx_stage import run as run_onnx

    onnx_dir = pipeline / "onnx" / "baseline"
    before, manifest = _digest(onnx_dir), artifacts.read_manifest(onnx_dir)
    cmd = [sys.executable, str(_worker(tmp_path)), "onnx_tensorrt", "--output-dir", str(pipeline), "--quiet",
           "--variants", "fp32", "--opset", "17", "--force"]
    job = _run(cmd, ROOT, _clean_env())
    assert job.returncode == -signal.SIGKILL, job.stdout[-3000:]
    assert (staging.sibling(onnx_dir, staging.WORK_SUFFIX) / "model.onnx").is_file()  # the partial run
    assert _digest(onnx_dir) == before and artifacts.read_manifest(onnx_dir) == manifest
    assert run_onnx(_onnx_cfg(pipeline)).status == "up-to-date"
    # another config replaces it cleanly (and the discarded working dir is gone)
    assert run_onnx(_onnx_cfg(pipeline, calibration_samples=8, force=True)).status == "ok"
    assert artifacts.read_manifest(onnx_dir)["fingerprint"] != manifest["fingerprint"]
    assert not staging.sibling(onnx_dir, staging.WORK_SUFFIX).exists()


def _canned_results() -> dict:
    from bertopt import results

    return {"schema_version": results.SCHEMA_VERSION, "created": "now", "config": {}, "environment": {},
            "protocol": {"name": "fast"}, "data": {}, "hardware": {}, "recommendation_message": "m", "targets": [],
            "variants": [{"name": "ort-int8", "status": "ok", "backend": "onnxruntime", "precision": "int8",
                          "source": "baseline", "device": "cpu"}],
            "recommendation": {k: None for k in results.RECOMMENDATION} | {"variant": "ort-int8", "reason": "r"}}


def test_a_killed_compare_leaves_the_previous_report(tmp_path, pipeline):
    reports = tmp_path / "reports"
    (reports / "loadtest.json").parent.mkdir(parents=True)
    (reports / "loadtest.json").write_text("{}")  # another tool's file in the shared reports dir
    cmd = [sys.executable, str(_worker(tmp_path)), "compare", "--output-dir", str(pipeline), "--reports-dir",
           str(reports), "--quick", "--quiet"]
    env = {"CANNED_RESULTS": json.dumps(_canned_results())}
    job = _run(cmd, ROOT, _clean_env(env))
    assert job.returncode == 0, job.stdout[-3000:]
    before = _digest(reports)
    assert {"results.json", "results.csv", "summary.md", "performance_report.html", "manifest.json"} <= set(before)

    job = _run(cmd + ["--force"], ROOT, _env(**env, KILL_IN_OUTPUTS=1))
    assert job.returncode == -signal.SIGKILL, job.stdout[-3000:]
    assert _digest(reports) == before  # the previous report, its manifest and the other file, as they were
    work = reports / ".compare.work"  # a shared dir: the working dir and the lock live inside it
    assert (work / "results.json").is_file() and (work / "results.csv").read_text() == "partial\n"

    job = _run(cmd + ["--force"], ROOT, _clean_env(env))  # a finished run replaces only compare's files
    assert job.returncode == 0, job.stdout[-3000:]
    assert (reports / "summary.md").read_text() == "new summary.md" and (reports / "loadtest.json").is_file()
    assert artifacts.read_manifest(reports)["stage"] == "compare" and not work.exists()


# ----------------------------------------------------------------------------- acceptance: two runs, one dir
def test_a_second_run_on_the_same_dir_refuses_and_the_first_finishes_consistent(tmp_path, pipeline,
                                                                               tiny_model_dir, tiny_data_dir):
    out, base = pipeline, pipeline / "baseline"
    pause = tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, str(_worker(tmp_path)), "benchmark"] + _train_args(tiny_model_dir, tiny_data_dir, out),
        cwd=ROOT, env=_clean_env({"PAUSE_FILE": str(pause)}), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not Path(f"{pause}.reached").exists():
            assert first.poll() is None and time.time() < deadline, "the first run never reached step 1"
            time.sleep(0.1)
        second = subprocess.run(
            [sys.executable, "benchmark.py"] + _train_args(tiny_model_dir, tiny_data_dir, out, max_train_samples=64),
            cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        lines = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, second.stderr  # one line (and the script's usual summary line)
        assert f"pid {first.pid}" in lines[0] and "--wait" in lines[0] and "Traceback" not in second.stderr
        pause.touch()
        stdout, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, stdout[-3000:]
    m = artifacts.read_manifest(base)
    assert m["config"]["max_train_samples"] == 120  # the first run's, with the first run's files
    assert set(m["outputs"]) <= set(artifacts.list_files(base)) and "model.safetensors" in m["outputs"]
    assert artifacts.is_current(base, m["fingerprint"])


def test_lock_refuses_a_live_holder_waits_with_wait_and_takes_over_a_dead_ones(tmp_path, caplog):
    final = tmp_path / "stage"
    held = staging.OutputLock(final, "demo").acquire()
    with pytest.raises(staging.StageBusy, match=rf"pid {os.getpid()}.*--wait"):
        staging.OutputLock(final, "demo").acquire()
    threading.Timer(0.3, held.release).start()
    waited = staging.OutputLock(final, "demo", wait=True).acquire()  # blocks until the timer releases
    waited.release()
    # a holder SIGKILLed while holding: the kernel drops the flock, its pid stays in the file
    code = ("import os, signal, sys; sys.path.insert(0, sys.argv[2]); from bertopt import staging; "
            "staging.OutputLock(sys.argv[1], 'demo').acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    dead = subprocess.run([sys.executable, "-c", code, str(final), str(ROOT)], timeout=120)
    assert dead.returncode == -signal.SIGKILL
    with caplog.at_level("WARNING", logger="bertopt.staging"), _listening(caplog):
        staging.OutputLock(final, "demo").acquire().release()
    assert any("taking over the lock" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- acceptance: disk full
def test_a_disk_full_while_saving_the_model_is_one_line_and_keeps_the_previous_model(
        tmp_path, pipeline, tiny_model_dir, tiny_data_dir, monkeypatch):
    from transformers import PreTrainedModel

    from bertopt.train_stage import run_baseline

    base = pipeline / "baseline"
    before, manifest = _digest(base), artifacts.read_manifest(base)

    def full(self, directory, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")  # torch's words
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    cfg = tiny_train_config(tiny_model_dir, tiny_data_dir, pipeline, max_train_samples=32, epochs=1)
    with pytest.raises(staging.DiskFull) as exc:
        run_baseline(cfg)
    msg = str(exc.value)
    assert "\n" not in msg and str(staging.sibling(base, staging.WORK_SUFFIX)) in msg
    assert "needs about" in msg and f"previous output {base} is untouched" in msg
    assert _digest(base) == before and artifacts.read_manifest(base) == manifest


def test_a_faked_enospc_from_a_writer_and_the_up_front_check(tmp_path, monkeypatch):
    d = tmp_path / "stage"
    with artifacts.stage_run(d, "demo", "fp1") as run:
        (run.directory / "model.bin").write_text("good")
        run.finish(status="ok", config={}, outputs=["model.bin"])
    before = _digest(d)
    with pytest.raises(staging.DiskFull) as exc:
        with artifacts.stage_run(d, "demo", "fp2", need_bytes=2048) as run:
            raise OSError(errno.ENOSPC, "No space left on device", str(run.directory / "model.onnx"))
    msg = str(exc.value)
    assert "\n" not in msg and "model.onnx was being written" in msg and "2.0 KB" in msg
    assert _digest(d) == before
    monkeypatch.setattr(staging, "free_bytes", lambda directory: 1000)
    with pytest.raises(staging.DiskFull, match="needs about 9.8 KB, 1000 B free"):
        with artifacts.stage_run(d, "demo", "fp3", need_bytes=10_000):
            pytest.fail("the up-front check should refuse before the stage body runs")
    assert _digest(d) == before


def test_a_cli_stage_on_a_full_disk_exits_1_with_one_line(tmp_path, trained_tiny, monkeypatch, capsys):
    import onnx_tensorrt

    shutil.copytree(trained_tiny / "baseline", tmp_path / "baseline")
    monkeypatch.setattr(staging, "free_bytes", lambda directory: 10)
    assert onnx_tensorrt.main(["--output-dir", str(tmp_path), "--variants", "fp32", "--quiet"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: no space left") and "Traceback" not in err
    assert "onnx" in lines[0] and "needs about" in lines[0] and "untouched" not in lines[0]  # nothing before
    assert not (tmp_path / "onnx" / "baseline").exists()


# ----------------------------------------------------------------------------- swap mechanics
def test_a_run_killed_between_the_two_renames_is_restored(tmp_path, monkeypatch):
    d = tmp_path / "stage"
    with artifacts.stage_run(d, "demo", "fp1") as run:
        run.finish(status="ok", config={}, outputs=[])
    os.rename(d, staging.sibling(d, staging.OLD_SUFFIX))  # what the fallback swap's first rename leaves
    run = artifacts.stage_run(d, "demo", "fp1")
    with run:
        assert artifacts.read_manifest(d)["fingerprint"] == "fp1"  # restored before the run builds
    assert artifacts.read_manifest(d)["fingerprint"] == "fp1"


def test_the_fallback_swap_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    d = tmp_path / "stage"
    for fp in ("fp1", "fp2"):
        with artifacts.stage_run(d, "demo", fp) as run:
            (run.directory / f"{fp}.txt").write_text(fp)
            run.finish(status="ok", config={}, outputs=[f"{fp}.txt"])
    assert sorted(p.name for p in d.iterdir() if p.name != artifacts.STAGE_LOG) == ["fp2.txt", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".stage.lock", "stage"]


def test_a_failed_run_keeps_a_previous_ok_output(tmp_path):
    d = tmp_path / "stage"
    with artifacts.stage_run(d, "demo", "fp1") as run:
        run.finish(status="ok", config={}, outputs=[])
    with pytest.raises(PipelineError):
        with artifacts.stage_run(d, "demo", "fp2") as run:
            run.finish(status="failed", config={}, reason="parity")
            raise PipelineError("parity failed")
    assert artifacts.read_manifest(d)["status"] == "ok"
    assert artifacts.read_manifest(staging.sibling(d, staging.WORK_SUFFIX))["status"] == "failed"


# ----------------------------------------------------------------------------- count flags
@pytest.mark.parametrize("flag", ["--max-train-samples", "--max-eval-samples"])
def test_a_zero_count_is_refused_and_all_still_means_everything(flag, capsys):
    import benchmark

    from bertopt.config import TrainConfig

    with pytest.raises(SystemExit) as exc:
        benchmark.main([flag, "0"])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "positive integer or 'all'" in err and "'0'" in err
    assert TrainConfig(max_train_samples="all", max_eval_samples="all").max_train_samples is None
    with pytest.raises(PipelineError, match="positive integer or 'all'"):
        TrainConfig(max_train_samples=0)
