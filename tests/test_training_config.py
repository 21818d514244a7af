"""The trainer's config checks, run-folder lock, checkpoint format and stop signals, without
models: every bad value is one error line naming the key (exit code 2) before anything loads."""

from __future__ import annotations

import os
import pickle
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_training_loop import RunsCode, hold_run_lock, write_config

from training import checkpoint
from training.config import ConfigError, load_config
from training.data import DataError, list_images
from training.run_dir import LOCK_NAME, OutputDirBusyError, RunLock
from training.stop import StopRequested, StopSignal
from training.train import main


def _config(tmp_path: Path, **sections) -> str:
    """test_training_loop's config, with model and data paths that need not exist: the checks
    here come before any file is opened."""
    paths = {"generator": str(tmp_path / "g.safetensors"), "discriminator": str(tmp_path / "d.safetensors"),
             "data": str(tmp_path / "data")}
    return write_config(tmp_path, paths, **sections)


# (section, key, value, the error's words). Every value here was accepted, or misread, before.
BAD_VALUES = [
    ("optim", "lr_generator", 0.0, "optim.lr_generator must be > 0, got 0.0"),
    ("optim", "lr_discriminator", -1e-4, "optim.lr_discriminator must be > 0"),
    ("optim", "lr_generator", float("inf"), "optim.lr_generator must be a finite number, got Infinity"),
    ("optim", "lr_generator", float("nan"), "optim.lr_generator must be a finite number, got NaN"),
    ("optim", "lr_generator", "fast", 'optim.lr_generator must be a finite number, got "fast"'),
    ("optim", "betas", [0.9, 1.0], "optim.betas must both be in [0, 1), got [0.9, 1.0]"),
    ("optim", "betas", [-0.1, 0.999], "optim.betas must both be in [0, 1)"),
    ("optim", "betas", [0.9], "optim.betas must be a list of 2 values, got [0.9]"),
    ("optim", "weight_decay", -0.01, "optim.weight_decay must be >= 0, got -0.01"),
    ("optim", "grad_clip", -1, "optim.grad_clip must be > 0 (or null: no clipping), got -1.0"),
    ("optim", "grad_clip", 0, "optim.grad_clip must be > 0"),
    ("optim", "grad_accum", 1.5, "optim.grad_accum must be a whole number, got 1.5"),
    ("generator", "lora_rank", 0, "generator.lora_rank must be >= 1, got 0"),
    ("generator", "lora_rank", 4.5, "generator.lora_rank must be a whole number, got 4.5"),
    ("discriminator", "lora_rank", "four", 'discriminator.lora_rank must be a whole number, got "four"'),
    ("generator", "lora_alpha", 0, "generator.lora_alpha must be > 0, got 0.0"),
    ("generator", "timestep", 1000, "generator.timestep (T_L) must be in 1..999, got 1000"),
    ("generator", "timestep", 399.5, "generator.timestep must be a whole number, got 399.5"),
    ("generator", "train_embedding", "yes", 'generator.train_embedding must be true or false, got "yes"'),
    ("train", "steps", 0, "train.steps must be >= 1, got 0"),
    ("train", "steps", 2.5, "train.steps must be a whole number, got 2.5"),
    ("train", "batch_size", True, "train.batch_size must be a whole number, got true"),
    ("train", "batch_size", 0, "train.batch_size must be >= 1, got 0"),
    ("train", "crop", 20, "train.crop (20) must be a multiple of 8 and >= 16"),
    ("train", "scale", 0, "train.scale must be >= 1, got 0"),
    ("train", "crop", "512px", 'train.crop must be a whole number, got "512px"'),
    ("train", "ema_decay", 1.0, "train.ema_decay must be in [0, 1) or null"),
    ("train", "ema_decay", -0.5, "train.ema_decay must be in [0, 1) or null"),
    ("train", "d_timesteps", [0, 1000], "train.d_timesteps must be [lo, hi] with 0 <= lo <= hi <= 999"),
    ("train", "gradient_checkpointing", 1, "train.gradient_checkpointing must be true or false, got 1"),
    ("loss", "lambda_gan", -0.5, "loss.lambda_gan must be >= 0, got -0.5"),
    ("loss", "mse_range", [0, 2], "loss.mse_range must be [0, 1] or [-1, 1], got [0.0, 2.0]"),
    ("loss", "mse_range", [-1, 1, 2], "loss.mse_range must be a list of 2 values, got [-1, 1, 2]"),
    ("loss", "mse_range", "-1..1", 'loss.mse_range must be a list, got "-1..1"'),
    ("data", "usm_target", "blurred", "data.usm_target 'blurred' is not one of sharpened/none"),
    ("data", "usm_target", False, "data.usm_target must be a text string, got false"),
    ("data", "usm_weight", -0.5, "data.usm_weight must be >= 0, got -0.5"),
    ("data", "usm_threshold", -1, "data.usm_threshold must be >= 0, got -1.0"),
    ("data", "usm_radius", 0, "data.usm_radius must be >= 1, got 0"),
    ("data", "realesrgan", {"usm_sharpen": False},
     "config key 'data.realesrgan.usm_sharpen' has moved: set data.usm_target (sharpened | none) instead"),
    ("data", "realesrgan", {"usm_weight": 1.0},
     "config key 'data.realesrgan.usm_weight' has moved: set data.usm_weight"),
    ("loss", "vgg_path", "missing-vgg.pth", "loss.vgg_path 'missing-vgg.pth' is not a file"),
    ("models", "embedding_file", "missing.safetensors", "models.embedding_file 'missing.safetensors' is not a file"),
    ("models", "generator", 5, "models.generator must be a text string, got 5"),
    ("data", "folders", [3], "data.folders[0] must be a text string, got 3"),
    ("data", "num_workers", -1, "data.num_workers must be >= 0, got -1"),
    ("log", "keep_checkpoints", -1, "log.keep_checkpoints must be >= 0, got -1"),
    ("log", "progress", "no", 'log.progress must be true or false, got "no"'),
    (None, "seed", -3, "seed must be >= 0, got -3"),
    (None, "output_dir", "", "output_dir is empty"),
]


