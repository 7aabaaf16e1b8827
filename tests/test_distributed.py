"""Data-parallel fine-tuning under torchrun (bertopt.distributed).

The acceptance test launches ``torchrun --standalone --nproc-per-node 2`` (gloo on CPU) on the
tiny BERT and compares it with a single-process run of the same *global* batch:

* DDP: 2 ranks x ``--batch-size 8`` x ``--grad-accum-steps 1``
* single process: 1 x ``--batch-size 8`` x ``--grad-accum-steps 2``

Both build the same length-grouped batch list from the same seed; rank r gets batches r, r+2, ...,
so each DDP step averages the gradients of batches (2k, 2k+1) -- exactly what the single process
accumulates for its step k. With dropout off (the fixture model below) the two runs differ only by
float summation order: the logged losses must agree to 1e-5 (observed ~1e-8) and the final weights
to 1e-3 absolute (observed ~5e-5, while training moves them by ~0.1).

A worker script (written to tmp_path) wraps benchmark.py's real main() with spies that record,
per rank, the training batches, the evaluation rows, the manifest writes and the final weights.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bertopt import distributed
from bertopt.errors import ConfigError, PipelineError

ROOT = Path(__file__).resolve().parents[1]
JOB_LIMIT_S = 240  # a hung job fails the test instead of hanging it

WORKER = r'''
import json, os, sys
from pathlib import Path
sys.path.insert(0, os.environ["BERTOPT_ROOT"])
import torch
from bertopt import artifacts, data, distributed, training

rank = int(os.environ.get("RANK", "0"))
spy = Path(os.environ["SPY_DIR"])
record = {"rank": rank, "train_batches": [], "eval_rows": [], "manifest_writes": 0}

orig_iter = data.LengthGroupedBatchSampler.__iter__
def train_iter(self):  # a generator: records only the batches that are really consumed
    if not self.shuffle:
        yield from orig_iter(self)
        return
    batches = []
    record["train_batches"].append({"epoch": self.epoch, "batches": batches})
    for b in orig_iter(self):
        batches.append(b)
        yield b
data.LengthGroupedBatchSampler.__iter__ = train_iter

orig_eval_iter = distributed.ShardedEvalBatchSampler.__iter__
def eval_iter(self):
    rows = []
    record["eval_rows"].append(rows)
    for b in orig_eval_iter(self):
        rows.extend(b)
        yield b
distributed.ShardedEvalBatchSampler.__iter__ = eval_iter

orig_write = artifacts.write_manifest
def write_manifest(*a, **k):
    record["manifest_writes"] += 1
    return orig_write(*a, **k)
artifacts.write_manifest = write_manifest

orig_train = training.train
def train(model, *a, **k):
    result = orig_train(model, *a, **k)
    plain = distributed.unwrap(model)
    torch.save({n: t.detach().cpu() for n, t in plain.state_dict().items()}, spy / f"weights.rank{rank}.pt")
    return result
training.train = train

import benchmark
try:
    code = benchmark.main(sys.argv[1:])
finally:
    (spy / f"rank{rank}.json").write_text(json.dumps(record))
sys.exit(code)
'''


def _clean_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        distributed.ENV_FAIL_RANK, distributed.ENV_FAIL_MODE, distributed.ENV_TIMEOUT)}
    env.update({"BERTOPT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """Run a job in its own process group; kill that group if it outlives JOB_LIMIT_S."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=JOB_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"job did not end within {JOB_LIMIT_S}s (hung ranks):\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _torchrun(worker: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(worker), *args]


@pytest.fixture(scope="module")
def nodrop_model_dir(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny BERT with dropout off, so a DDP rank and the single process see the same math."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny_bert_nodrop")
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir, hidden_dropout_prob=0.0,
                                                          attention_probs_dropout_prob=0.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


@pytest.fixture()
def worker(tmp_path) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


def _args(model: str, data: str, out: Path, **over) -> list[str]:
    values = {"model": model, "dataset": data, "output-dir": str(out), "epochs": 2, "max-length": 64,
              "lr": 1e-2, "warmup-ratio": 0, "seed": 0, "device": "cpu", "log-every": 5,
              "batch-size": 8, "eval-batch-size": 16, "grad-accum-steps": 1}
    values.update({k.replace("_", "-"): v for k, v in over.items()})
    return [a for k, v in values.items() for a in (f"--{k}", str(v))]


