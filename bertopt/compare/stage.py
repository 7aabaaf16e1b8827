"""The compare stage: skip when current, measure, write results.json (via bertopt.results) and
the outputs, manifest last; --report-only re-renders (and re-recommends) from results.json."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .. import artifacts
from .. import results as results_mod
from ..cli import StageResult, print_config
from ..config import result_config
from .config import REFERENCE, CompareConfig
from .outputs import _render_outputs, summary_table
from .recommend import reevaluate

log = logging.getLogger("bertopt.compare")


def _fingerprint(cfg: CompareConfig, manifests_dirs: dict) -> str:
    rc = result_config(cfg)
    rc.pop("report_only", None)
    return artifacts.fingerprint({"stage": "compare", **rc}, manifests_dirs)


def _input_digests(output_dir: Path) -> dict:
    digests = {}
    for stage in artifacts.TRAINED_STAGES:
        digests[stage] = artifacts.manifest_digest(artifacts.stage_dir(output_dir, stage))
    for kind in ("onnx", "tensorrt"):
        root = artifacts.stage_dir(output_dir, kind)
        if root.is_dir():
            for d in sorted(p for p in root.iterdir() if not p.name.startswith(".")):  # skip work dirs, locks
                digests[f"{kind}/{d.name}"] = artifacts.manifest_digest(d)
    sens = artifacts.sensitivity_path(output_dir)
    if sens.is_file():
        import hashlib

        digests[f"pruned/{artifacts.SENSITIVITY_FILE}"] = hashlib.sha256(sens.read_bytes()).hexdigest()[:16]
    search = artifacts.search_path(output_dir)
    if search.is_file():
        import hashlib

        digests[f"pruned/{artifacts.SEARCH_FILE}"] = hashlib.sha256(search.read_bytes()).hexdigest()[:16]
    return digests


def _key_metric(results: dict) -> str:
    rec = results.get("recommendation")
    if not rec:
        return "no recommendation: " + (results.get("recommendation_message") or "")
    row = next(r for r in results["variants"] if r["name"] == rec["variant"])
    sp = row.get("speedup_vs_padded")
    return (f"recommended {rec['variant']}" + (f", {sp:.1f}x {REFERENCE} end to end" if sp else "")
            + (f", accuracy {100 * row['accuracy_delta']:+.2f} pts" if row.get("accuracy_delta") is not None else ""))


def _report_only(cfg: CompareConfig, reports: Path, start: float) -> StageResult:
    res_path = artifacts.results_path(reports)
    results = results_mod.load(res_path)
    if reevaluate(results, cfg):
        results_mod.save(res_path, results)
    _render_outputs(results, reports)
    return StageResult("compare", "ok", time.perf_counter() - start, _key_metric(results), str(reports))


def run(cfg: CompareConfig) -> StageResult:
    start = time.perf_counter()
    reports = Path(cfg.reports_dir)
    out = Path(cfg.output_dir)
    if cfg.report_only:
        return _report_only(cfg, reports, start)
    artifacts.require_manifest(artifacts.stage_dir(out, "baseline"), "baseline")
    run_ = artifacts.stage_run(reports, "compare", _fingerprint(cfg, _input_digests(out)), force=cfg.force,
                               remove=artifacts.REPORT_FILES, wait=cfg.wait)
    if run_.current and artifacts.results_path(reports).is_file():
        results = results_mod.load(artifacts.results_path(reports))
        _render_outputs(results, reports)  # cheap; picks up template changes
        log.info("compare is up to date (%s); --force re-measures", artifacts.manifest_path(reports))
        return StageResult("compare", "up-to-date", time.perf_counter() - start, _key_metric(results), str(reports))
    with run_:
        print_config("compare", cfg)
        import torch

        from .measure import measure

        threads_before = torch.get_num_threads()
        try:
            results = measure(cfg)
        finally:
            torch.set_num_threads(threads_before)
        # written beside reports/ and moved in by run_.finish: a killed compare leaves the previous report
        results_mod.save(artifacts.results_path(run_.directory), results)
        outputs = _render_outputs(results, run_.directory)
        if not cfg.quiet:
            print(summary_table(results))
        run_.finish(status="ok", config=cfg.to_dict(), inputs=_input_digests(out), outputs=outputs,
                    metrics={"recommendation": results.get("recommendation"), "targets": results.get("targets"),
                             "protocol": results["protocol"]["name"]})
    if results.get("recommendation") is None:
        log.warning("%s", results.get("recommendation_message"))
    return StageResult("compare", "ok", time.perf_counter() - start, _key_metric(results), str(reports))