@pytest.mark.parametrize("section,key,value,message", BAD_VALUES,
                         ids=[f"{s or 'top'}.{k}={v!r}" for s, k, v, _ in BAD_VALUES])
def test_bad_config_values_are_refused_by_name(tmp_path, section, key, value, message):
    config = _config(tmp_path, **({section: {key: value}} if section else {key: value}))
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_paper_config_states_the_paper_and_our_choices():
    # The paper's config freezes the embedding (Fig. 1); the unsharp-mask convention and the MSE's
    # pixel range are ours, written out in the file (and the same as the dataclass defaults).
    from training.config import Config
    path = Path(__file__).resolve().parents[1] / "training" / "configs" / "d3sr_paper.yaml"
    cfg = load_config(str(path))
    assert cfg.generator.train_embedding is False
    assert cfg.data.usm_target == "sharpened" and cfg.loss.mse_range == (0.0, 1.0)
    text = path.read_text()
    assert "train_embedding: false" in text and "usm_target: sharpened" in text and "mse_range: [0, 1]" in text
    default = Config()
    assert (default.generator.train_embedding, default.data.usm_target, default.loss.mse_range) == (
        False, "sharpened", (0.0, 1.0))


def test_numbers_pyyaml_reads_as_strings_are_read_as_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 5e-5 and 1e5 (no dot) as strings: they mean numbers.
    path = tmp_path / "config.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\ndata: {{folders: [x]}}\n"
                    "optim: {lr_generator: 5e-5, lr_discriminator: 2E-4, betas: [0.5, 9e-1]}\n"
                    "train: {steps: 1e5, batch_size: 2.0}\n")
    assert yaml.safe_load(path.read_text())["optim"]["lr_generator"] == "5e-5"
    cfg = load_config(str(path))
    assert type(cfg.optim.lr_generator) is float and cfg.optim.lr_generator == 5e-5
    assert type(cfg.optim.lr_discriminator) is float and cfg.optim.lr_discriminator == 2e-4
    assert cfg.optim.betas == (0.5, 0.9)
    assert type(cfg.train.steps) is int and cfg.train.steps == 100_000
    assert type(cfg.train.batch_size) is int and cfg.train.batch_size == 2


