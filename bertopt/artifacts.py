"""The only module that knows the layout of saved_models/ and reports/ (every file name stages
hand each other; variant files are named in :mod:`bertopt.variants`), the manifest format, and
the stage lifecycle (:func:`stage_run`: fingerprint -> skip-if-current -> lock -> working dir -> log
-> manifest -> swap, through :mod:`bertopt.staging`).

A stage directory is complete only when it holds ``manifest.json``; the manifest is written
last and atomically (temp file + rename, with the umask's permissions) into a working directory
beside the output, which is then swapped into place: a stage killed half-way leaves the previous
complete output where it was, and a working directory that no downstream stage reads.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from .errors import MissingArtifact, PipelineError

MANIFEST = "manifest.json"
STAGE_LOG = "stage.log"
SCHEMA_VERSION = 1
SENSITIVITY_FILE = "sensitivity.json"   # prune.py's per-layer analysis, beside the pruned model
WIDTH_FILE = "width.json"               # prune.py's head / FFN-neuron importance and what it kept
SEARCH_FILE = "search.json"             # prune.py --auto: every shape the compression search tried
RESULTS_FILE = "results.json"           # compare.py's measurements (schema: bertopt.results)
RESULTS_CSV, SUMMARY_FILE, REPORT_FILE = "results.csv", "summary.md", "performance_report.html"
REPORT_FILES = (RESULTS_FILE, RESULTS_CSV, SUMMARY_FILE, REPORT_FILE)

# stage name -> (directory under the output dir, command that produces it)
STAGE_DIRS = {
    "baseline": ("baseline", "python benchmark.py"),
    "mixed_precision": ("mixed_precision", "python mixed_precision.py"),
    "pruned": ("pruned", "python prune.py --prune-layers 2"),
    "onnx": ("onnx", "python onnx_tensorrt.py"),
    "tensorrt": ("tensorrt", "python onnx_tensorrt.py"),
    "qat": ("qat", "python qat.py"),
    "aws": ("aws", "python aws_deploy.py"),
}
# the trained-model stages, in the order later stages consider them
TRAINED_STAGES = ("baseline", "mixed_precision", "pruned")


def stage_dir(output_dir: str | os.PathLike, stage: str) -> Path:
    try:
        name = STAGE_DIRS[stage][0]
    except KeyError:  # pragma: no cover - programming error
        raise ValueError(f"unknown stage {stage!r}") from None
    return Path(output_dir) / name


def producing_command(stage: str) -> str:
    return STAGE_DIRS[stage][1]


def sensitivity_path(output_dir: str | os.PathLike) -> Path:
    return stage_dir(output_dir, "pruned") / SENSITIVITY_FILE


def search_path(output_dir: str | os.PathLike) -> Path:
    return stage_dir(output_dir, "pruned") / SEARCH_FILE


def results_path(reports_dir: str | os.PathLike) -> Path:
    return Path(reports_dir) / RESULTS_FILE


def predictions_path(reports_dir: str | os.PathLike, input_path: str | os.PathLike) -> Path:
    """predict.py's default output: reports/predictions/<input name>.csv."""
    name = Path(str(input_path).rstrip("/")).name.split(".")[0] or "input"
    return Path(reports_dir) / "predictions" / f"{name}.csv"


def manifest_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / MANIFEST


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of a stage directory, or None when the directory is incomplete."""
    path = manifest_path(directory)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def require_manifest(directory: str | os.PathLike, stage: str, ok_only: bool = True) -> dict:
    """The manifest of a finished input stage; MissingArtifact (naming the command) otherwise."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise MissingArtifact(manifest_path(directory), producing_command(stage))
    if ok_only and manifest.get("status") != "ok":
        raise MissingArtifact(
            f"{directory} (status {manifest.get('status')}: {manifest.get('reason', '')})",
            producing_command(stage),
        )
    return manifest


def manifest_digest(directory: str | os.PathLike) -> str | None:
    path = manifest_path(directory)
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a report must be shareable like any file
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; set straight back
    os.umask(mask)
    return mask


def save_model(model, tokenizer, directory: str | os.PathLike) -> None:
    """``save_pretrained`` of a model and its tokenizer, with every file's mode as the umask gives
    any other artifact: the safetensors writer renames a ``mkstemp`` file into place, which leaves
    ``model.safetensors`` at 0600, and a model copied into a container or read by another user then
    fails to load."""
    directory = Path(directory)
    before = {p: p.stat().st_mtime_ns for p in directory.iterdir()} if directory.is_dir() else {}
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    share_new_files(directory, before)


