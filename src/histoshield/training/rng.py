"""Seeds and RNG state: every epoch's randomness derives from (seed, epoch, purpose, rank),
and last.pt stores the global RNG states so a resumed run continues exactly."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (seed, epoch, purpose, rank)."""
    ss = np.random.SeedSequence([int(p) % (2**63) for p in parts])
    return int(ss.generate_state(1, dtype=np.uint64)[0] % (2**63))


_PERM, _AUG, _GLOBAL = 1, 2, 3


def seed_epoch(seed: int, epoch: int) -> None:
    """Reseed the global RNGs for one epoch (dropout, defenses' noise, attack starts)."""
    s = derive_seed(seed, epoch, _GLOBAL)
    torch.manual_seed(s)
    np.random.seed(s % (2**32))
    random.seed(s)


def rng_state() -> dict[str, Any]:
    # Stored as tensors/lists only, so last.pt stays loadable with weights_only=True.
    np_state = np.random.get_state()
    py_state = random.getstate()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    p = st["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
