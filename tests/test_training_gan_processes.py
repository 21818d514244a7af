"""The trainer as separate processes: SIGTERM mid-run and while the models load (processes forked
from one that imported the trainer: tests/trainer_process.py), and torchrun with 2 CPU ranks
(gloo, new interpreters)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_training_loop import write_config
from trainer_process import start_trainer

from d3sr_core.weight_format import read_weights
from training.checkpoint import list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _rows(path: Path) -> int:
    return sum(1 for _ in open(path)) if path.exists() else 0


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.fixture
def start():
    """trainer_process.start_trainer; a run still alive when the test ends is killed."""
    started = []

    def start_(*args, **kwargs):
        started.append(start_trainer(*args, **kwargs))
        return started[-1]
    yield start_
    for proc in started:
        if proc.is_alive():
            proc.kill()
            proc.join()


def _wait_for(done, proc, timeout: float) -> None:
    """Poll `done()` every 0.1 s while `proc` runs, for at most `timeout` seconds."""
    deadline = time.time() + timeout
    while not done() and proc.is_alive() and time.time() < deadline:
        time.sleep(0.1)


@pytest.mark.parametrize("to_group", [False, True], ids=["process", "process_group_with_data_worker"])
def test_sigterm_writes_a_loadable_checkpoint(tmp_path, tiny_setup, start, to_group):
    # to_group: a scheduler (or Ctrl-C in a terminal) signals every process of the job, the
    # DataLoader worker included; the worker must keep serving so the main process can checkpoint.
    config = write_config(tmp_path, tiny_setup, train={"steps": 10_000},
                          data={"num_workers": 1 if to_group else 0},
                          log={"checkpoint_every": 10_000, "every": 1, "progress": False})
    output = tmp_path / "output.txt"
    proc = start(["--config", config], output, new_session=True)
    log = tmp_path / "out" / "log.jsonl"
    _wait_for(lambda: _rows(log) >= 1, proc, 240)
    assert proc.is_alive(), _text(output)
    if to_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    proc.join(240)
    out = _text(output)
    assert proc.exitcode == 0, out
    assert "stopped by signal" in out
    folder = tmp_path / "out" / "checkpoints"
    found = list_checkpoints(str(folder))
    assert len(found) == 1
    step, path = found[0]
    assert 1 <= step < 10_000
    state = load_checkpoint(path)
    assert state["step"] == step and "opt_g" in state and "rng" in state
    weights = read_weights(str(folder / f"d3sr-step-{step:07d}.safetensors"))
    assert weights.training["step"] == step
    assert not [p for p in os.listdir(folder) if p.startswith(".tmp-")]


def test_a_stop_signal_while_the_models_load_stops_at_once(tmp_path, tiny_setup, start):
    # Before the first step there is nothing to save: SIGTERM (as from a scheduler) ends the run
    # right away with a message (it used to be held back until a first step and checkpoint).
    config = write_config(tmp_path, tiny_setup, train={"steps": 10_000}, log={"progress": False})
    output = tmp_path / "output.txt"
    proc = start(["--config", config], output)
    # Wait until the checks passed and the models start loading (the marker never comes: fail).
    _wait_for(lambda: "loading the models" in _text(output), proc, 300)
    seen = _text(output)
    assert proc.is_alive() and "loading the models" in seen, seen
    sent = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(240)
    elapsed = time.time() - sent
    out = _text(output)
    assert proc.exitcode == 128 + signal.SIGTERM, out
    assert "error: stopped by SIGTERM before the first training step (no checkpoint was written)" in out
    assert elapsed < 60, elapsed       # at once: not after loading the models and a training step
    assert list_checkpoints(str(tmp_path / "out" / "checkpoints")) == []
    assert (tmp_path / "out" / "train.lock").read_text() == ""      # the lock was released


def test_torchrun_two_cpu_ranks_stay_in_sync(tmp_path, tiny_setup):
    config = write_config(tmp_path, tiny_setup, train={"steps": 2, "batch_size": 2},
                          log={"checkpoint_every": 2, "progress": False})
    env = _env()
    env["D3SR_RANK_STATE_DIR"] = str(tmp_path / "ranks")
    # --standalone: torchrun's rendezvous binds a free port (port 0), so parallel runs never clash.
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "training.train", "--config", config],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "ranks" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ranks" / "rank1.pt", weights_only=True)
    assert r0["step"] == r1["step"] == 2
    for part in ("generator", "discriminator"):
        assert r0[part].keys() == r1[part].keys()
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)
    # The weights did train (B starts at zero), so equality is not trivial.
    assert any(float(v.abs().max()) > 0 for k, v in r0["generator"].items() if ".lora_B." in k)
    assert (tmp_path / "out" / "checkpoints" / "d3sr-step-0000002.safetensors").exists()
