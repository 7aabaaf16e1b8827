"""``saved_models/aws/deployment.json``: every AWS resource a deployment creates, written as it is
created (intent first, so a crash mid-deploy still leaves a complete list for aws_cleanup.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from .. import artifacts

FILE = "deployment.json"
# deletion order (aws_cleanup.py): the scalable target first (deregistered before its endpoint goes), the
# alarms, the endpoint, ..., the bucket last
ORDER = ("training-job", "transform-job", "scalable-target", "alarm", "endpoint", "endpoint-config", "model",
         "log-group", "log-streams", "ecr-repository", "s3-prefix", "s3-object", "s3-bucket")
LIVE_STATES = ("creating", "created", "failed")   # may still exist in AWS and be ours to delete
# deleted / gone (already absent) / not-created (the create call failed) / kept (bucket not empty) /
# skipped (exists but lacks the project tag: not ours any more)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Deployment:
    """A mutable view of deployment.json; every change is written atomically at once."""

    def __init__(self, path: Path, data: dict):
        self.path = Path(path)
        self.data = data

    @classmethod
    def path_in(cls, directory) -> Path:
        return Path(directory) / FILE

    @classmethod
    def load(cls, directory) -> Optional["Deployment"]:
        path = cls.path_in(directory)
        if not path.is_file():
            return None
        try:
            return cls(path, json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            from ..errors import PipelineError

            raise PipelineError(f"{path} is not readable JSON; fix or remove it (aws_cleanup.py --all finds "
                                "resources by tag without it)") from None

    @classmethod
    def create(cls, directory, **fields) -> "Deployment":
        data = {"schema_version": 1, "project": "bertopt", "created": _now(), "status": "starting",
                **fields, "resources": list(fields.get("resources", [])), "history": []}
        dep = cls(cls.path_in(directory), data)
        dep.save()
        return dep

    # ------------------------------------------------------------------------------------------
    def save(self) -> None:
        self.data["updated"] = _now()
        artifacts.atomic_write_json(self.path, self.data)

    @property
    def id(self) -> str:
        return self.data.get("deployment_id", "")

    @property
    def status(self) -> str:
        return self.data.get("status", "")

    @property
    def region(self) -> Optional[str]:
        return self.data.get("region")

    @property
    def resources(self) -> list:
        return self.data.setdefault("resources", [])

    def update(self, **fields) -> None:
        if "status" in fields and fields["status"] != self.status:
            self.data.setdefault("history", []).append({"time": _now(), "status": fields["status"]})
        self.data.update(fields)
        self.save()

    def add(self, type_: str, name: str, state: str = "creating", **extra) -> dict:
        """Record a resource (before the create call: state 'creating')."""
        entry = {"type": type_, "name": name, "state": state, "time": _now(), **extra}
        self.resources.append(entry)
        self.save()
        return entry

    def mark(self, entry: dict, state: str, **extra) -> None:
        entry.update(state=state, time=_now(), **extra)
        self.save()

    def live(self, types=None) -> list:
        return [e for e in self.resources if e.get("state") in LIVE_STATES and (types is None or e["type"] in types)]