def share_new_files(directory: str | os.PathLike, before: dict | None = None) -> None:
    """Give files written since ``before`` (path -> mtime) that only their owner can read the mode
    the umask gives new files (0644 under the usual 022)."""
    mode = 0o666 & ~_umask()
    for p in Path(directory).iterdir():
        if p.is_file() and (before or {}).get(p) != p.stat().st_mtime_ns and p.stat().st_mode & 0o077 == 0:
            os.chmod(p, mode)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def fingerprint(config: dict, inputs: dict | None = None) -> str:
    """A stable hash of what determines a stage's output (config + input manifests)."""
    blob = json.dumps({"config": config, "inputs": inputs or {}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_current(directory: str | os.PathLike, fp: str) -> dict | None:
    """The existing manifest when it was produced from the same fingerprint, else None."""
    manifest = read_manifest(directory)
    if manifest and manifest.get("fingerprint") == fp and manifest.get("status") in ("ok", "skipped"):
        return manifest
    return None


def begin_stage(directory: str | os.PathLike) -> Path:
    """Prepare a stage directory for a (re-)run: drop the old manifest first, so that files
    half-overwritten by this run are never vouched for by a stale manifest."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        manifest_path(directory).unlink(missing_ok=True)
        probe = directory / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise PipelineError(f"cannot write to output directory {directory}: {exc.strerror or exc}"
                            " (choose another --output-dir)") from None
    return directory


def clear_dir(directory: str | os.PathLike, keep: Iterable[str] = (STAGE_LOG,)) -> None:
    """Remove everything in a stage directory except ``keep`` (used before a forced re-run)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    from importlib import metadata

    for dist in {"onnxruntime": ("onnxruntime", "onnxruntime-gpu")}.get(module, (module,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def environment() -> dict:
    """Versions and hardware facts recorded in every manifest (no optional import is forced)."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime"),
        "tensorrt": _version("tensorrt"),
        "gpu": None,
        "gpu_compute_capability": None,
        "cuda": None,
    }
    try:
        import torch

        env["torch_threads"] = torch.get_num_threads()
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_compute_capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
    except ImportError:  # pragma: no cover
        pass
    return env


def write_manifest(directory: str | os.PathLike, *, stage: str, status: str, config: dict,
                   fingerprint: str, inputs: dict | None = None, outputs: Iterable[str] = (),
                   metrics: dict | None = None, reason: str | None = None, **extra) -> dict:
    """Write the stage manifest last and atomically; returns it."""
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "status": status,
        "reason": reason,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_revision": git_revision(),
        "fingerprint": fingerprint,
        "config": config,
        "environment": environment(),
        "inputs": inputs or {},
        "outputs": sorted(outputs),
        "metrics": metrics or {},
    }
    manifest.update(extra)
    atomic_write_json(manifest_path(directory), manifest)
    return manifest


def list_files(directory: str | os.PathLike) -> list[str]:
    """Relative paths of every file under a directory (manifest and logs excluded)."""
    directory = Path(directory)
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name not in (MANIFEST, STAGE_LOG) and not p.name.startswith("."))


class StageRun:
    """One run of a stage over one directory: the lifecycle every stage shares.

    ``run = stage_run(dir, "onnx", fp, force=cfg.force, wait=cfg.wait)``; ``run.current`` is the
    existing manifest when it matches the fingerprint (the stage is up to date: return it).
    Otherwise ``with run:`` locks the output (a second run refuses, or waits with ``wait``), builds
    in a sibling working directory ``run.directory`` (bertopt.staging) that it logs into
    (``<work>/stage.log``, ``log_as``); ``run.finish(...)`` writes the manifest there last and swaps
    the directory into place (status "failed" leaves the previous output instead). ``remove`` names
    the only files this stage owns in a shared directory (compare's reports/): they are replaced
    one by one, the manifest last. A disk-full error becomes one DiskFull line (``need_bytes``
    sizes the up-front check and the message)."""

    def __init__(self, directory, stage: str, fp: str, *, force: bool = False, clear: bool = True,
                 remove: Iterable[str] = (), log_as: str | None = None, wait: bool = False,
                 need_bytes: int | None = None):
        from . import staging

        self.final, self.stage, self.fingerprint = Path(directory), stage, fp
        self.directory = self.final  # the working directory once entered, the final one after commit
        self.log_as, self.need_bytes = log_as or stage, need_bytes
        self.current = None if force else is_current(self.final, fp)
        self.manifest: dict | None = None
        self._logging = None
        self._replace = staging.Replacement(self.final, fp, self.log_as, wait=wait, owned=tuple(remove) or None,
                                            manifest=MANIFEST, carry=(STAGE_LOG,))

    def __enter__(self) -> "StageRun":
        from . import staging
        from .logs import stage_logging

        self.directory = self._replace.open()
        try:
            staging.check_free(self.directory, self.need_bytes, f"the {self.log_as} output", keeps=self.final)
            self._logging = stage_logging(self.log_as, self.directory)
            self._logging.__enter__()
        except BaseException:
            self._replace.close(failed=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        from . import staging

        try:
            suppressed = bool(self._logging.__exit__(exc_type, exc, tb))
        finally:
            self._replace.close(failed=exc is not None)
        if exc is not None and not suppressed and staging.is_disk_full(exc) and not isinstance(exc, PipelineError):
            with staging.disk_errors(self._replace.work, f"the {self.log_as} output", self.need_bytes, self.final):
                raise exc
        return suppressed

    def finish(self, *, status: str, config: dict, **kwargs) -> dict:
        """Write the manifest last; the run is then swapped into place, except a "failed" one
        over a previous "ok" output (that stays; the failed manifest waits in the working dir)."""
        self.manifest = write_manifest(self.directory, stage=self.stage, status=status, config=config,
                                       fingerprint=self.fingerprint, **kwargs)
        previous = read_manifest(self.final) or {}
        if not self._replace.committed and (status != "failed" or previous.get("status") != "ok"):
            self.directory = self._replace.commit()
        return self.manifest


def stage_run(directory, stage: str, fp: str, **kwargs) -> StageRun:
    return StageRun(directory, stage, fp, **kwargs)
