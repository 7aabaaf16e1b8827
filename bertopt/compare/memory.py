"""Phase 'memory': peak memory and load time of each row, one fresh process per row (the fast
protocol asks only the rows the recommendation can choose from)."""
from __future__ import annotations

import logging

from .. import benchmarking as bm
from .. import modeling
from ..logs import progress
from .assemble import _baseline_accuracy
from .recommend import recommend

log = logging.getLogger("bertopt.compare")


def probe_names(s, rows: list[dict]) -> list[str]:
    """The rows whose peak memory and load time a fresh process measures: all of them (full
    protocol), or only those the recommendation can choose from (fast protocol)."""
    if s.cfg.skip_memory:
        return []
    names = [r["name"] for r in rows if r["status"] == "ok"]
    if not s.proto.get("memory_only_eligible"):
        return names
    baseline = _baseline_accuracy(s, {r["name"]: r for r in rows})
    _, _, verdicts = recommend(rows, baseline, optimize_for=s.cfg.optimize_for, target=s.cfg.target,
                               accuracy_budget=s.cfg.accuracy_budget)
    eligible = {x["variant"] for x in verdicts if x["eligible"]}
    return [n for n in names if n in eligible]


def memory_probes(s, o, e2e, sweep, names: list[str]) -> dict:
    """Peak memory + load time, one fresh process per row in ``names``."""
    memory: dict[str, dict] = {}
    max_pos = modeling.max_positions(s.base_config)
    vocab = int(getattr(s.base_config, "vocab_size", 30522))
    for v in progress([v for v in o.live if v.name in names], desc="memory", unit="variant"):
        spec = {"factory": "bertopt.runtimes:open_from_dict", "predictor": v.spec(s.threads),
                "batch": e2e.batch[v.name][0], "seq": min(s.max_length, max_pos), "vocab_size": vocab,
                "with_token_type_ids": s.with_tt, "device": v.device, "runs": 2}
        memory[v.name] = bm.fresh_process_memory(spec, env={"OMP_NUM_THREADS": str(s.threads)})
        if "error" in memory[v.name]:
            log.warning("%s: memory probe failed: %s", v.name, memory[v.name]["error"])
    return memory
