"""`torchrun -m d3sr_core`: the CLI with 2 CPU ranks (gloo) against a single-process run.

One torchrun job serves both tests (each launch starts three new interpreters: torchrun and two
ranks): a job that was stopped before, so some outputs exist, with new inputs for both ranks and
an unreadable one. The tests read its outputs for what they check: every new output written once,
by the rank that owns its input, equal to the single process's; the finished ones kept, untouched.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import main_in_process

ROOT = Path(__file__).resolve().parents[1]
# Sorted: a.png b.jpg bad.png c.jpg c.png d.png e.png -> rank 0 gets a, bad, c.png, e; rank 1
# gets b, c.jpg, d. c.jpg and c.png share a stem and sit on different ranks: their names
# (c_jpg.png, c_png.png) must come from the whole list, as in a single process.
INPUTS = ["a.png", "b.jpg", "bad.png", "c.jpg", "c.png", "d.png", "e.png"]
OUTPUTS = {"a.png": "a.png", "b.jpg": "b.png", "c.jpg": "c_jpg.png", "c.png": "c_png.png", "d.png": "d.png",
           "e.png": "e.png"}
# Finished before the job was stopped (one per rank: d on rank 1, e on rank 0).
DONE = ["d.png", "e.png"]


def run_torchrun(args: list[str], ranks: int = 2) -> subprocess.CompletedProcess:
    """The CLI under torchrun with `ranks` CPU processes on a free port, OMP_NUM_THREADS=1
    (torchrun's default per rank): CPU float sums, and so the last bit of a pixel, depend on
    the thread count."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    return subprocess.run([sys.executable, *launcher, "-m", "d3sr_core", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def single_process(args: list[str]) -> subprocess.CompletedProcess:
    """test_cli's main_in_process with one thread, as each torchrun rank runs: the single-process
    reference without a new process's imports."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main_in_process(*args)
    finally:
        torch.set_num_threads(threads)


def written_by_rank(stdout: str) -> Counter:
    """(rank, file name) -> times the --verbose lines say it was written."""
    return Counter((int(r), Path(p).name) for r, p in re.findall(r"^\[rank (\d)\] wrote (.+)$", stdout, re.M))


@pytest.fixture(scope="module")
def job(models_dir, tmp_path_factory):
    """The inputs (one corrupt), the CLI arguments, and a single-process run's outputs."""
    root = tmp_path_factory.mktemp("torchrun")
    src = root / "in"
    src.mkdir()
    rng = np.random.default_rng(7)
    for name in INPUTS:
        if name == "bad.png":
            (src / name).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        else:
            Image.fromarray((rng.random((12, 17, 3)) * 255).astype(np.uint8)).save(src / name, quality=95)

    def args(out: Path) -> list[str]:
        return ["--checkpoint", str(models_dir / "checkpoints" / "tiny-sd2.safetensors"),
                "--weights", str(models_dir / "d3sr" / "tiny-t399.safetensors"),
                "--input", str(src), "--output", str(out), "--factor", "2", "--cpu", "--verbose"]

    r = single_process(args(root / "single"))
    assert r.returncode == 1 and "wrote 6 image(s)" in r.stdout, r.stderr[-3000:]
    reference = {p.name: p.read_bytes() for p in (root / "single").iterdir()}
    assert sorted(reference) == sorted(OUTPUTS.values())
    return root, args, reference


@pytest.fixture(scope="module")
def two_ranks(job):
    """The stopped job resumed under torchrun with 2 ranks: (its result, the output folder,
    os.stat of the outputs that existed before)."""
    root, args, reference = job
    out = root / "two"
    out.mkdir()
    for name in DONE:
        (out / name).write_bytes(reference[name])
    before = {name: os.stat(out / name) for name in DONE}
    return run_torchrun(args(out)), out, before


def expected_rank(output_name: str) -> int:
    source = next(k for k, v in OUTPUTS.items() if v == output_name)
    return INPUTS.index(source) % 2


def test_two_ranks_equal_a_single_process_each_file_once(job, two_ranks):
    _root, _args, reference = job
    r, out, _before = two_ranks
    assert r.returncode != 0, r.stdout[-2000:]   # bad.png failed: the job fails
    assert "wrote 4 image(s)" in r.stdout and "(per rank: 2, 2)" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    assert "skipped 1 unreadable" in r.stdout
    assert "error: 1 image(s) could not be read and were skipped:" in r.stderr
    assert re.search(r"^  cannot read image .*bad\.png", r.stderr, re.M), r.stderr[-3000:]
    # Every new output written exactly once, by the rank that owns its input (index % 2).
    writes = written_by_rank(r.stdout)
    assert sorted(writes.items()) == sorted(((expected_rank(n), n), 1) for n in OUTPUTS.values() if n not in DONE)
    # The union of the ranks' outputs is the single-process run, byte for byte; no temporaries.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == reference


def test_stopped_job_resumes(job, two_ranks):
    _root, _args, reference = job
    r, out, before = two_ranks
    assert "kept 2 existing" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    # Each rank resumed its own share: the finished outputs (one per rank) are neither
    # written again nor touched; the others are written by their owners.
    writes = written_by_rank(r.stdout)
    assert {rank for rank, _ in writes} == {0, 1}
    assert not [n for _, n in writes if n in DONE]
    for name in DONE:
        st = os.stat(out / name)
        assert (st.st_ino, st.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == reference
