"""DDP on CPU: two gloo processes under torchrun train together; rank 0 alone writes, and its
metrics are those of the whole validation set (reduced over ranks), not of its shard."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from histoshield import models
from histoshield.data import labels_of, load_arrays, read_split, to_float
from histoshield.evaluation.metrics import balanced_rate, degenerate_reason


def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "histoshield", "train", "--data", "synthetic:n=64,size=32",
           "--model", "smallcnn", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
           "--device", "cpu", "--out", str(run)]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if p.returncode and "address already in use" in p.stderr.lower():
        # --standalone picks a free port that a neighbour on this shared machine can steal.
        shutil.rmtree(run, ignore_errors=True)
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count(f"run {run}:") == 1  # only rank 0 prints
    assert not list(run.glob(".*.tmp"))
    res = json.loads((run / "results.json").read_text())
    assert res["world_size"] == 2
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1

    # Rank 0's logged val metrics equal the full validation set's under the final weights.
    m = models.load_checkpoint(run / "last.pt")
    split = read_split(run / "split.csv")
    recs = split.subset("val")
    x = to_float(load_arrays(recs, 32, progress=False))
    y = torch.as_tensor(labels_of(recs, m.classes))
    with torch.no_grad():
        logits = m(x)
    assert float(rows[0]["val_acc"]) == pytest.approx((logits.argmax(1) == y).sum().item() / len(y))
    assert float(rows[0]["val_loss"]) == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-4)
    # Balanced accuracy and the degenerate check need every prediction, gathered over ranks.
    pred = logits.argmax(1)
    assert float(rows[0]["val_bal_acc"]) == pytest.approx(balanced_rate(pred == y, y))
    assert rows[0]["val_degenerate"] == (degenerate_reason(y, pred, m.classes) or "")
    assert res["n"]["val"] == len(recs)
