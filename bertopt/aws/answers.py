"""What a client reads when an endpoint refuses a request: the two answer shapes.

The local endpoint (``aws_deploy.py --local``) answers a refused request with the handler's own
status (400, 406, 413, 415) and ``{"error": message, "status": code}``. On SageMaker, the Hugging
Face inference container's Multi Model Server turns every handler exception into **400** with
``{"code": 400, "type": "...", "message": message}`` (and the runtime API raises ``ModelError`` with
that body as ``OriginalMessage``). :data:`SAGEMAKER_STATUS` is that mapping; :func:`refusal` reads
either shape, so the deploy's smoke test and the load test report the reason whichever answered.
"""
from __future__ import annotations

import json
from typing import Optional

# the local server's status -> what the same refusal comes back as from the SageMaker HF container
SAGEMAKER_STATUS = {400: 400, 406: 400, 413: 400, 415: 400}


def refusal(body, status: Optional[int] = None) -> Optional[dict]:
    """``{"status", "message", "shape"}`` of an error answer in the local (``{"error", "status"}``)
    or MMS (``{"code", "type", "message"}``) shape; None when ``body`` is neither."""
    try:
        data = json.loads(body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else body)
    except (TypeError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if "error" in data:
        return {"status": data.get("status", status), "message": str(data["error"]), "shape": "local"}
    if "message" in data and ("code" in data or "type" in data):
        return {"status": data.get("code", status), "message": str(data["message"]), "shape": "sagemaker",
                "type": data.get("type")}
    return None


def describe(status: Optional[int], body) -> str:
    """One line for a refused request: 'HTTP 413: 9 texts in one request; ...' in either shape."""
    found = refusal(body, status)
    if found is None:
        text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else str(body)
        return f"HTTP {status}: {text[:200]}"
    return f"HTTP {found['status'] or status}: {found['message'][:300]}"
