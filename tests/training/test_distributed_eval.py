"""Sharded evaluation under torchrun: coverage of the shards, and 2 gloo ranks on CPU giving
the one-process results (attack, evaluate, certify), and a failing rank stopping the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from histoshield.training.distributed import DistContext, batch_shard, shares

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # a hung rank must fail the test, not the CI job
TIMING = {"seconds", "images_per_second", "end_time"}  # wall clock: the only keys that differ


@pytest.mark.parametrize("n", [0, 1, 7, 20, 33, 64, 101])
@pytest.mark.parametrize("batch_size", [1, 3, 8, 32])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_batch_shard_covers_every_image_exactly_once(n, batch_size, world):
    parts = [batch_shard(n, batch_size, DistContext(rank=r, world=world)) for r in range(world)]
    seen = torch.cat(parts).tolist()
    assert sorted(seen) == list(range(n))  # every image, none twice
    assert [len(p) for p in parts] == shares(n, batch_size, world)
    for p in parts:  # whole batches: each rank's images split into the one-process batches
        for i in range(0, len(p), batch_size):
            chunk = p[i : i + batch_size].tolist()
            assert chunk[0] % batch_size == 0 and chunk == list(range(chunk[0], chunk[-1] + 1))


def test_batch_shard_rejects_a_zero_batch():
    from histoshield.errors import HistoshieldError

    with pytest.raises(HistoshieldError, match="batch size"):
        batch_shard(4, 0, DistContext(rank=0, world=2))


# ---- 2 gloo ranks, spawned by torchrun ---------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A seeded untrained smallcnn checkpoint beside a split of 40 synthetic 32 px tiles."""
    from histoshield import data, models

    root = tmp_path_factory.mktemp("dist")
    iset = data.make_split(
        data.synthesize(root / "syn", n=40, size=32, seed=0), by="image", val=0.2, test=0.5
    )
    data.write_split(root / "split.csv", iset)
    torch.manual_seed(0)
    models.save_checkpoint(
        root / "best.pt", models.create("smallcnn", classes=iset.classes, image_size=32)
    )
    return root / "best.pt"


def _env() -> dict[str, str]:
    """CPU and gloo (two ranks on one GPU would fail in NCCL), one thread per process in both
    runs (another thread count sums in another order and changes last bits)."""
    return {
        **os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1",
        "HISTOSHIELD_DIST_TIMEOUT": "60", "MPLBACKEND": "Agg", "CUDA_VISIBLE_DEVICES": "",
    }  # fmt: skip


def _histoshield(args: list[str], ranks: int) -> subprocess.CompletedProcess:
    head = [sys.executable, "-m", "histoshield"]
    if ranks > 1:
        # `--`: torchrun's own parser would otherwise take e.g. certify's --n for --nnodes
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(ranks), "-m", "histoshield", "--"]  # fmt: skip
    return subprocess.run(
        head + args, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO
    )


