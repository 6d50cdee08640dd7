"""The state of a run's random generators, saved in its checkpoint: a resume draws the numbers
the uninterrupted run would have drawn (its augmentations, its epoch order, dropout)."""

from __future__ import annotations

import torch


def rng_state(gens: dict) -> dict:
    """The state of the named generators ``gens`` and of torch's global CPU and CUDA generators."""
    state = {name: g.get_state() for name, g in gens.items()}
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(gens: dict, state: dict) -> None:
    for name, g in gens.items():
        g.set_state(state[name])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
