"""The training run: checks, resume, the data stream, the loop, checkpoints and the end.

`train(cfg, resume)` runs (or resumes) one rank's part of a run. ComfyUI must be imported for
the rank's device first (training.train's CLI does this; tests import it in conftest).
Rank 0 checks the run before any model loads (data, model files, eval set, the output folder,
which it then locks for the life of the run, and the checkpoint to resume from) and every rank
gets its answer. A stop signal before the first step ends the run at once (training.stop's
StopRequested); from the first step on it ends the run after the current step, with a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from d3sr_core.atomic_file import write_text_atomic

from .checkpoint import find_resume_checkpoint, list_checkpoints, load_checkpoint
from .config import Config, ConfigError
from .data import CropDataset, ResumableShardSampler, list_images, scan_images
from .distributed import any_rank, barrier, check_same_step, from_rank0, init_distributed, shutdown
from .model_files import check_model_file
from .run_dir import RunLock
from .run_log import RunLog, save_sample
from .stop import StopSignal, workers_ignore_stop_signals
from .train_eval import check_eval_set, run_eval
from .trainer import Trainer

log = logging.getLogger("d3sr.train")


def _check_run(cfg: Config, ckpt_dir: str, resume: str | bool | None, lock: RunLock,
               found: dict) -> tuple[list[str], str | None]:
    """Checks made once before any model loads (rank 0): data, model files and eval set (all
    read-only), then the output folder: writable, locked, not a finished run's unless resuming.
    Returns (usable image paths, checkpoint to resume from or None); its state goes in `found`."""
    images = scan_images(list_images(cfg.data.folders), cfg.train.crop)[0]
    check_model_file(cfg.models.generator, "generator")
    check_model_file(cfg.models.discriminator, "discriminator")
    if cfg.log.eval_lr_folder or cfg.log.eval_gt_folder:
        check_eval_set(cfg)
    lock.acquire()
    existing = list_checkpoints(ckpt_dir)
    if not resume and existing:
        raise ConfigError(f"output_dir '{cfg.output_dir}' already holds checkpoints (up to step "
                          f"{existing[-1][0]}): pass --resume to continue that run, or set another "
                          "output_dir (nothing was changed)")
    path, found["state"] = find_resume_checkpoint(ckpt_dir, resume) if resume else (None, None)
    return images, path


def _resume(trainer: Trainer, resume: str | bool | None, path: str | None, state: dict | None,
            ckpt_dir: str) -> None:
    """Load the chosen checkpoint into `trainer` (rank 0 has read it already, the others read it)."""
    if path is None:
        if resume:
            log.warning("--resume: no checkpoint in %s, starting from step 0", ckpt_dir)
        return
    state = state if state is not None else load_checkpoint(path)
    if state.get("world_size", trainer.world) != trainer.world:
        log.warning("checkpoint was written with %s ranks, resuming with %s: the data order differs",
                    state.get("world_size"), trainer.world)
    trainer.load_state_dict(state)
    log.info("resumed from %s at step %d", path, trainer.step)


def _batches(cfg: Config, trainer: Trainer) -> Iterator[torch.Tensor]:
    """Endless micro-batches of HR crops for this rank, continuing where a resumed run stopped."""
    dataset = CropDataset(trainer.image_paths, cfg.train.crop)
    per_step = trainer.micro_batch * cfg.optim.grad_accum
    sampler = ResumableShardSampler(len(dataset), trainer.rank, trainer.world, cfg.seed,
                                    start=trainer.step * per_step)
    workers = cfg.data.num_workers
    loader = DataLoader(
        dataset, batch_size=trainer.micro_batch, sampler=sampler, num_workers=workers,
        pin_memory=trainer.device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
        worker_init_fn=workers_ignore_stop_signals if workers > 0 else None,
        prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None)
    return iter(loader)


@dataclass
class _Run:
    """One rank's running state in the loop; `runlog` and `bar` exist on rank 0 only."""

    cfg: Config
    trainer: Trainer
    ckpt_dir: str
    runlog: RunLog | None = None
    bar: tqdm | None = None
    last_saved: int = -1

    @property
    def rank0(self) -> bool:
        return self.trainer.rank == 0

    def start_outputs(self) -> None:
        """Rank 0: checkpoints/, config.json, the run log and the progress bar."""
        cfg = self.cfg
        os.makedirs(self.ckpt_dir, exist_ok=True)
        write_text_atomic(os.path.join(cfg.output_dir, "config.json"), json.dumps(cfg.summary(), indent=2) + "\n")
        self.runlog = RunLog(cfg, self.trainer.step)
        if cfg.log.progress:
            self.bar = tqdm(total=cfg.train.steps, initial=self.trainer.step, unit="it",
                            dynamic_ncols=True, file=sys.stderr)

    def record(self, metrics: dict, elapsed: float) -> None:
        """Rank 0: the log row, progress bar and sample of the step just done."""
        cfg, step = self.cfg, self.trainer.step
        metrics["time"] = elapsed
        if step % cfg.log.every == 0 or step == cfg.train.steps:
            self.runlog.write(step, metrics)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{metrics[k]:.4f}" for k in ("loss_d", "loss_mse", "loss_perceptual",
                                                                    "loss_gan")})
        if cfg.log.sample_every and step % cfg.log.sample_every == 0:
            save_sample(os.path.join(cfg.output_dir, "samples", f"step-{step:07d}.png"), self.trainer._last)

    def checkpoint(self) -> None:
        """Rank 0 writes the checkpoint; every rank waits for it."""
        if self.rank0:
            path = self.trainer.save(self.ckpt_dir)
            self.last_saved = self.trainer.step
            log.info("step %d: checkpoint %s", self.trainer.step, path)
        barrier(self.trainer.world)

    def evaluate(self) -> None:
        """Rank 0, every log.eval_every steps, after the checkpoint: a failing evaluation is
        logged and costs no training."""
        cfg, step = self.cfg, self.trainer.step
        if not (self.rank0 and cfg.log.eval_lr_folder and step % cfg.log.eval_every == 0):
            return
        try:
            self.runlog.write(step, run_eval(self.trainer, os.path.join(cfg.output_dir, "eval", f"step-{step:07d}")))
        except Exception as e:
            log.error("step %d: evaluation failed, training goes on: %s: %s", step, type(e).__name__, e)

    def finish(self) -> None:
        """Rank 0: a checkpoint of the last step unless just written; close the log."""
        if not self.rank0:
            return
        if self.last_saved != self.trainer.step:
            self.trainer.save(self.ckpt_dir)
        if self.bar is not None:
            self.bar.close()
        self.runlog.close()


