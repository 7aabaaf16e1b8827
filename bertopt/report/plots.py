"""The report's figures: matplotlib Figures (no pyplot global state) saved as inline SVG.

Every function takes the results.json dict and returns an SVG string, or None when the results
hold nothing to plot (the template then says why instead of showing an empty figure)."""
from __future__ import annotations

import io
import math
import re
from typing import Optional

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ..results import get as _get  # noqa: E402

BACKEND_COLORS = {"torch": "#e07b39", "onnxruntime": "#3b75af", "tensorrt": "#519e3e"}
REC_COLOR = "#c0392b"
RADAR_ACCURACY_SPAN = 0.05  # accuracy axis: 1 at the best accuracy, 0 at 5 points below it
RADAR_MAX_VARIANTS = 8


def to_svg(fig: Figure, name: str) -> str:
    """Serialise a figure to an inline <svg> element. Each figure gets its own hash salt so the
    clip-path ids of several SVGs in one page never collide."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"bertopt-{name}"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML declaration and DOCTYPE
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    return svg.replace("<svg ", f'<svg role="img" aria-label="{name}" class="plot-svg" ', 1)


def measured(results: dict) -> list[dict]:
    return [r for r in results.get("variants", []) if r.get("status") == "ok"]


def _rec(results: dict) -> Optional[str]:
    return (results.get("recommendation") or {}).get("variant")


# ----------------------------------------------------------------------------- throughput bars
def throughput_bars(results: dict) -> Optional[str]:
    rows = [r for r in measured(results) if _get(r, "throughput", "samples_per_s", "median")]
    if not rows:
        return None
    rows.sort(key=lambda r: r["throughput"]["samples_per_s"]["median"])
    rec = _rec(results)
    fig = Figure(layout="constrained", figsize=(8, 0.45 * len(rows) + 1.4))
    ax = fig.add_subplot()
    med = [r["throughput"]["samples_per_s"]["median"] for r in rows]
    lo = [m - r["throughput"]["samples_per_s"]["min"] for m, r in zip(med, rows)]
    hi = [r["throughput"]["samples_per_s"]["max"] - m for m, r in zip(med, rows)]
    colors = [BACKEND_COLORS.get(r["backend"], "#777777") for r in rows]
    bars = ax.barh(range(len(rows)), med, xerr=[lo, hi], color=colors, capsize=3,
                   edgecolor=[REC_COLOR if r["name"] == rec else "none" for r in rows], linewidth=2)
    for bar, r, h in zip(bars, rows, hi):
        if r["name"] == "torch-fp32-padded":
            bar.set_hatch("//")
        sp = r.get("speedup_vs_padded")
        label = f"  {bar.get_width():.0f}/s" + (f" ({sp:.1f}×)" if sp else "")
        ax.text(bar.get_width() + h, bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r["name"] + ("  ★" if r["name"] == rec else "") for r in rows], fontsize=9)
    ax.set_xlabel("end-to-end eval-set throughput (samples/s, tokenization included); bars: median, whiskers: min–max")
    ax.set_xlim(0, max(m + h for m, h in zip(med, hi)) * 1.3)
    handles = [Patch(color=c, label=b) for b, c in BACKEND_COLORS.items()
               if any(r["backend"] == b for r in rows)]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return to_svg(fig, "throughput-bars")


# ----------------------------------------------------------------------------- sweep
def _sweep_rows(results):
    return [r for r in measured(results) if r.get("sweep")]


def _line_seq(rows) -> Optional[int]:
    seqs = sorted({c["seq"] for r in rows for c in r["sweep"]})
    if not seqs:
        return None
    under = [s for s in seqs if s <= 128]
    return under[-1] if under else seqs[0]


def latency_vs_batch(results: dict) -> Optional[str]:
    rows = _sweep_rows(results)
    seq = _line_seq(rows)
    if seq is None:
        return None
    fig = Figure(layout="constrained", figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    rec = _rec(results)
    for r in rows:
        cells = sorted((c for c in r["sweep"] if c["seq"] == seq), key=lambda c: c["batch"])
        if not cells:
            continue
        b = [c["batch"] for c in cells]
        kw = dict(marker="o", linewidth=2.5 if r["name"] == rec else 1.3, label=r["name"])
        ax1.plot(b, [c["p50_ms"] for c in cells], **kw)
        ax2.plot(b, [c["samples_per_s"]["median"] for c in cells], **kw)
    for ax, title in ((ax1, f"p50 latency per batch (ms), seq {seq}"), (ax2, f"throughput (samples/s), seq {seq}")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=7, loc="best")
    return to_svg(fig, "latency-vs-batch")


def heatmaps(results: dict) -> Optional[str]:
    rows = _sweep_rows(results)
    if not rows:
        return None
    batches = sorted({c["batch"] for r in rows for c in r["sweep"]})
    seqs = sorted({c["seq"] for r in rows for c in r["sweep"]})
    values = [c["samples_per_s"]["median"] for r in rows for c in r["sweep"]]
    vmin, vmax = max(min(values), 1e-6), max(max(values), 1e-6)
    from matplotlib.colors import LogNorm

    norm = LogNorm(vmin=vmin, vmax=vmax if vmax > vmin else vmin * 10)
    ncols = min(4, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig = Figure(layout="constrained", figsize=(3.1 * ncols + 1, 2.6 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= len(rows):
            ax.set_axis_off()
            continue
        r = rows[i]
        grid = [[math.nan] * len(batches) for _ in seqs]
        for c in r["sweep"]:
            grid[seqs.index(c["seq"])][batches.index(c["batch"])] = c["samples_per_s"]["median"]
        image = ax.imshow(grid, norm=norm, cmap="viridis", origin="lower", aspect="auto")
        for yi, row in enumerate(grid):
            for xi, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(xi, yi, f"{v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if norm(v) < 0.6 else "black")
        ax.set_xticks(range(len(batches)), batches, fontsize=8)
        ax.set_yticks(range(len(seqs)), seqs, fontsize=8)
        ax.set_title(r["name"], fontsize=9)
        ax.set_xlabel("batch", fontsize=8)
        ax.set_ylabel("sequence length", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, label="samples/s (model only, log scale)", shrink=0.8)
    return to_svg(fig, "sweep-heatmap")


# ----------------------------------------------------------------------------- pareto
def pareto(results: dict) -> Optional[str]:
    rows = [r for r in measured(results) if r.get("accuracy") is not None and _get(r, "latency", "e2e_ms", "p50")]
    if not rows:
        return None
    rec = _rec(results)
    fig = Figure(layout="constrained", figsize=(8, 4.8))
    ax = fig.add_subplot()
    pts = sorted(((r["latency"]["e2e_ms"]["p50"], 100 * r["accuracy"], r) for r in rows), key=lambda p: (p[0], -p[1]))
    frontier, best = [], -math.inf
    for x, y, r in pts:
        if y > best:
            frontier.append((x, y))
            best = y
    if len(frontier) > 1:
        ax.step([p[0] for p in frontier], [p[1] for p in frontier], where="post", color="#999999",
                linestyle=":", label="Pareto frontier")
    for i, (x, y, r) in enumerate(pts):
        is_rec = r["name"] == rec
        ax.scatter([x], [y], s=120 if is_rec else 40, marker="*" if is_rec else "o",
                   color=REC_COLOR if is_rec else BACKEND_COLORS.get(r["backend"], "#777777"), zorder=3)
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 5 + 9 * (i % 3)), fontsize=7,
                    arrowprops={"arrowstyle": "-", "color": "#bbbbbb", "linewidth": 0.5} if i % 3 else None)
    base, budget = results.get("baseline_accuracy"), results.get("config", {}).get("accuracy_budget")
    if base is not None and budget is not None:
        ax.axhline(100 * (base - budget), color=REC_COLOR, linestyle="--", linewidth=1,
                   label=f"accuracy budget ({100 * budget:.1f} pts below FP32 baseline)")
        ax.axhline(100 * base, color="#555555", linestyle="-", linewidth=0.8, label="FP32 baseline accuracy")
    ax.set_xscale("log")
    ax.set_xlabel("p50 latency of one request, batch 1, tokenization included (ms, log scale)")
    ax.set_ylabel("eval accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return to_svg(fig, "pareto")


# ----------------------------------------------------------------------------- radar
RADAR_AXES = (
    ("size", "file size", False),
    ("latency", "p50 latency", False),
    ("throughput", "throughput", True),
    ("memory", "peak memory", False),
    ("accuracy", "accuracy", True),
)


def radar_scores(results: dict) -> list[tuple[str, dict]]:
    """Per variant, each axis scored in [0, 1] with 1 = best among the measured variants:
    lower-is-better metrics as best/value, throughput as value/best, accuracy as
    1 - (best - value) / 5 points (clipped at 0). Missing metrics score 0."""
    rows = measured(results)
    raw = {}
    for r in rows:
        raw[r["name"]] = {
            "size": r.get("size_bytes"),
            "latency": _get(r, "latency", "e2e_ms", "p50"),
            "throughput": _get(r, "throughput", "samples_per_s", "median"),
            "memory": _get(r, "memory", "peak_rss_mb"),
            "accuracy": r.get("accuracy"),
        }
    best = {}
    for key, _, higher in RADAR_AXES:
        vals = [v[key] for v in raw.values() if v[key]]
        best[key] = (max(vals) if higher else min(vals)) if vals else None
    out = []
    for name, vals in raw.items():
        s = {}
        for key, _, higher in RADAR_AXES:
            v, b = vals[key], best[key]
            if not v or not b:
                s[key] = 0.0
            elif key == "accuracy":
                s[key] = max(0.0, 1 - (b - v) / RADAR_ACCURACY_SPAN)
            else:
                s[key] = v / b if higher else b / v
        out.append((name, s))
    return out


def radar(results: dict) -> Optional[str]:
    scores = radar_scores(results)
    if not scores:
        return None
    rec = _rec(results)
    # the recommended variant first, then the highest-throughput ones
    scores.sort(key=lambda ns: (ns[0] != rec, -ns[1]["throughput"]))
    scores = scores[:RADAR_MAX_VARIANTS]
    labels = [lab for _, lab, _ in RADAR_AXES]
    angles = [2 * math.pi * i / len(labels) for i in range(len(labels))]
    fig = Figure(layout="constrained", figsize=(7, 5.5))
    ax = fig.add_subplot(projection="polar")
    for name, s in scores:
        vals = [s[k] for k, _, _ in RADAR_AXES]
        lw = 2.8 if name == rec else 1.2
        ax.plot(angles + angles[:1], vals + vals[:1], linewidth=lw, label=name + (" ★" if name == rec else ""))
        ax.fill(angles + angles[:1], vals + vals[:1], alpha=0.06)
    ax.set_xticks(angles, labels, fontsize=9)
    ax.set_ylim(0, 1.05)
    ax.set_yticks([0.25, 0.5, 0.75, 1.0], ["0.25", "0.5", "0.75", "1"], fontsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.08, 1.05))
    return to_svg(fig, "radar")


# ----------------------------------------------------------------------------- training
def loss_curves(results: dict) -> Optional[str]:
    """Per trained stage: training loss per step and, where recorded, eval accuracy per step."""
    training = results.get("training") or {}
    curves = {k: v.get("loss_curve") for k, v in training.items() if v.get("loss_curve")}
    if not curves:
        return None
    evals = {k: v.get("eval_curve") for k, v in training.items() if v.get("eval_curve")}
    fig = Figure(layout="constrained", figsize=(11 if evals else 8, 3.8))
    ax = fig.add_subplot(1, 2 if evals else 1, 1)
    for stage, curve in curves.items():
        ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker="." if len(curve) < 30 else None,
                label=f"{stage} ({training[stage].get('precision') or '?'})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean over the logging window)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if evals:
        ax2 = fig.add_subplot(1, 2, 2)
        for stage, curve in evals.items():
            ax2.plot([p["step"] for p in curve], [100 * p["eval_accuracy"] for p in curve], marker=".",
                     label=stage)
            best = training[stage].get("best_step")
            hit = [p for p in curve if p["step"] == best]
            if hit:
                ax2.plot([best], [100 * hit[0]["eval_accuracy"]], marker="*", markersize=12, color="black")
        ax2.set_xlabel("optimizer step")
        ax2.set_ylabel("eval accuracy % (★ = the kept weights)")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    return to_svg(fig, "loss-curves")


# ----------------------------------------------------------------------------- pruning
_X_KEYS = ("layers_removed", "removed_layers", "pruned_layers", "num_pruned", "n_pruned", "layers_pruned",
           "prune_layers", "layers", "num_layers", "layer", "k")
_Y_KEYS = ("accuracy", "eval_accuracy", "dev_accuracy", "acc")


def _records(obj):
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        return obj
    if isinstance(obj, dict):
        for v in obj.values():
            found = _records(v)
            if found:
                return found
    return None


def pruning_points(pruning) -> Optional[tuple[str, str, list[tuple[float, float]]]]:
    """(x name, y name, points) from a sensitivity.json of unknown exact shape: the first list
    of records holding a layer-count key and an accuracy key."""
    recs = _records(pruning)
    if not recs:
        return None
    xk = next((k for k in _X_KEYS if all(isinstance(r.get(k), (int, float)) for r in recs)), None)
    yk = next((k for k in _Y_KEYS if all(isinstance(r.get(k), (int, float)) for r in recs)), None)
    if xk is None or yk is None:
        return None
    return xk, yk, sorted((float(r[xk]), float(r[yk])) for r in recs)


def pruning_sensitivity(results: dict) -> Optional[str]:
    """Per-layer sensitivity bars (prune.py's sensitivity.json: ``layers`` = [{layer, score, ...}],
    ``removed_layers``, ``metric``), removed layers in red; other shapes: a layer/accuracy line."""
    pruning = results.get("pruning")
    layers = pruning.get("layers") if isinstance(pruning, dict) else None
    if isinstance(layers, list) and layers and all(isinstance(l, dict) and isinstance(l.get("score"), (int, float))
                                                   and isinstance(l.get("layer"), int) for l in layers):
        removed = set(pruning.get("removed_layers") or [])
        fig = Figure(layout="constrained", figsize=(7, 3.6))
        ax = fig.add_subplot()
        xs = [l["layer"] for l in layers]
        ax.bar(xs, [l["score"] for l in layers], color=[REC_COLOR if x in removed else "#3b75af" for x in xs])
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("encoder layer (red = removed by greedy pruning)")
        metric = str(pruning.get("metric") or "score").replace("_", " ")
        ax.set_ylabel(f"{metric} when the layer is removed" if pruning.get("method") == "removal" else metric)
        ax.axhline(0, color="#555555", linewidth=0.8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"layer sensitivity ({pruning.get('method') or '?'}, {pruning.get('rows') or '?'} eval rows)",
                     fontsize=10)
        return to_svg(fig, "pruning-sensitivity")
    found = pruning_points(pruning)
    if not found:
        return None
    xk, yk, pts = found
    fig = Figure(layout="constrained", figsize=(7, 3.6))
    ax = fig.add_subplot()
    ys = [100 * y if y <= 1 else y for _, y in pts]
    ax.plot([x for x, _ in pts], ys, marker="o")
    ax.set_xlabel(xk.replace("_", " "))
    ax.set_ylabel(yk.replace("_", " ") + " (%)")
    ax.grid(alpha=0.3)
    return to_svg(fig, "pruning-sensitivity")


# ----------------------------------------------------------------------------- compression search
def compression_search(results: dict) -> Optional[str]:
    """Speed/metric of every shape prune.py --auto tried (search.json in results.json), with the
    unpruned model, the budget line and the Pareto frontier; the chosen shape is starred."""
    search = results.get("compression_search")
    tried = [t for t in (search or {}).get("tried") or []
             if isinstance(t.get("speedup"), (int, float)) and isinstance(t.get("metric"), (int, float))]
    if not tried:
        return None
    base = search.get("unpruned_search_metric")
    fig = Figure(layout="constrained", figsize=(8, 4.6))
    ax = fig.add_subplot()
    pts = sorted(((t["speedup"], 100 * t["metric"], t) for t in tried), key=lambda p: (-p[0], -p[1]))
    frontier, best = [], -math.inf
    for x, y, _ in pts:  # fastest first: a point is on the frontier when nothing faster scores higher
        if y > best:
            frontier.append((x, y))
            best = y
    if len(frontier) > 1:
        ax.step([p[0] for p in frontier], [p[1] for p in frontier], where="post", color="#999999", linestyle=":",
                label="Pareto frontier")
    for x, y, t in pts:
        chosen = t.get("shape") == search.get("chosen")
        ax.scatter([x], [y], s=160 if chosen else 50, marker="*" if chosen else "o", zorder=3,
                   color=REC_COLOR if chosen else ("#2e8b57" if t.get("within_budget") else "#7f7f7f"))
        ax.annotate(f"{t['shape']} ({t.get('parameters', 0) / 1e6:.1f}M)", (x, y), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)
    if isinstance(base, (int, float)):
        ax.scatter([1.0], [100 * base], marker="s", color="#3b75af", zorder=3, label="unpruned")
        budget = search.get("budget")
        if isinstance(budget, (int, float)):
            ax.axhline(100 * (base - budget), color=REC_COLOR, linestyle="--", linewidth=0.8,
                       label=f"budget ({100 * budget:.1f} pts below unpruned)")
    metric = str(search.get("metric") or "metric")
    ax.set_xlabel("forward speed-up over the unpruned model (one batch, the host that ran the search)")
    ax.set_ylabel(f"{metric} % on the search split")
    ax.set_title(f"compression search: {len(tried)} shape(s) fine-tuned, chosen {search.get('chosen') or 'none'}"
                 f" (green = within budget, grey = over)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_svg(fig, "compression-search")
