"""The HTML report: rendered from a hand-made results.json alone (with measured, skipped, failed
and incomplete rows), self-contained, and opened in headless Chromium with no console errors and
every figure rendered (a screenshot is saved in the test's tmp dir)."""
from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from bertopt import report
from bertopt.errors import PipelineError
from bertopt.report import plots


def _cells(scale):
    return [{"batch": b, "seq": s, "samples_per_s": {"median": scale * b / (1 + s / 64), "min": 1.0, "max": 1e6},
             "p50_ms": 1000 * (1 + s / 64) / scale, "gflops": 10.0 * scale / 100, "fraction_of_peak": 0.1 * scale / 100}
            for b in (1, 8, 32) for s in (32, 128)]


def _row(name, backend, precision, sps, p50, acc, size, rss, scale, **extra):
    r = {"name": name, "status": "ok", "reason": None, "backend": backend, "precision": precision,
         "source": "baseline", "device": "cpu", "kind": "onnx" if backend == "onnxruntime" else "torch",
         "path": f"/models/{name}", "model_dir": "/models", "variant": precision, "batching": "dynamic",
         "size_bytes": size, "threads": 2, "accuracy": acc, "accuracy_delta": acc - 0.91,
         "throughput": {"samples_per_s": {"median": sps, "min": 0.9 * sps, "max": 1.1 * sps, "n": 5},
                        "batch_size": 32, "texts": 872},
         "latency": {"e2e_ms": {"p50": p50, "p90": 1.2 * p50, "p99": 1.5 * p50, "mean": 1.1 * p50, "n": 200},
                     "model_ms": {"p50": 0.8 * p50, "p90": p50, "p99": 1.3 * p50, "mean": 0.9 * p50, "n": 200}},
         "sweep": _cells(scale), "memory": {"peak_rss_mb": rss, "load_time_s": 0.5}, "load_time_s": 0.5,
         "efficiency": {"e2e": {"gflops": 5.0, "fraction_of_peak": 0.05},
                        "sweep_32x128": {"gflops": 40.0, "fraction_of_peak": 0.4}},
         "speedup_vs_padded": sps / 40, "speedup_vs_fp32": sps / 120}
    r.update(extra)
    return r


