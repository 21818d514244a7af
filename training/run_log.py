"""What a run writes besides checkpoints (rank 0): log.jsonl (+ TensorBoard) and sample PNGs."""

from __future__ import annotations

import json
import logging
import os

import torch

from d3sr_core.atomic_file import write_text_atomic
from d3sr_core.image_io import save_png_atomic

from .config import Config

log = logging.getLogger("d3sr.train")


class RunLog:
    """JSONL (always) + TensorBoard (when installed and enabled) on rank 0. On resume the rows
    after `resume_step` (the run will write them again) and rows cut off by a crash are dropped."""

    def __init__(self, cfg: Config, resume_step: int) -> None:
        self.path = os.path.join(cfg.output_dir, "log.jsonl")
        if os.path.exists(self.path):
            write_text_atomic(self.path, "".join(self._rows_up_to(resume_step)))
        self.tb = None
        if cfg.log.tensorboard:
            try:  # optional dependency
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))
            except ImportError:
                log.info("TensorBoard is not installed: logging to %s only", self.path)

    def _rows_up_to(self, step: int) -> list[str]:
        rows = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        rows.append(line if line.endswith("\n") else line + "\n")
                except ValueError:  # a row cut off by a crash
                    if line.strip():
                        log.warning("%s: skipping an unreadable row: %.60s", self.path, line)
        return rows

    def write(self, step: int, values: dict) -> None:
        """Append one row {"step": step, **values}; numbers also go to TensorBoard."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def save_sample(path: str, last: dict) -> None:
    """LR (bicubic-upsampled) | output | HR side by side (each [1, 3, H, W] in [0, 1]) as a PNG."""
    row = torch.cat([last["lr_up"][0], last["sr"][0], last["hr"][0]], dim=-1).clamp(0, 1)
    save_png_atomic(row.permute(1, 2, 0)[None].float(), path)
