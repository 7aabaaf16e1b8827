"""The real packaged MiniLM fine-tuned on a slice of GLUE SST-2 (../shared/data/sst2)."""
import json

from bertopt.config import TrainConfig
from bertopt.train_stage import run_baseline
from conftest import SST2_DIR


def test_minilm_learns_sst2_slice(tmp_path, monkeypatch):
    monkeypatch.setenv("BERTOPT_DATA_DIR", str(SST2_DIR.parent))
    cfg = TrainConfig(dataset="sst2", data_dir=str(tmp_path / "none"), output_dir=str(tmp_path),
                      max_train_samples=512, max_eval_samples=200, epochs=2, batch_size=16, seed=0,
                      device="cpu", quiet=True)
    result = run_baseline(cfg)
    assert result.status == "ok"
    m = json.loads((tmp_path / "baseline" / "manifest.json").read_text())["metrics"]
    assert m["eval_rows"] == 200 and m["train_rows"] == 512
    assert m["best_eval_accuracy"] >= 0.70, m["epochs"]  # chance is ~0.5
