"""`python -m d3sr_core`: file and folder upscaling with ComfyUI as a library."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d3sr_core.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m d3sr_core ...` in a fresh process: the real entry point, exit status included."""
    return subprocess.run([sys.executable, "-m", "d3sr_core", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def main_in_process(*args: str) -> subprocess.CompletedProcess:
    """The CLI's `main(argv)` in this process, as `python -m d3sr_core` runs it (its return value
    is the exit status; argparse's errors exit 2), stdout and stderr captured: the same code
    without a new process's ~7 s of imports. The real entry point is run by
    test_bad_option_in_a_real_process_exits_2_without_a_traceback (exit status) and by the
    torchrun tests (test_cli_torchrun.py: fresh processes that import, load and upscale)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(["d3sr_core", *args], code, out.getvalue(), err.getvalue())


def test_folder_upscale_and_no_overwrite(models_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((12, 17, 3)) * 255).astype(np.uint8)).save(src / "a.png")
    Image.fromarray((rng.random((9, 9)) * 255).astype(np.uint8), mode="L").save(src / "b.jpg")
    out = tmp_path / "out"
    args = ["--checkpoint", str(models_dir / "checkpoints" / "tiny-sd2.safetensors"),
            "--weights", str(models_dir / "d3sr" / "tiny-t399.safetensors"),
            "--input", str(src), "--output", str(out), "--factor", "2", "--cpu"]
    r = main_in_process(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote 2 image(s)" in r.stdout
    with Image.open(out / "a.png") as a, Image.open(out / "b.png") as b:
        assert a.size == (34, 24) and b.size == (18, 18) and a.mode == "RGB"
    before = (out / "a.png").read_bytes()
    r = main_in_process(*args)
    assert "kept 2 existing" in r.stdout and (out / "a.png").read_bytes() == before


def test_missing_input_is_a_clear_error(models_dir, tmp_path):
    r = main_in_process("--checkpoint", "x.safetensors", "--weights", "y.safetensors",
                        "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"))
    assert r.returncode != 0 and "does not exist" in r.stderr


def _model_args(models_dir, src, out, *extra: str) -> list[str]:
    return ["--checkpoint", str(models_dir / "checkpoints" / "tiny-sd2.safetensors"),
            "--weights", str(models_dir / "d3sr" / "tiny-t399.safetensors"),
            "--input", str(src), "--output", str(out), "--factor", "2", "--cpu", *extra]


def _images(folder: Path, names: list[str], seed: int = 0) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray((rng.random((8, 10, 3)) * 255).astype(np.uint8)).save(folder / name)
    return {name: (folder / name).read_bytes() for name in names}


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_that_would_replace_an_input_is_refused(models_dir, tmp_path, overwrite):
    src = tmp_path / "photos"
    originals = _images(src, ["a.png", "b.jpg"])
    extra = ["--overwrite"] if overwrite else []
    # The input folder itself, given as the same path, through a link to it, and for one file.
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    for inp, out in ((src, src), (src, tmp_path / "link"), (src / "a.png", src)):
        r = main_in_process(*_model_args(models_dir, inp, out, *extra))
        assert r.returncode == 2 and "is the folder the input images are in" in r.stderr, r.stderr[-2000:]
    # An output file that resolves to an input (a link in the output folder).
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").symlink_to(src / "a.png")
    r = main_in_process(*_model_args(models_dir, src, out, *extra))
    assert r.returncode == 2 and "is the input" in r.stderr and "a.png" in r.stderr, r.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == originals
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]


def test_inputs_sharing_a_name_get_distinct_outputs(models_dir, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _images(src, ["a.png", "a.jpg", "b.png"])
    r = main_in_process(*_model_args(models_dir, src, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote 3 image(s)" in r.stdout and "kept" not in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["a_jpg.png", "a_png.png", "b.png"]
    with Image.open(out / "a_jpg.png") as a, Image.open(out / "a_png.png") as b:
        assert a.size == b.size == (20, 16)
        assert not np.array_equal(np.asarray(a), np.asarray(b))   # each from its own input
    r = main_in_process(*_model_args(models_dir, src, out))
    assert r.returncode == 0 and "wrote 0 image(s)" in r.stdout and "kept 3 existing" in r.stdout


def test_unreadable_image_is_skipped_listed_and_fails_the_run(models_dir, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _images(src, ["good.png"])
    (src / "bad.png").write_bytes(b"not a png at all")
    r = main_in_process(*_model_args(models_dir, src, out))
    assert r.returncode == 1, r.stderr[-3000:]
    assert "wrote 1 image(s)" in r.stdout and "skipped 1 unreadable" in r.stdout
    assert "1 image(s) could not be read" in r.stderr and "bad.png" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["good.png"]


@pytest.mark.parametrize("option, value, expected", [
    ("--factor", "9", "upscale factor 9.0 is outside 1..8"),
    ("--factor", "nan", "upscale factor nan is outside 1..8"),
    ("--factor", "0.5", "outside 1..8"),
    ("--factor", "four", "'four' is not a number"),
    ("--strength", "nan", "LoRA strength nan is not a finite number"),
    ("--strength", "inf", "not a finite number"),
])
def test_bad_factor_or_strength_stops_before_anything_loads(models_dir, tmp_path, option, value, expected):
    src, out = tmp_path / "in", tmp_path / "out"
    _images(src, ["a.png"])
    r = main_in_process(*_model_args(models_dir, src, out), option, value)
    assert r.returncode == 2 and expected in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not out.exists()
    # Checked before the files too: a missing checkpoint is not what it reports.
    r = main_in_process("--checkpoint", str(tmp_path / "missing.safetensors"), "--weights", "w.safetensors",
                        "--input", str(src), "--output", str(out), option, value)
    assert r.returncode == 2 and expected in r.stderr and "not found" not in r.stderr


def test_bad_option_in_a_real_process_exits_2_without_a_traceback(tmp_path):
    r = run_cli("--checkpoint", "c.safetensors", "--weights", "w.safetensors", "--input",
                str(tmp_path), "--output", str(tmp_path / "out"), "--factor", "9")
    assert r.returncode == 2 and "upscale factor 9.0 is outside 1..8" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_run_main_exits_with_mains_status_after_atexit_and_flushed_output():
    # host.run_main ends every entry point: the exit status is main's, atexit handlers still run
    # and buffered output still reaches the pipe (gc.freeze() only skips the last collections).
    # Also: importing host does not import torch (the test runner's controller relies on it).
    code = ("import atexit, sys; from d3sr_core import host; "
            "atexit.register(lambda: print('atexit ran')); "
            "host.run_main(lambda: print('torch' in sys.modules, end=' ') or 3)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and r.stdout == "False atexit ran\n", (r.returncode, r.stdout, r.stderr)


def test_ranks_sharing_a_pipe_never_mix_their_lines():
    # torchrun runs its ranks with `python -u`, where print() writes a line's text and its newline
    # in two writes: two ranks on one pipe then mixed lines ("...a.png[rank 1] wrote ..."). Under
    # run_main each line is one write. Two -u processes (no torch) print 3000 lines each at once.
    code = ("import sys; from d3sr_core import host\n"
            "def main():\n"
            "    print(sys.stdout.write_through, sys.stdout.line_buffering, sys.stderr.write_through)\n"
            "    sys.stdin.readline()\n"
            "    for i in range(3000):\n"
            "        print(f'[rank {sys.argv[1]}] wrote image {i}.png')\n"
            "    return 0\n"
            "host.run_main(main)\n")
    read_end, write_end = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-u", "-c", code, str(rank)], cwd=ROOT, stdout=write_end,
                              stdin=subprocess.PIPE) for rank in (0, 1)]
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        first = [pipe.readline(), pipe.readline()]     # both started: let them print together
        for proc in procs:
            proc.stdin.close()
        lines = pipe.read().decode().split("\n")
    assert [proc.wait(60) for proc in procs] == [0, 0]
    assert first == [b"False True False\n"] * 2        # line-buffered, not written through
    assert lines.pop() == ""
    assert len(lines) == 6000
    mixed = [line for line in lines if not re.fullmatch(r"\[rank [01]\] wrote image \d+\.png", line)]
    assert not mixed, mixed[:3]


def test_nan_output_and_bad_weights_are_errors_not_black_pngs(models_dir, tmp_path):
    import dataclasses

    from d3sr_core.weight_format import read_weights, write_weights
    weights = read_weights(str(models_dir / "d3sr" / "tiny-t399.safetensors"))
    huge = tmp_path / "huge.safetensors"
    write_weights(str(huge), dataclasses.replace(
        weights, lora={k: (a, b, 1e30) for k, (a, b, _) in weights.lora.items()}))
    src, out = tmp_path / "in", tmp_path / "out"
    _images(src, ["a.png"])
    args = _model_args(models_dir, src, out)
    args[args.index("--weights") + 1] = str(huge)
    r = main_in_process(*args)
    assert r.returncode == 2 and "NaN or infinite" in r.stderr and "LoRA alphas" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not out.exists()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(huge.read_bytes()[:1000])
    args[args.index("--weights") + 1] = str(broken)
    r = main_in_process(*args)
    assert r.returncode == 2 and "cannot be read as safetensors" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not out.exists()
