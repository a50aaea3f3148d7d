"""Random number generators: seeding, per-(rank, step, update) draws and their state in checkpoints, so a resumed
run draws what the uninterrupted run would have drawn."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_draws(seed: int, rank: int, step: int, update: str, repeat: int) -> None:
    """Reseed torch's generators (CPU and every GPU) for one update of one step on one rank: every stochastic draw
    inside a method (label-bank vectors, dropout masks, noise) differs between ranks, as the samples of one process
    holding the global batch would, while parameters stay identical (initial weights broadcast, gradients
    averaged). A pure function of (seed, rank, step, update), so a resumed run draws what the uninterrupted run
    would have drawn."""
    h = hashlib.blake2b(f"draw:{seed}:{rank}:{step}:{update}:{repeat}".encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(h, "big") >> 1)


def rng_state() -> dict:
    """Every RNG's state as tensors, ints and lists only, so a checkpoint loads with ``weights_only=True``."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

