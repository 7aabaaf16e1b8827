"""The HTML performance report: rendered with jinja2 from results.json ONLY, as one
self-contained file (inline CSS and inline SVG figures; no scripts, no external resources)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from .. import artifacts
from ..errors import PipelineError
from ..results import get as results_get

TEMPLATE = "template.html.j2"
LOADTEST_FILE = "loadtest.json"  # beside results.json: `python -m bertopt.aws.loadtest --compare` writes it


def _load(results_path: str | os.PathLike) -> dict:
    path = Path(results_path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"no results file {path} (run `python compare.py` first)") from None
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); re-run "
                            "`python compare.py --force`") from None
    if not isinstance(results, dict) or "variants" not in results:
        raise PipelineError(f"{path} is not a compare.py results file (no 'variants')")
    return results


def _missing(v) -> bool:
    import jinja2

    return v is None or isinstance(v, jinja2.Undefined) or (isinstance(v, float) and not math.isfinite(v))


def _num(v, spec=".1f", none="–"):
    if _missing(v):
        return none
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def _mb(v):
    return None if _missing(v) else v / 2**20


def headline(results: dict) -> Optional[dict]:
    """The numbers the top of the page shows about the recommended variant."""
    rec = results.get("recommendation")
    if not rec:
        return None
    rows = {r["name"]: r for r in results["variants"]}
    row = rows.get(rec["variant"])
    if row is None:
        return None
    base = rows.get("torch-fp32") or {}
    size_red = (base["size_bytes"] / row["size_bytes"]) if base.get("size_bytes") and row.get("size_bytes") else None
    lat = (row.get("latency") or {}).get("e2e_ms") or {}
    base_lat = (base.get("latency") or {}).get("e2e_ms") or {}
    return {
        "row": row, "rec": rec,
        "speedup_vs_padded": row.get("speedup_vs_padded"),
        "speedup_vs_fp32": row.get("speedup_vs_fp32"),
        "accuracy_delta_pts": None if row.get("accuracy_delta") is None else 100 * row["accuracy_delta"],
        "size_reduction": size_red,
        "size_mb": _mb(row.get("size_bytes")), "base_size_mb": _mb(base.get("size_bytes")),
        "p50_ms": lat.get("p50"), "base_p50_ms": base_lat.get("p50"),
        "samples_per_s": ((row.get("throughput") or {}).get("samples_per_s") or {}).get("median"),
    }


def fusion_table(results: dict, a: str = "ort-opt", b: str = "ort-fp32") -> Optional[dict]:
    """Per sweep cell, the throughput of ``a`` (graph-fused) over ``b`` (plain): which wins where."""
    rows = {r["name"]: r for r in results.get("variants", [])}
    ca = {(c["batch"], c["seq"]): c for c in (rows.get(a) or {}).get("sweep") or []}
    cb = {(c["batch"], c["seq"]): c for c in (rows.get(b) or {}).get("sweep") or []}
    cells = sorted(set(ca) & set(cb))
    if not cells:
        return None
    batches = sorted({k[0] for k in cells})
    seqs = sorted({k[1] for k in cells})
    ratio = {k: ca[k]["samples_per_s"]["median"] / cb[k]["samples_per_s"]["median"] for k in cells}
    return {"a": a, "b": b, "batches": batches, "seqs": seqs,
            "grid": [[ratio.get((bt, sq)) for bt in batches] for sq in seqs]}


def _load_loadtest(path: Path) -> Optional[dict]:
    """The serving load test's results, when present and readable (the report shows them)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and str(data.get("schema", "")).startswith("bertopt.loadtest/") else None


def build_context(results: dict, loadtest: Optional[dict] = None) -> dict:
    from . import plots, task_plots

    figures = {
        "confusion": task_plots.confusion_matrices(results),
        "throughput": plots.throughput_bars(results),
        "latency": plots.latency_vs_batch(results),
        "heatmap": plots.heatmaps(results),
        "pareto": plots.pareto(results),
        "radar": plots.radar(results),
        "loss": plots.loss_curves(results),
        "pruning": plots.pruning_sensitivity(results),
        "search": plots.compression_search(results),
    }
    from markupsafe import Markup

    figures = {k: (Markup(v) if v else None) for k, v in figures.items()}
    env_items = [(k, v) for k, v in (results.get("environment") or {}).items() if v not in (None, "", [])]
    return {
        "r": results,
        "figures": figures,
        "head": headline(results),
        "rows": results.get("variants", []),
        "training": results.get("training") or {},
        "env_items": env_items,
        "pruning_json": (json.dumps(results["pruning"], indent=1)[:4000]
                         if results.get("pruning") is not None else None),
        "radar_span_pts": 100 * plots.RADAR_ACCURACY_SPAN,
        "radar_max": plots.RADAR_MAX_VARIANTS,
        "fusion": fusion_table(results),
        "per_class": task_plots.per_class_rows(results),
        "metric": results_get(results, "task", "metric", default="accuracy"),
        "lt": loadtest,
    }


def render_html(results: dict, loadtest: Optional[dict] = None) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent)),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             undefined=jinja2.ChainableUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["mb"] = _mb
    env.filters["pct"] = lambda v, spec=".1f": _num(None if _missing(v) else 100 * v, spec)
    env.filters["get"] = lambda d, *keys: results_get(d, *keys)
    return env.get_template(TEMPLATE).render(**build_context(results, loadtest))


def render_report(results_path: str | os.PathLike, out_path: str | os.PathLike | None = None) -> Path:
    """Render ``performance_report.html`` (beside results.json unless ``out_path``) from the
    results file alone. Returns the written path."""
    results = _load(results_path)
    out = Path(out_path) if out_path else Path(results_path).with_name("performance_report.html")
    loadtest = _load_loadtest(Path(results_path).with_name(LOADTEST_FILE))
    artifacts.atomic_write_text(out, render_html(results, loadtest))
    return out
