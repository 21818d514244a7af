"""Atomic training checkpoints and their D3SR weight-file exports.

Layout under `<output_dir>/checkpoints/`:
    step-0001000.pt          trainable state (see `Trainer.state_dict`), torch.save
    d3sr-step-0001000.safetensors   the generator as a D3SR weight file (D3SRModelLoader reads it)
    d3sr-latest.safetensors  the newest export
Every file is written to a temporary sibling, fsynced, then renamed (os.replace): a reader or a
resumed run never sees half a file, even if the process is killed mid-write.
"""

from __future__ import annotations

import os
import random
import re

import numpy as np
import torch

from d3sr_core.atomic_file import atomic_path
from d3sr_core.weight_format import D3SRWeights, write_weights

STEP_RE = re.compile(r"^step-(\d{7,})\.pt$")


def atomic_torch_save(path: str, obj: object) -> None:
    """torch.save through atomic_path (temporary sibling, fsync, rename)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def checkpoint_path(folder: str, step: int) -> str:
    return os.path.join(folder, f"step-{step:07d}.pt")


def export_path(folder: str, step: int) -> str:
    return os.path.join(folder, f"d3sr-step-{step:07d}.safetensors")


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """[(step, path)] of complete checkpoints in `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name))
             for name in os.listdir(folder) if (m := STEP_RE.match(name))]
    return sorted(found)


def latest_checkpoint(folder: str) -> str | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def prune(folder: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (and their exports)."""
    for step, path in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        for p in (path, export_path(folder, step)):
            if os.path.exists(p):
                os.unlink(p)


def rng_state() -> dict:
    """Python, numpy and torch CPU generator states, and the current CUDA device's (the trainer
    draws its own randomness from seeded CPU generators; these cover library code)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`; the CUDA state goes to the current device (so a checkpoint moves
    between machines with different GPU counts; older lists of per-device states are skipped)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by `atomic_torch_save` (on CPU)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def write_export(folder: str, step: int, weights: D3SRWeights) -> str:
    """Write the step's D3SR file and refresh d3sr-latest.safetensors; returns the step file."""
    path = export_path(folder, step)
    write_weights(path, weights)
    write_weights(os.path.join(folder, "d3sr-latest.safetensors"), weights)
    return path
