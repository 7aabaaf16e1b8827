"""Reaching the Hugging Face Hub. Owns one quick probe, made before this process's first hub
download: when the hub does not answer, the process's Hugging Face libraries switch to their
offline mode (``HF_HUB_OFFLINE``), so a cached model or data set still loads at once and a missing
one fails at once, instead of after ~50 s of huggingface_hub's retries (1+2+4+8+8 s of back-off
around each request). The probe goes through huggingface_hub's own HTTP client, so it sees the
same proxies, certificates and ``HF_ENDPOINT`` as the download would."""
from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Optional

from .errors import first_line

log = logging.getLogger("bertopt.hub")

PROBE_TIMEOUT_S = 10.0   # as huggingface_hub's own metadata timeout (HF_HUB_ETAG_TIMEOUT)
TRUE = {"1", "ON", "YES", "TRUE"}


def offline_by_env() -> bool:
    """The user asked for offline mode (the libraries then never touch the network)."""
    return any(os.environ.get(v, "").upper() in TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=None)
def unreachable() -> Optional[str]:
    """Why the hub cannot be reached (an offline switch, or the probe's error), or None when it answers.
    Any HTTP answer counts as reachable; asked once per process."""
    if offline_by_env():
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception as exc:  # httpx connect/timeout/proxy errors, OfflineModeIsEnabled
        return f"{constants.ENDPOINT} did not answer ({type(exc).__name__}: {first_line(exc, 160)})"
    return None


def prepare() -> Optional[str]:
    """Call before a hub download. When the hub is unreachable, switch huggingface_hub, transformers
    and datasets in this process to offline mode (cached files only) and return why; else None."""
    reason = unreachable()
    if reason is None or offline_by_env():
        return reason
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        log.info("Hugging Face Hub unreachable: %s; using the local cache only", reason)
    constants.HF_HUB_OFFLINE = True          # read at call time by huggingface_hub and transformers
    if "datasets" in sys.modules:            # datasets copies the flag at import
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    return reason