def _drop(obj, keys):
    if isinstance(obj, dict):
        return {k: _drop(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [_drop(v, keys) for v in obj]
    return obj


@pytest.mark.slow
def test_attack_on_two_ranks_equals_one_process(ckpt, tmp_path):
    # batch 8 over 20 test images: 3 batches, so rank 0 gets 2 (one partial), rank 1 one
    args = ["attack", "-c", str(ckpt), "--attack", "pgd:steps=3", "--eps", "0,8/255",
            "--batch-size", "8", "--json", "--device", "cpu"]  # fmt: skip
    one = _histoshield([*args, "--out", str(tmp_path / "one")], 1)
    two = _histoshield([*args, "--out", str(tmp_path / "two")], 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert a["results"][1]["gradient_passes"] > 0
    # byte-identical rows, once the wall-clock fields are dropped
    assert json.dumps(_drop(a, TIMING)) == json.dumps(_drop(b, TIMING))
    env = json.loads((tmp_path / "two" / "env.json").read_text())
    assert env["world_size"] == 2 and env["rank_images"] == [12, 8]
    assert json.loads((tmp_path / "one" / "env.json").read_text())["rank_images"] == [20]


@pytest.mark.slow
def test_evaluate_and_certify_on_two_ranks_equal_one_process(ckpt, tmp_path):
    ev = ["evaluate", "-c", str(ckpt), "--json", "--subset", "all", "--device", "cpu"]
    one, two = _histoshield(ev, 1), _histoshield(ev, 2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert one.stdout == two.stdout  # byte for byte: no wall-clock fields
    assert json.loads(two.stdout)["n"] == 40
    cert = ["certify", "-c", str(ckpt), "--sigma", "0.25", "--n0", "5", "--n", "20",
            "--limit", "5", "--json", "--device", "cpu"]  # fmt: skip
    one = _histoshield([*cert, "--out", str(tmp_path / "c1")], 1)
    two = _histoshield([*cert, "--out", str(tmp_path / "c2")], 2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    keys = TIMING | {"files", "sharding"}
    assert _drop(a, keys) == _drop(b, keys)
    assert b["sharding"]["rank_images"] == [3, 2]


@pytest.mark.slow
def test_a_failing_rank_stops_the_job_with_its_message(ckpt, tmp_path):
    """Rank 0 cannot claim --out (it is a training run folder); rank 1 has already started:
    the job must end (no hang), non-zero, with rank 0's one-line error."""
    train_run = tmp_path / "train-run"
    train_run.mkdir()
    (train_run / "metrics.csv").write_text("epoch\n1\n")
    res = _histoshield(["attack", "-c", str(ckpt), "--attack", "fgsm", "--eps", "0,8/255",
                        "--out", str(train_run), "--device", "cpu"], 2)  # fmt: skip
    assert res.returncode != 0
    assert "error: rank 0:" in res.stderr and "train" in res.stderr
    assert not (train_run / "results.json").exists()


@pytest.mark.slow
def test_study_on_two_ranks_then_resumed_alone_gives_the_same_results(tmp_path):
    """A study under torchrun (DDP training, sharded evaluation) finishes; resuming a copy
    from its trained models in one process recomputes every evaluation stage to the same
    results.json (timings aside): the sharded stages are the one-process stages."""
    import shutil

    import yaml

    tiny = {
        "name": "tiny", "seed": 3, "data": "synthetic:n=96,size=32,seed=1",
        "train": {"model": "smallcnn", "image_size": 32, "epochs": 2, "batch_size": 16,
                  "device": "cpu"},  # gloo: also on a machine with one GPU
        "curve_eps": [0, "4/255"], "curve_attacks": ["fgsm", "pgd:steps=3"],
        "certify": {"n0": 10, "n": 40, "limit": 8}, "batch_size": 32,
    }  # fmt: skip
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny))
    two = tmp_path / "two"
    res = _histoshield(["study", "--config", str(cfg), "--out", str(two), "--quiet"], 2)
    assert res.returncode == 0, res.stderr
    state = json.loads((two / "state.json").read_text())
    assert state["finished"][-1] == "report"
    assert json.loads((two / "env.json").read_text())["world_size"] == 2
    one = tmp_path / "one"
    shutil.copytree(two, one)
    state["finished"] = [s for s in state["finished"] if s == "split" or s.startswith("train")]
    (one / "state.json").write_text(json.dumps(state))
    res = _histoshield(["study", "--config", str(cfg), "--out", str(one), "--resume",
                        "--quiet"], 1)  # fmt: skip
    assert res.returncode == 0, res.stderr
    volatile = TIMING | {"train_seconds", "wall_seconds", "timings", "total_seconds", "env"}
    a = _drop(json.loads((one / "results.json").read_text()), volatile)
    b = _drop(json.loads((two / "results.json").read_text()), volatile)
    assert a["curves"] and a["certified"]
    assert a == b


@pytest.mark.slow
def test_cv_on_two_ranks_then_resumed_alone_gives_the_same_results(tmp_path):
    """A CV under torchrun finishes; a copy that keeps only the trained fold models, resumed in
    one process, re-evaluates every fold (predictions, FGSM/PGD rows) to the same results."""
    import shutil

    import yaml

    tiny = {
        "name": "tiny-cv", "seed": 2, "data": "synthetic:n=96,size=32,seed=1",
        "train": {"model": "smallcnn", "image_size": 32, "epochs": 2, "batch_size": 16,
                  "device": "cpu"},  # gloo: also on a machine with one GPU
        "cv": {"folds": 3, "attacks": ["fgsm", "pgd:steps=3"], "eps": "4/255",
               "batch_size": 32},
    }  # fmt: skip
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny))
    two = tmp_path / "two"
    res = _histoshield(["cv", "--config", str(cfg), "--out", str(two), "--quiet"], 2)
    assert res.returncode == 0, res.stderr
    assert json.loads((two / "env.json").read_text())["world_size"] == 2
    one = tmp_path / "one"
    shutil.copytree(two, one)
    for f in [*one.glob("fold_*/oof.csv"), *one.glob("fold_*/fold.json"), one / "oof.csv",
              one / "results.json"]:  # fmt: skip
        f.unlink()
    state = json.loads((one / "state.json").read_text())
    state["finished"] = []
    (one / "state.json").write_text(json.dumps(state))
    res = _histoshield(["cv", "--config", str(cfg), "--out", str(one), "--resume", "--quiet"], 1)
    assert res.returncode == 0, res.stderr
    volatile = TIMING | {"seconds_per_fold", "env", "train_seconds", "wall_seconds", "history"}
    a = _drop(json.loads((one / "results.json").read_text()), volatile)
    b = _drop(json.loads((two / "results.json").read_text()), volatile)
    assert all(f["robustness"] for f in a["folds"])
    assert a == b