def _loop(run: _Run, batches: Iterator[torch.Tensor], stop: StopSignal) -> None:
    """Steps until train.steps or a stop signal (then after a checkpoint, all ranks together)."""
    cfg, trainer = run.cfg, run.trainer
    t0 = time.time()
    while trainer.step < cfg.train.steps:
        metrics = trainer.train_step([next(batches) for _ in range(cfg.optim.grad_accum)])
        if run.rank0:
            run.record(metrics, time.time() - t0)
        stopping = any_rank(trainer.world, stop.signum is not None, trainer.device)
        step = trainer.step
        if stopping or step % cfg.log.checkpoint_every == 0 or step == cfg.train.steps:
            run.checkpoint()
        if stopping:
            log.warning("stopped by signal at step %d (checkpoint written); resume with --resume", step)
            break
        run.evaluate()


def _dump_rank_state(trainer: Trainer) -> None:
    """Tests: every rank's trainable state at the end, when D3SR_RANK_STATE_DIR is set."""
    dump = os.environ.get("D3SR_RANK_STATE_DIR")
    if dump:
        os.makedirs(dump, exist_ok=True)
        torch.save({"generator": trainer.G.state_dict(), "discriminator": trainer.D.state_dict(),
                    "step": trainer.step}, os.path.join(dump, f"rank{trainer.rank}.pt"))


def train(cfg: Config, resume: str | bool | None = None, stop: StopSignal | None = None) -> int:
    """Run (or resume: True for the newest intact checkpoint, or a path) training as configured;
    returns the process exit code. Raises ConfigError (and its kin) for a run that cannot start,
    StopRequested for a stop signal before the first step. `stop`: the caller's signal handling
    (the CLI installs it first thing); by default the run installs its own for its duration."""
    own = stop is None
    stop = StopSignal() if own else stop
    lock = RunLock(cfg.output_dir)
    try:
        return _train(cfg, resume, stop, lock)
    finally:
        stop.defer()  # a second signal while cleaning up must not interrupt the clean-up
        lock.release()
        if own:
            stop.restore()


def _train(cfg: Config, resume: str | bool | None, stop: StopSignal, lock: RunLock) -> int:
    rank, world, device = init_distributed(cfg)
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    found: dict = {}
    image_paths, resume_path = from_rank0(world, rank, lambda: _check_run(cfg, ckpt_dir, resume, lock, found))
    log.info("loading the models")
    trainer = Trainer(cfg, rank, world, device, image_paths=image_paths)
    _resume(trainer, resume, resume_path, found.get("state"), ckpt_dir)
    found.clear()
    check_same_step(world, trainer.step, device)
    batches = _batches(cfg, trainer)
    run = _Run(cfg, trainer, ckpt_dir)
    if run.rank0:
        run.start_outputs()
    stop.enter_loop()
    _loop(run, batches, stop)
    run.finish()
    _dump_rank_state(trainer)
    shutdown(world)
    return 0
