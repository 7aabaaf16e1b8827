"""The hub probe (bertopt.hub): an unreachable Hugging Face Hub fails an uncached model or data set
at once, in one line, loads a cached model from the cache, and leaves a reachable hub alone. Every
"hub" here is 127.0.0.1: a closed port, or a local HTTP server."""
from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bertopt import data, hub
from bertopt.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"   # nothing listens there once the socket is closed


def run_offline(tmp_path, code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh process whose hub is a closed local port, with no offline switch set."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                            "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=closed_port_url(), HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def cache_as_hub_model(tmp_path, model_dir: str, repo: str) -> None:
    """``model_dir`` laid out as huggingface_hub's cache holds a downloaded ``repo``."""
    base = tmp_path / "hf-home" / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(model_dir, base / "snapshots" / commit)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


def test_an_uncached_model_fails_at_once_in_one_line_when_the_hub_is_unreachable(tmp_path):
    out = run_offline(tmp_path, "from bertopt.modeling import load_model\n"
                                "from bertopt.errors import ModelError\n"
                                "try:\n    load_model('someone/not-cached', num_labels=2)\n"
                                "except ModelError as e:\n    print('ERROR', e)\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ERROR --model someone/not-cached: not in the local Hugging Face cache, and "
                                 "the hub is unreachable (http://127.0.0.1:"), out.stdout
    assert len(out.stdout.strip().splitlines()) == 1
    assert "Retrying" not in out.stderr   # huggingface_hub's back-off (~50 s) never started


def test_a_cached_model_loads_from_the_cache_when_the_hub_is_unreachable(tmp_path, tiny_model_dir):
    cache_as_hub_model(tmp_path, tiny_model_dir, "someone/tiny-bert")
    out = run_offline(tmp_path, "from bertopt.modeling import load_model, load_tokenizer\n"
                                "import huggingface_hub.constants as c\n"
                                "m = load_model('someone/tiny-bert', num_labels=2)\n"
                                "t = load_tokenizer('someone/tiny-bert')\n"
                                "print(type(m).__name__, m.config.num_labels, len(t('a film')['input_ids']) > 2, "
                                "c.HF_HUB_OFFLINE)\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["BertForSequenceClassification", "2", "True", "True"]
    assert "Retrying" not in out.stderr


@pytest.fixture
def hub_online(monkeypatch):
    """The hub libraries as a process without an offline switch sees them (restored afterwards)."""
    import datasets
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    hub.unreachable.cache_clear()
    yield constants
    hub.unreachable.cache_clear()


class _Head(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_reachable_hub_stays_online(hub_online, monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Head)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(hub_online, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub.prepare() is None
        assert hub_online.HF_HUB_OFFLINE is False
    finally:
        server.shutdown()
        server.server_close()


def test_an_unreachable_hub_switches_the_libraries_offline(hub_online, monkeypatch):
    import datasets

    monkeypatch.setattr(hub_online, "ENDPOINT", closed_port_url())
    reason = hub.prepare()
    assert reason.startswith(hub_online.ENDPOINT + " did not answer (ConnectError")
    assert hub_online.HF_HUB_OFFLINE is True and datasets.config.HF_HUB_OFFLINE is True


def test_a_hub_data_set_fails_with_the_probes_reason_when_unreachable(hub_online, monkeypatch, tmp_path):
    import datasets

    url = closed_port_url()
    monkeypatch.setattr(hub_online, "ENDPOINT", url)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", url)   # datasets' own copy, read at import
    monkeypatch.delenv("BERTOPT_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)   # no data/imdb here
    with pytest.raises(DataError, match=r"^data set 'imdb' not found locally and the hub is unreachable "
                                        r"\(http://127\.0\.0\.1:\d+ did not answer \(ConnectError"):
        data.load_splits("imdb")


def test_an_offline_switch_is_the_reason_without_a_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.unreachable.cache_clear()
    try:
        assert hub.prepare() == "HF_HUB_OFFLINE is set"
    finally:
        hub.unreachable.cache_clear()