def test_a_folder_given_as_one_string_is_one_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"")
    cfg = load_config(_config(tmp_path, data={"folders": str(tmp_path / "imgs")}))
    assert cfg.data.folders == [str(tmp_path / "imgs")]
    assert list_images(cfg.data.folders) == [str(tmp_path / "imgs" / "a.png")]
    # The listing itself takes one string as one folder too (never its characters).
    assert list_images(str(tmp_path / "imgs")) == [str(tmp_path / "imgs" / "a.png")]


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "train.steps must be >= 1, got 0"),
    ([], "optim.grad_clip must be > 0 (or null: no clipping), got -1.0"),
])
def test_cli_prints_one_error_line_and_exits_2(tmp_path, capsys, argv, message):
    config = _config(tmp_path, optim={"grad_clip": -1 if not argv else 1.0})
    assert main(["--config", config, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_checkpoint_rng_state_survives_a_weights_only_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    np.random.standard_normal()      # numpy caches the second Gaussian: part of its state
    torch.manual_seed(3)
    state = checkpoint.rng_state()
    expected = (random.random(), np.random.standard_normal(), float(torch.rand(())))
    path = str(tmp_path / "rng.pt")
    torch.save({"rng": state}, path)
    loaded = torch.load(path, weights_only=True)["rng"]
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    checkpoint.set_rng_state(loaded)
    assert (random.random(), np.random.standard_normal(), float(torch.rand(()))) == expected


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    path = folder / "step-0000002.pt"
    torch.save({"step": 2, "generator": {}, "payload": RunsCode(str(marker))}, path)
    with pytest.raises(checkpoint.UnsafeCheckpointError) as info:
        checkpoint.load_checkpoint(str(path))
    message = str(info.value)
    assert "posix.mkdir" in message and "refused" in message and "nothing in it was run" in message
    assert "weights_only=False" not in message and "\n" not in message
    assert not marker.exists()
    # Also when --resume picks it as the newest: refused, not skipped, and not run.
    with pytest.raises(checkpoint.UnsafeCheckpointError):
        checkpoint.find_resume_checkpoint(str(folder), True)
    assert not marker.exists()


def test_resume_skips_cut_checkpoints_and_refuses_exported_weights(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"step": 2, "generator": {"w": torch.ones(3)}}, folder / "step-0000002.pt")
    whole = (folder / "step-0000002.pt").read_bytes()
    (folder / "step-0000004.pt").write_bytes(whole[: len(whole) // 2])     # cut by a full disk
    (folder / "step-0000006.pt").write_bytes(b"")                           # cut at zero bytes
    with caplog.at_level("WARNING", logger="d3sr.train"):
        path, state = checkpoint.find_resume_checkpoint(str(folder), True)
    assert path == str(folder / "step-0000002.pt") and state["step"] == 2
    assert "skipping step-0000006.pt" in caplog.text and "skipping step-0000004.pt" in caplog.text
    assert "truncated" in caplog.text and "skipped: step-0000006.pt, step-0000004.pt" in caplog.text
    (folder / "step-0000002.pt").write_bytes(whole[:100])
    with pytest.raises(checkpoint.CheckpointError, match=r"none of the 3 checkpoint\(s\) .* can be read"):
        checkpoint.find_resume_checkpoint(str(folder), True)
    with pytest.raises(checkpoint.CheckpointError, match="that is an exported D3SR weight file"):
        checkpoint.find_resume_checkpoint(str(folder), str(tmp_path / "d3sr-latest.safetensors"))


def test_output_dir_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path, caplog):
    out = tmp_path / "out"
    holder = hold_run_lock(out)
    try:
        with pytest.raises(OutputDirBusyError, match=rf"in use by another training run \(pid {holder.pid} on host"):
            RunLock(str(out)).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its pid is still in the file, but the lock is free.
    assert f"pid={holder.pid}" in (out / LOCK_NAME).read_text()
    with caplog.at_level("WARNING", logger="d3sr.train"):
        lock = RunLock(str(out)).acquire()
    assert f"taking over a stale lock left by pid {holder.pid}" in caplog.text
    assert "that process is gone" in caplog.text
    assert f"pid={os.getpid()}" in (out / LOCK_NAME).read_text()
    lock.release()
    assert (out / LOCK_NAME).read_text() == ""              # a clean end leaves no holder behind
    RunLock(str(out)).acquire().release()                   # ...and the lock free


def test_output_dir_that_cannot_be_written_is_refused(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="output_dir .* is a file, not a folder"):
        RunLock(str(tmp_path / "a-file")).acquire()
    with pytest.raises(ConfigError, match=r"output_dir .* is not writable \(Not a directory\)"):
        RunLock(str(tmp_path / "a-file" / "out")).acquire()


def test_a_stop_signal_before_the_loop_raises_at_once_and_after_it_is_deferred():
    before = signal.getsignal(signal.SIGINT)
    stop = StopSignal()
    try:
        with pytest.raises(StopRequested, match="stopped by SIGINT before the first training step"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)                                   # the handler interrupts this
        # Had a library's bare `except:` swallowed that exception, the loop still stops at its start.
        with pytest.raises(StopRequested, match="SIGINT"):
            stop.enter_loop()
        stop.defer()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stop.signum == signal.SIGTERM
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def _signal_then(error: Exception):
    """A call that receives SIGTERM and, as a library or reader might, turns the handler's
    exception into `error`."""
    def call(*_args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)                                   # the handler interrupts this
        except BaseException:
            raise error from None
    return call


def test_a_stop_signal_a_library_turned_into_its_own_error_still_stops_the_run(tmp_path, monkeypatch, capsys):
    # SIGTERM while safetensors reads a checkpoint: the handler's StopRequested, raised inside the
    # reader, came out as "ValueError: could not determine the shape of object type ..." (exit 1,
    # a traceback). The CLI reports the stop (exit 128 + 15) however it was wrapped: as another
    # error, or as one of the run's own (exit 2 otherwise: an image cut off by the signal while it
    # was read looks unreadable)...
    import training.train as cli
    before = signal.getsignal(signal.SIGTERM)
    for where, error in (("_run", ValueError("could not determine the shape of object type")),
                         ("load_config", DataError("cannot read image 'a.png'"))):
        with monkeypatch.context() as patch:
            patch.setattr(cli, where, _signal_then(error))
            assert main(["--config", _config(tmp_path)]) == 128 + signal.SIGTERM, where
        assert "error: stopped by SIGTERM before the first training step" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGTERM) is before
    # ...and an error no signal caused is still reported, or raised, as it is.
    def unreadable(*_args):
        raise DataError("cannot read image 'a.png'")
    monkeypatch.setattr(cli, "load_config", unreadable)
    assert main(["--config", _config(tmp_path)]) == 2
    assert "error: cannot read image 'a.png'" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_run", lambda *_args: int("not a number"))
    with pytest.raises(ValueError, match="invalid literal"):
        main(["--config", _config(tmp_path)])


def test_files_not_in_torchs_format_are_corrupt_and_never_unpickled(tmp_path):
    path = tmp_path / "step-0000001.pt"
    for content in (b"not a checkpoint at all", pickle.dumps({"step": 1}),
                    pickle.dumps(RunsCode(str(tmp_path / "code-ran")))):
        path.write_bytes(content)
        with pytest.raises(checkpoint.CorruptCheckpointError, match="truncated or not a training checkpoint"):
            checkpoint.load_checkpoint(str(path))
    assert not (tmp_path / "code-ran").exists()