def sample_results(with_pruning=True) -> dict:
    rows = [
        _row("torch-fp32-padded", "torch", "fp32", 40, 30.0, 0.91, 90_000_000, 700, 10, batching="padded",
             sweep=None),
        _row("torch-fp32", "torch", "fp32", 120, 12.0, 0.91, 90_000_000, 690, 30),
        _row("ort-opt", "onnxruntime", "fp32", 400, 4.0, 0.91, 89_000_000, 300, 100,
             first_use={"e2e_pass_s": 6.5, "e2e_vs_warm": 3.0, "note": "ort-opt: a fresh process's first pass <slow>"}),
        _row("ort-int8", "onnxruntime", "int8", 520, 3.0, 0.905, 23_000_000, 200, 130),
        # measured but incomplete: no memory probe, no sweep, no latency (must not break any figure)
        _row("ort-int4", "onnxruntime", "int4", 300, 5.0, 0.86, 15_000_000, None, 70, memory=None, sweep=None,
             latency=None, load_time_s=None),
        {"name": "ort-fp16", "status": "skipped", "reason": "needs an NVIDIA GPU with CUDA; this machine has none",
         "backend": "onnxruntime", "precision": "fp16", "source": "baseline", "device": "cuda", "size_bytes": 45_000_000},
        {"name": "ort-qdq", "status": "rejected", "reason": "accuracy -3.1 points exceeds the budget <&>",
         "backend": "onnxruntime", "precision": "int8", "source": "baseline", "device": "cpu"},
        {"name": "trt", "status": "skipped", "reason": "no CUDA device: TensorRT needs an NVIDIA GPU",
         "backend": "tensorrt", "precision": "-", "source": "baseline", "device": "cuda"},
        {"name": "pruned-torch-fp32", "status": "failed", "reason": "cannot open: boom", "backend": "torch",
         "precision": "fp32", "source": "pruned", "device": "cpu"},
    ]
    res = {
        "schema_version": 1, "created": "2026-01-01T00:00:00+0000", "git_revision": "abc1234",
        "config": {"optimize_for": "throughput", "target": "cpu", "accuracy_budget": 0.01},
        "environment": {"cpu": "Test CPU", "cpu_count": 2, "torch": "2.13.0", "onnxruntime": "1.32.0", "gpu": None,
                        "threads": 2, "load_average_start": [0.1, 0.2, 0.3]},
        "protocol": {"repeats": 5, "warmup": 2, "latency_requests": 200, "threads": 2, "quick": False,
                     "sweep_batches_used": [1, 8, 32], "sweep_seqs_used": [32, 128], "e2e_seq_for_batch_choice": 32,
                     "reference": {"name": "torch-fp32-padded", "pad_to": 128, "batch_size": 16}, "wall_s": 600},
        "data": {"source": "sst2", "eval_rows": 872, "mean_tokens": 25.2, "max_length": 128},
        "hardware": {"matmul_peak": {"gflops": 100.0, "before": 99.0, "after": 100.0, "method": "best of 5"},
                     "cpu_matmul_peaks": {"int8": {"gflops": 900.0}, "bf16": {"gflops": None, "error": "x"}}},
        "baseline_accuracy": 0.91,
        "variants": rows,
        "recommendation": {"variant": "ort-int8", "backend": "onnxruntime", "precision": "int8", "source": "baseline",
                           "device": "cpu", "path": "/models/model.int8.onnx", "model_dir": "/models",
                           "reason": "ort-int8: the fastest of 4 eligible cpu variants"},
        "recommendation_message": "ort-int8: the fastest of 4 eligible cpu variants",
        "warnings": [],
        "targets": [{"id": "e2e_speedup", "description": "e2e vs padded", "threshold": 8.0, "measured": 13.0,
                     "met": True, "variant": "ort-int8"},
                    {"id": "int8_speedup", "description": "int8 vs opt", "threshold": 1.2, "measured": 1.1,
                     "met": False},
                    {"id": "opt_efficiency", "description": "opt vs peak", "threshold": 0.7, "measured": None,
                     "met": None}],
        "training": {
            "baseline": {"status": "ok", "precision": "fp32", "device": "cpu", "train_time_s": 100.0,
                         "samples_per_s": 50.0, "peak_memory_mb": 1500, "peak_memory_kind": "process RSS",
                         "best_eval_accuracy": 0.91, "train_rows": 12000, "parameters": 22_700_000,
                         "loss_curve": [{"step": 20 * i, "loss": 0.7 / (1 + i)} for i in range(1, 12)],
                         "eval_curve": [{"step": 100 * i, "eval_accuracy": a} for i, a in
                                        enumerate((0.8, 0.91, 0.9), start=1)], "best_step": 200},
            "mixed_precision": {"status": "skipped", "reason": "CPU has no native bf16 math"},
            "pruned": {"status": "ok", "precision": "fp32", "device": "cpu", "train_time_s": 70.0,
                       "samples_per_s": 75.0, "peak_memory_mb": 1200, "best_eval_accuracy": 0.89,
                       "loss_curve": [{"step": 20 * i, "loss": 0.8 / (1 + i)} for i in range(1, 12)]},
        },
    }
    if with_pruning:
        res["pruning"] = {"method": "removal", "metric": "accuracy_drop", "rows": 872, "removed_layers": [3, 5],
                          "layers": [{"layer": i, "score": 0.01 * (i % 3), "accuracy": 0.9} for i in range(6)]}
    return res


def write(tmp_path: Path, results: dict) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    return path


