"""Atomic training checkpoints and their D3SR weight-file exports.

Layout under `<output_dir>/checkpoints/`:
    step-0001000.pt          trainable state (see `Trainer.state_dict`), torch.save of tensors,
                             numbers, strings and plain containers only: it is read back with
                             torch.load(weights_only=True), so a file that asks the unpickler
                             for anything else (e.g. a crafted pickle calling a function) is
                             refused and nothing in it runs
    d3sr-step-0001000.safetensors   the generator as a D3SR weight file (D3SRModelLoader reads it)
    d3sr-latest.safetensors  the newest export
Every file is written to a temporary sibling, fsynced, then renamed (os.replace): a reader or a
resumed run never sees half a file, even if the process is killed mid-write.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import zipfile

import numpy as np
import torch

from d3sr_core.atomic_file import atomic_path
from d3sr_core.weight_format import D3SRWeights, write_weights

log = logging.getLogger("d3sr.train")
STEP_RE = re.compile(r"^step-(\d{7,})\.pt$")
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (its message says which and why)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle asks for more than tensors, numbers, strings and containers."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint that is truncated, empty or not a torch checkpoint at all."""


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
    draws its own randomness from seeded CPU generators; these cover library code), as tensors,
    numbers and strings only (a weights-only load reads them)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`; the CUDA state goes to the current device (so a checkpoint moves
    between machines with different GPU counts)."""
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by `atomic_torch_save` (on CPU) with torch.load(weights_only=True).

    Raises UnsafeCheckpointError for a pickle that asks for anything else (naming what it asked
    for; nothing in it is run) and CorruptCheckpointError for a truncated or foreign file."""
    if not zipfile.is_zipfile(path):  # torch.save's format; a cut file has lost its zip directory
        raise CorruptCheckpointError(f"checkpoint '{path}' is truncated or not a training checkpoint (not "
                                     "torch.save's zip format)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise CorruptCheckpointError(f"checkpoint '{path}' is corrupt ({_first_line(e)})") from None
        found = _GLOBAL_RE.search(str(e))
        asked = f"asks to import {found.group(1)}" if found else "uses pickle features a checkpoint never needs"
        raise UnsafeCheckpointError(
            f"checkpoint '{path}' was refused and nothing in it was run: it {asked}, while a training "
            "checkpoint holds only tensors, numbers, strings and lists/dicts. If you did not write this "
            "file, delete it; to resume, name another checkpoint with --resume.") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ... for cut or foreign files
        raise CorruptCheckpointError(f"checkpoint '{path}' is truncated or not a training checkpoint "
                                     f"({_first_line(e) or type(e).__name__})") from None
    if not isinstance(state, dict) or "step" not in state or "generator" not in state:
        raise CorruptCheckpointError(f"checkpoint '{path}' is not a D3SR training checkpoint (it holds no "
                                     "step and generator state)")
    return state


def _first_line(e: BaseException) -> str:
    return str(e).strip().split("\n")[0][:200]


def find_resume_checkpoint(folder: str, requested: str | bool) -> tuple[str | None, dict | None]:
    """(path, loaded state) to resume from: the file named by `requested`, or with
    `requested=True` the newest intact checkpoint in `folder` (truncated or corrupt newer ones
    are skipped with a warning naming them); (None, None) when `folder` holds none.
    Raises CheckpointError for a named file that cannot be used (missing, an exported
    .safetensors weight file, corrupt, refused) or when every checkpoint in `folder` is corrupt."""
    if isinstance(requested, str):
        if requested.lower().endswith(".safetensors"):
            raise CheckpointError(
                f"--resume '{requested}': that is an exported D3SR weight file (no optimizer or RNG "
                "state), not a training checkpoint; give a step-NNNNNNN.pt from <output_dir>/checkpoints, "
                "or --resume alone for the newest one. To start from exported weights, train a new run.")
        if not os.path.isfile(requested):
            raise CheckpointError(f"--resume: checkpoint '{requested}' not found")
        return requested, load_checkpoint(requested)
    found = list_checkpoints(folder)
    skipped = []
    for _step, path in reversed(found):
        try:
            state = load_checkpoint(path)
        except CorruptCheckpointError as e:
            log.warning("--resume: skipping %s: %s", os.path.basename(path), e)
            skipped.append(os.path.basename(path))
            continue
        if skipped:
            log.warning("--resume: resuming from %s, the newest intact checkpoint (skipped: %s)",
                        os.path.basename(path), ", ".join(skipped))
        return path, state
    if found:
        raise CheckpointError(f"--resume: none of the {len(found)} checkpoint(s) in '{folder}' can be read "
                              f"(all truncated or corrupt: {', '.join(skipped)}); move them away to start afresh")
    return None, None


def write_export(folder: str, step: int, weights: D3SRWeights) -> str:
    """Write the step's D3SR file and refresh d3sr-latest.safetensors; returns the step file."""
    path = export_path(folder, step)
    write_weights(path, weights)
    write_weights(os.path.join(folder, "d3sr-latest.safetensors"), weights)
    return path