# ----------------------------------------------------------------------------- acceptance
def test_two_gloo_ranks_match_single_process_with_same_global_batch(tmp_path, worker, nodrop_model_dir,
                                                                    tiny_data_dir):
    import numpy as np
    import torch

    spy_s, spy_d = tmp_path / "spy_single", tmp_path / "spy_ddp"
    spy_s.mkdir()
    spy_d.mkdir()
    out_s, out_d = tmp_path / "single", tmp_path / "ddp"
    single = _run([sys.executable, str(worker), *_args(nodrop_model_dir, tiny_data_dir, out_s, grad_accum_steps=2)],
                  tmp_path, _clean_env({"SPY_DIR": str(spy_s)}))
    assert single.returncode == 0, single.stdout[-4000:]
    ddp = _run(_torchrun(worker, _args(nodrop_model_dir, tiny_data_dir, out_d)), tmp_path,
               _clean_env({"SPY_DIR": str(spy_d)}))
    assert ddp.returncode == 0, ddp.stdout[-4000:]

    rec_s = json.loads((spy_s / "rank0.json").read_text())
    r0, r1 = (json.loads((spy_d / f"rank{r}.json").read_text()) for r in (0, 1))

    # both ranks see disjoint data; together exactly the single process's batches, same composition
    for rec in (r0, r1, rec_s):
        assert [t["epoch"] for t in rec["train_batches"]] == [0, 1]
    for epoch in range(2):
        b0, b1 = r0["train_batches"][epoch]["batches"], r1["train_batches"][epoch]["batches"]
        bs = rec_s["train_batches"][epoch]["batches"]
        rows0, rows1 = {i for b in b0 for i in b}, {i for b in b1 for i in b}
        assert rows0 and rows1 and not rows0 & rows1
        assert rows0 | rows1 == set(range(400))  # 50 batches of 8: nothing dropped
        assert b0 == bs[0::2] and b1 == bs[1::2]
    # evaluation is sharded with nothing dropped: 100 rows = 6 batches of 16 + one of 4; rank 0 gets
    # batches 0, 2, 4, 6 (52 rows, the 4-row remainder included), rank 1 batches 1, 3, 5 (48 rows)
    assert len(r0["eval_rows"]) == len(r1["eval_rows"]) == 2  # one evaluation per epoch
    for ev0, ev1 in zip(r0["eval_rows"], r1["eval_rows"]):
        assert len(ev0) == 52 and len(ev1) == 48 and not set(ev0) & set(ev1)
        assert set(ev0) | set(ev1) == set(range(100))

    # final weights: identical on both ranks, equal to the single process up to float error
    w0, w1, ws = (torch.load(p, weights_only=True) for p in
                  (spy_d / "weights.rank0.pt", spy_d / "weights.rank1.pt", spy_s / "weights.rank0.pt"))
    assert w0.keys() == w1.keys() == ws.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    diff = max((w0[k] - ws[k]).abs().max().item() for k in w0)
    from safetensors.torch import load_file

    init = load_file(str(Path(nodrop_model_dir) / "model.safetensors"))
    moved = max((ws[k] - init[k]).abs().max().item() for k in init if k in ws)
    assert moved > 1e-2  # training really changed the weights
    assert diff < 1e-3, f"DDP weights differ from the single process by {diff}"

    # rank 0 alone writes the manifest, and it records the data-parallel set-up
    assert r0["manifest_writes"] == 1 and r1["manifest_writes"] == 0
    manifest = json.loads((out_d / "baseline" / "manifest.json").read_text())
    m = manifest["metrics"]
    assert manifest["status"] == "ok"
    assert (m["world_size"], m["distributed_backend"], m["per_device_batch_size"], m["global_batch_size"]) == \
        (2, "gloo", 8, 16)
    assert (out_d / "baseline" / "model.safetensors").is_file()
    ms = json.loads((out_s / "baseline" / "manifest.json").read_text())["metrics"]
    assert (ms["world_size"], ms["distributed_backend"], ms["global_batch_size"]) == (1, None, 16)

    # the loss matches the single-process run with the same global batch
    assert m["optimizer_steps"] == ms["optimizer_steps"] == 50
    assert m["train_samples"] == ms["train_samples"] == 800
    assert [p["step"] for p in m["loss_curve"]] == [p["step"] for p in ms["loss_curve"]]
    np.testing.assert_allclose([p["loss"] for p in m["loss_curve"]], [p["loss"] for p in ms["loss_curve"]],
                               rtol=0, atol=1e-5)
    for e_d, e_s in zip(m["epochs"], ms["epochs"]):
        assert e_d["eval_accuracy"] == e_s["eval_accuracy"]
        assert e_d["eval_loss"] == pytest.approx(e_s["eval_loss"], abs=1e-5)
    assert "data parallel: 2 processes x batch 8 x grad-accum 1 = global batch 16 (gloo)" in ddp.stdout


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