# ----------------------------------------------------------------------------- rendering
def test_report_renders_every_section_from_results_json(tmp_path):
    out = report.render_report(write(tmp_path, sample_results()))
    assert out == tmp_path / "performance_report.html"
    html = out.read_text()
    for section in ("headline", "table", "throughput", "latency", "heatmap", "pareto", "radar", "training",
                    "pruning", "environment", "method"):
        assert f'<section id="{section}">' in html
    figures = re.findall(r'<figure class="plot" id="(fig-[a-z]+)">\s*<svg', html)
    assert figures == ["fig-throughput", "fig-latency", "fig-heatmap", "fig-pareto", "fig-radar", "fig-loss",
                       "fig-pruning"]
    # headline: recommended variant, its speedup, accuracy delta, size reduction
    assert "ort-int8" in html and "13.0×" in html and "-0.50 pts" in html and "3.9×" in html
    # skipped/rejected/failed rows appear with their (escaped) reasons
    assert "needs an NVIDIA GPU with CUDA" in html and "cannot open: boom" in html
    assert "exceeds the budget &lt;&amp;&gt;" in html
    assert "CPU has no native bf16 math" in html
    assert "Normalisation:" in html and "missed" in html and "not measured" in html
    assert "<li>ort-opt: a fresh process&#39;s first pass &lt;slow&gt;</li>" in html   # first_use.note, escaped
    assert re.search(r"CPU matmul peak per compute type</dt><dd>bf16 not measured, int8 900\.0\s+GFLOP/s", html)
    # self-contained: no scripts, no external resources
    assert "<script" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)
    # unique SVG ids across the inline figures (clip paths would otherwise collide)
    ids = re.findall(r'<clipPath id="([^"]+)"', html)
    assert len(ids) == len(set(ids)) > 0


def test_report_without_measurements_or_recommendation(tmp_path):
    res = sample_results(with_pruning=False)
    for r in res["variants"]:
        r["status"], r["reason"] = "skipped", r.get("reason") or "not on this machine"
    res["recommendation"] = None
    res["recommendation_message"] = "no variant is eligible for --target cpu: no variant could be measured"
    res["training"] = {}
    res["warnings"] = ["the machine was busy"]
    res["protocol"]["quick"] = True
    html = report.render_html(res)
    assert "No recommendation." in html and "no variant could be measured" in html
    assert "No variant was measured." in html and "Quick protocol." in html and "the machine was busy" in html
    assert '<section id="pruning">' not in html and "<svg" not in html


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(PipelineError, match="python compare.py"):
        report.render_report(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PipelineError, match="not valid JSON"):
        report.render_report(bad)
    bad.write_text("[]")
    with pytest.raises(PipelineError, match="not a compare.py results file"):
        report.render_report(bad)


def test_radar_normalisation():
    scores = dict(plots.radar_scores(sample_results()))
    assert scores["ort-int8"]["throughput"] == pytest.approx(1.0)
    assert scores["ort-opt"]["throughput"] == pytest.approx(400 / 520)
    assert scores["ort-int8"]["latency"] == pytest.approx(1.0)  # lowest p50 -> 1
    assert scores["torch-fp32"]["latency"] == pytest.approx(3.0 / 12.0)
    assert scores["ort-int4"]["size"] == pytest.approx(1.0)
    assert scores["ort-int8"]["memory"] == pytest.approx(1.0)
    assert scores["ort-int4"]["memory"] == 0.0  # missing metric scores 0
    assert scores["torch-fp32"]["accuracy"] == pytest.approx(1.0)
    assert scores["ort-int8"]["accuracy"] == pytest.approx(0.9)  # 0.5 points below the best, 5-point span
    assert scores["ort-int4"]["accuracy"] == 0.0  # 5 points below: floor


def test_pruning_points_for_other_shapes():
    assert plots.pruning_points([{"layers_removed": 2, "accuracy": 0.8}, {"layers_removed": 1, "accuracy": 0.9}]) \
        == ("layers_removed", "accuracy", [(1.0, 0.9), (2.0, 0.8)])
    assert plots.pruning_points({"steps": [{"k": 1, "eval_accuracy": 0.9}]}) == ("k", "eval_accuracy", [(1.0, 0.9)])
    assert plots.pruning_points({"note": "nothing"}) is None
    res = sample_results()
    res["pruning"] = {"free": "text"}
    html = report.render_html(res)
    assert "no plottable layer/accuracy records" in html and "&#34;free&#34;" in html


