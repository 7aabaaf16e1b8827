"""compare.py as a package, one module per job: ``config`` (protocols, CompareConfig, flags),
``discover`` (rows from the stage manifests via the variant registry), ``workloads`` (what is
timed), ``measure`` (the phases of one measurement), ``assemble`` (results.json from them), ``recommend``, ``targets``, ``outputs``
(CSV, summary, report) and ``stage`` (the lifecycle). The names below are the package's API."""
from .. import benchmarking as bm  # tests patch the protocol through it
from ..results import SCHEMA_VERSION as RESULTS_SCHEMA_VERSION
from .config import (BASELINE_ROW, FAST_PROTOCOL, FULL_PROTOCOL, PROTOCOLS, QUICK_PROTOCOL, REFERENCE,
                     TIE_TOLERANCE, CompareConfig, add_compare_args, build_compare)
from .discover import Variant, discover
from .assemble import busy_warnings
from .measure import measure
from .recommend import recommend, recommendation_entry, reevaluate
from .stage import run
from .targets import evaluate_targets
from .workloads import LatencyTask, classify_texts, single_request


__all__ = ["bm", "RESULTS_SCHEMA_VERSION", "BASELINE_ROW", "FAST_PROTOCOL", "FULL_PROTOCOL", "PROTOCOLS", "QUICK_PROTOCOL",
           "REFERENCE", "TIE_TOLERANCE", "CompareConfig", "add_compare_args", "build_compare", "Variant", "discover",
           "busy_warnings", "measure", "recommend", "recommendation_entry", "reevaluate", "run", "evaluate_targets",
           "LatencyTask", "classify_texts", "single_request"]