AMP_WORKER = r'''
import json, os, sys
from pathlib import Path
sys.path.insert(0, os.environ["BERTOPT_ROOT"])
from bertopt import precision, training

rank = int(os.environ.get("RANK", "0"))
precision.cpu_flags = lambda: {"avx2", "avx512_bf16"}
# the probe disagrees between the ranks: rank 0 measures bf16 2x faster, rank 1 2x slower
precision.cpu_bf16_speedup = lambda: (0.02, 0.01) if rank == 0 else (0.01, 0.02)
seen = []
orig_train = training.train
def train(model, loader, eval_loader, cfg, device, plan, *a, **k):
    seen.append(plan.name if plan.autocast_dtype is not None else "fp32")
    return orig_train(model, loader, eval_loader, cfg, device, plan, *a, **k)
training.train = train
import mixed_precision
code = mixed_precision.main(sys.argv[1:])
Path(os.environ["SPY_DIR"], f"rank{rank}.json").write_text(json.dumps(seen))
sys.exit(code)
'''


def test_amp_probe_verdict_is_rank_zeros_on_every_rank(tmp_path, nodrop_model_dir, tiny_data_dir):
    """amp on CPU times bf16 on each rank; rank 0's verdict must hold everywhere (no rank in fp32
    while another trains in bf16)."""
    worker, spy = tmp_path / "amp_worker.py", tmp_path / "spy"
    worker.write_text(AMP_WORKER)
    spy.mkdir()
    job = _run(_torchrun(worker, _args(nodrop_model_dir, tiny_data_dir, tmp_path / "out", epochs=1)), tmp_path,
               _clean_env({"SPY_DIR": str(spy)}))
    assert job.returncode == 0, job.stdout[-4000:]
    assert [json.loads((spy / f"rank{r}.json").read_text()) for r in (0, 1)] == [["bf16"], ["bf16"]]
    manifest = json.loads((tmp_path / "out" / "mixed_precision" / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["metrics"]["precision"] == "bf16"


@pytest.mark.skipif(_cuda_devices() < 2, reason="needs 2 CUDA devices (NCCL)")
def test_two_nccl_ranks_on_gpus(tmp_path, worker, nodrop_model_dir, tiny_data_dir):
    spy = tmp_path / "spy"
    spy.mkdir()
    out = tmp_path / "out"
    job = _run(_torchrun(worker, _args(nodrop_model_dir, tiny_data_dir, out, device="cuda", epochs=1)),
               tmp_path, _clean_env({"SPY_DIR": str(spy)}))
    assert job.returncode == 0, job.stdout[-4000:]
    m = json.loads((out / "baseline" / "manifest.json").read_text())["metrics"]
    assert (m["world_size"], m["distributed_backend"], m["device"]) == (2, "nccl", "cuda:0")
    import torch

    w0, w1 = (torch.load(spy / f"weights.rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_failing_rank_ends_the_whole_job(tmp_path, worker, nodrop_model_dir, tiny_data_dir, mode):
    """rank 1 fails after its first optimizer step: by raising (torchrun stops rank 0) or by
    hanging (rank 0's collective times out after BERTOPT_DIST_TIMEOUT, exits 1, torchrun stops
    rank 1). Either way the job ends non-zero, with the reason, and without a manifest."""
    spy = tmp_path / "spy"
    spy.mkdir()
    out = tmp_path / "out"
    env = _clean_env({"SPY_DIR": str(spy), distributed.ENV_FAIL_RANK: "1", distributed.ENV_FAIL_MODE: mode,
                      distributed.ENV_TIMEOUT: "5"})
    job = _run(_torchrun(worker, _args(nodrop_model_dir, tiny_data_dir, out, epochs=1, max_train_samples=96)),
               tmp_path, env)
    assert job.returncode != 0
    assert "worker.py FAILED" in job.stdout  # torchrun's failure summary
    if mode == "raise":
        assert "RuntimeError: injected failure on rank 1 (BERTOPT_FAIL_RANK=1)" in job.stdout
    else:
        assert "error: rank 0: timed out waiting for the other ranks" in job.stdout
        assert "BERTOPT_DIST_TIMEOUT" in job.stdout
    assert not (out / "baseline" / "manifest.json").exists()


# ----------------------------------------------------------------------------- units
@pytest.fixture()
def no_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", distributed.ENV_TIMEOUT, distributed.ENV_FAIL_RANK):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_needs_no_process_group(no_torchrun_env):
    import torch.distributed as dist

    ctx = distributed.setup("cpu")
    assert ctx is distributed.SINGLE and not ctx.enabled and ctx.is_main
    assert not dist.is_initialized()
    assert distributed.all_reduce(ctx, [1.5, 2]) == [1.5, 2.0]
    assert distributed.broadcast_object(ctx, {"a": 1}) == {"a": 1}
    model = object()
    assert distributed.wrap_model(model, ctx) is model


def test_single_process_manifest_records_world_size(trained_tiny):
    m = json.loads((trained_tiny / "baseline" / "manifest.json").read_text())["metrics"]
    assert m["world_size"] == 1 and m["distributed_backend"] is None
    assert m["global_batch_size"] == m["per_device_batch_size"] * m["grad_accum_steps"]


@pytest.mark.parametrize("env, text", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "inconsistent torchrun environment"),
    ({"WORLD_SIZE": "2", "RANK": "0", distributed.ENV_TIMEOUT: "-3"}, "must be a positive number of seconds"),
])
def test_bad_environment_is_a_config_error(no_torchrun_env, env, text):
    for k, v in env.items():
        no_torchrun_env.setenv(k, v)
    with pytest.raises(ConfigError, match=text):
        distributed.setup("cpu")


def test_device_index_is_rejected_under_torchrun(no_torchrun_env):
    no_torchrun_env.setenv("WORLD_SIZE", "2")
    no_torchrun_env.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="cuda:LOCAL_RANK"):
        distributed.setup("cuda:1")
    with pytest.raises(ConfigError, match="does not run under torchrun"):
        distributed.refuse_under_torchrun("onnx_tensorrt.py")


@pytest.mark.parametrize("rows, batch, world", [(100, 16, 2), (103, 10, 3), (5, 8, 2), (64, 8, 4)])
def test_sharded_eval_sampler_covers_every_row_once(rows, batch, world):
    import numpy as np

    lengths = np.random.default_rng(0).integers(3, 60, size=rows).tolist()
    shards = [list(distributed.ShardedEvalBatchSampler(lengths, batch, world, r)) for r in range(world)]
    seen = [i for shard in shards for b in shard for i in b]
    assert sorted(seen) == list(range(rows))  # disjoint and complete, remainder included
    for r, shard in enumerate(shards):
        assert len(distributed.ShardedEvalBatchSampler(lengths, batch, world, r)) == len(shard)
        assert all(len(b) <= batch for b in shard)


def test_guard_turns_peer_failures_into_one_clear_error(monkeypatch):
    monkeypatch.setattr(distributed, "_state", dict(distributed._state))
    ctx = distributed.DistContext(world_size=2, rank=0, backend="gloo", timeout_s=7)
    gloo_closed = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    with pytest.raises(distributed.DistributedError, match="rank 0: lost contact with the other ranks"):
        with distributed.guard(ctx):
            raise gloo_closed
    gloo_timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 7000ms for recv")
    with pytest.raises(PipelineError, match="timed out waiting for the other ranks after 7s"):
        with distributed.guard(ctx):
            raise gloo_timeout
    with pytest.raises(ValueError):  # this rank's own bug keeps its traceback
        with distributed.guard(ctx):
            raise ValueError("bug")
    assert distributed._state["failed"]  # teardown will not wait on the lost ranks


def test_injected_failure_hits_only_the_named_rank(monkeypatch):
    monkeypatch.setenv(distributed.ENV_FAIL_RANK, "1")
    monkeypatch.delenv(distributed.ENV_FAIL_MODE, raising=False)
    rank0 = distributed.DistContext(world_size=2, rank=0, backend="gloo")
    rank1 = distributed.DistContext(world_size=2, rank=1, backend="gloo")
    distributed.maybe_inject_failure(rank0, 1)
    distributed.maybe_inject_failure(rank1, 2)
    distributed.maybe_inject_failure(distributed.SINGLE, 1)
    with pytest.raises(RuntimeError, match="injected failure on rank 1"):
        distributed.maybe_inject_failure(rank1, 1)