# ----------------------------------------------------------------------------- headless Chromium
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--remote-debugging-pipe"]


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is required for the report test: apt-get install -y chromium")


class DevTools:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3: commands
    to the browser, fd 4: its replies and events; NUL-separated JSON). No websocket library."""

    def __init__(self, binary: str, user_data_dir: str):
        to_browser_r, self._w = os.pipe()
        self._r, from_browser_w = os.pipe()

        def child_fds():
            a, b = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
                                     preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf, self._id, self.events = b"", 0, []

    def _read(self, deadline):
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from Chromium")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise EOFError("Chromium closed the DevTools pipe")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method, params=None, session=None, timeout=60):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, method, timeout=60):
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._read(deadline))

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, EOFError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


FIGURE_CHECK = """(() => Array.from(document.querySelectorAll('figure.plot')).map(f => {
  const svg = f.querySelector('svg');
  const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  return {id: f.id, width: box.width, height: box.height,
          marks: svg ? svg.querySelectorAll('path, rect, use, text').length : 0,
          visible: svg ? getComputedStyle(svg).display !== 'none' && getComputedStyle(svg).visibility !== 'hidden' : false};
}))()"""


def test_report_opens_in_headless_chromium(tmp_path):
    binary = chromium_binary()
    html_path = report.render_report(write(tmp_path, sample_results()))
    user_data = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    browser = DevTools(binary, user_data)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})
        session = browser.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})["sessionId"]
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            browser.send(domain, session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
        browser.send("Page.navigate", {"url": html_path.as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        figures = browser.send("Runtime.evaluate", {"expression": FIGURE_CHECK, "returnByValue": True},
                               session=session)["result"]["value"]
        height = browser.send("Runtime.evaluate", {"expression": "document.documentElement.scrollHeight",
                                                   "returnByValue": True}, session=session)["result"]["value"]
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": 1280, "height": int(height), "deviceScaleFactor": 1, "mobile": False}, session=session)
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        title = browser.send("Runtime.evaluate", {"expression": "document.title", "returnByValue": True},
                             session=session)["result"]["value"]
    finally:
        browser.close()

    problems = []
    for e in browser.events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            problems.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
            problems.append(f"console.{params['type']}: {params.get('args')}")
        elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
            problems.append(f"log {params['entry']['level']}: {params['entry'].get('text')}")
    assert problems == [], problems
    assert title == "bertopt performance report"
    assert [f["id"] for f in figures] == ["fig-throughput", "fig-latency", "fig-heatmap", "fig-pareto", "fig-radar",
                                          "fig-loss", "fig-pruning"]
    for f in figures:
        assert f["visible"] and f["width"] > 200 and f["height"] > 100 and f["marks"] > 10, f
    png = base64.b64decode(shot["data"])
    screenshot = tmp_path / "performance_report.png"
    screenshot.write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, shot_height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width == 1280 and shot_height >= height > 2000


def test_fusion_table_says_which_wins_where():
    res = sample_results()
    plain = json.loads(json.dumps([r for r in res["variants"] if r["name"] == "ort-opt"][0]))
    plain["name"] = "ort-fp32"
    for c in plain["sweep"]:  # the fused graph loses at batch 1, wins at larger batches
        c["samples_per_s"]["median"] *= 1.25 if c["batch"] == 1 else 0.8
    res["variants"].append(plain)
    table = report.fusion_table(res)
    assert table["batches"] == [1, 8, 32] and table["seqs"] == [32, 128]
    assert table["grid"][0][0] == pytest.approx(0.8) and table["grid"][1][2] == pytest.approx(1.25)
    html = report.render_html(res)
    assert "Graph fusion: which wins where" in html and "0.80×" in html and "1.25×" in html
    assert report.fusion_table(sample_results()) is None  # no ort-fp32 sweep: no table


def test_report_shows_the_serving_load_test_when_present(tmp_path):
    """reports/loadtest.json (python -m bertopt.aws.loadtest --compare) becomes its own section."""
    path = write(tmp_path, sample_results())
    assert '<section id="serving">' not in report.render_report(path).read_text()
    (tmp_path / report.LOADTEST_FILE).write_text("{not json")  # unreadable: the report still renders
    assert '<section id="serving">' not in report.render_report(path).read_text()

    def mode(rps, p99):
        best = {"offered_rps": rps, "achieved_rps": rps, "p50_ms": 9.0, "p99_ms": p99, "errors": 0}
        return {"requests_per_s_at_target": rps, "best": best, "steps": [best], "other_cpu_share": 0.02,
                "cpu_ms_per_request": {"server": 2000 / rps, "load_generator": 0.25}}

    batching = mode(520.0, 41.0)
    batching["at_2x_per_request"] = {"offered_rps": 420.0, "achieved_rps": 419.5, "p99_ms": 30.5, "errors": 0}
    (tmp_path / report.LOADTEST_FILE).write_text(json.dumps({
        "schema": "bertopt.loadtest/2", "created": "2026-12-02T08:00:00+0000", "model_path": "model.int8.onnx",
        "machine": {"vcpus": 2}, "protocol": {"clients": 16, "seconds_per_step": 4, "p99_target_ms": 100,
                                             "pass": "0 errors"},
        "modes": {"per-request": mode(210.0, 88.0), "micro-batching": batching}, "speedup": 2.48,
        "pricing": {"instance_type": "ml.m5.large", "note": "measured here", "source": "pinned 2025-10"},
        "cost_per_million": {"per-request": 0.178, "micro-batching": 0.072},
        "model_only": {"per_request": {"batch": 1, "concurrent_runs": 2, "threads_per_run": 1, "texts_per_s": 1935.0},
                       "micro_batching": {"batch": 32, "concurrent_runs": 2, "threads_per_run": 1, "texts_per_s": 3223.0},
                       "ratio": 1.67},
        "handler_only": {"per_request": {"callers": 4, "requests_per_s": 812.0, "cpu_ms_per_request": 2.4},
                         "micro_batching": {"callers": 16, "requests_per_s": 1036.0, "cpu_ms_per_request": 1.7,
                                            "texts_per_model_run": 5.3}, "ratio": 1.28}}))
    html = report.render_report(path).read_text()
    section = html[html.index('<section id="serving">'):]
    section = section[:section.index("</section>")]
    assert "2.48× the requests/s" in section and "at p99 30.5 ms" in section and "pinned 2025-10" in section
    rows = re.findall(r"<tr><td class=\"l\">([a-z-]+)</td><td>([\d.]+)</td>", section)
    assert rows == [("per-request", "210.0"), ("micro-batching", "520.0")]
    assert "0.178" in section and "0.072" in section
    assert "2 concurrent runs of one text at 1 thread(s) each,\n1935 texts/s" in section
    assert "on batches of 32,\n3223 texts/s: batches gain 1.67× in the model itself" in section
    assert "most micro-batching can gain" not in section  # not a bound: served ratios passed it (1.48x vs 1.27x)
    assert "<td>9.52 + 0.25</td>" in section  # CPU ms per request: 2000 / 210 in the server
    assert "per request 4 callers,\n812 requests/s; micro-batching 16 callers,\n1036 requests/s (5.3 texts a model run):\n1.28×" in section


def test_training_curves_show_eval_accuracy_per_step():
    from bertopt.report import plots

    res = sample_results()
    with_eval = plots.loss_curves(res)
    assert "eval accuracy %" in with_eval and "training loss" in with_eval
    res["training"]["baseline"].pop("eval_curve")
    without = plots.loss_curves(res)
    assert "training loss" in without and "eval accuracy %" not in without
