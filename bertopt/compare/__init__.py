"""compare.py as a package, one module per job: ``config`` (protocols, CompareConfig, flags),
``discover`` (rows from the stage manifests via the variant registry), ``workloads`` (what is
timed), ``measure`` (the phases of one measurement), ``recommend``, ``targets``, ``outputs``
(CSV, summary, report) and ``stage`` (the lifecycle). The names below are the package's API."""
from .. import benchmarking as bm  # noqa: F401  (tests patch the protocol through it)
from ..results import SCHEMA_VERSION as RESULTS_SCHEMA_VERSION  # noqa: F401
from .config import (BASELINE_ROW, FAST_PROTOCOL, FULL_PROTOCOL, PROTOCOLS, QUICK_PROTOCOL, REFERENCE,  # noqa: F401
                     TIE_TOLERANCE, CompareConfig, add_compare_args, build_compare)
from .discover import Variant, discover  # noqa: F401
from .measure import busy_warnings, measure  # noqa: F401
from .recommend import recommend, recommendation_entry, reevaluate  # noqa: F401
from .stage import run  # noqa: F401
from .targets import evaluate_targets  # noqa: F401
from .workloads import LatencyTask, classify_texts, single_request  # noqa: F401

