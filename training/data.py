"""HR image folders -> random crops, a resumable sharded sampler, the on-device degradation
and the training pair (the loss target and the LR made from it).

Crops are BCHW float in [0, 1], `crop` x `crop`. Every random choice is seeded from
(seed, epoch, image index), so the stream of batches is the same however many loader workers
run and wherever a resumed run starts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler, Sampler

from d3sr_core.image_io import IMAGE_EXTENSIONS, image_size, is_image_file, read_image

from .degradation import DegradationConfig, RealESRGANDegradation, usm_sharpen

log = logging.getLogger("d3sr.train")


class DataError(ValueError):
    """The training data cannot be used (empty or unreadable folder, images smaller than the crop)."""


def list_images(folders: list[str] | str) -> list[str]:
    """All image files (d3sr_core.image_io.IMAGE_EXTENSIONS) under `folders` (recursive, sorted;
    one string is one folder). Raises DataError for a missing folder or when nothing is found."""
    if isinstance(folders, str):
        folders = [folders]
    paths: list[str] = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise DataError(f"data folder not found: '{folder}' (data.folders in the config)")
        for root, _dirs, files in os.walk(folder, followlinks=True):
            paths += [os.path.join(root, f) for f in files if is_image_file(f)]
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(folders)}")
    return sorted(paths)


def scan_images(paths: list[str], crop: int) -> tuple[list[str], list[str]]:
    """Read every image header: returns (usable paths, unreadable paths). Unreadable files are
    skipped with a warning; any image smaller than `crop` on a side is a DataError (listing them)
    because a crop cannot be taken from it."""
    usable, unreadable, small = [], [], []
    for p in paths:
        try:
            w, h = image_size(p)
        except ValueError:  # image_io.ImageReadError
            unreadable.append(p)
            continue
        (small if min(w, h) < crop else usable).append(p if min(w, h) >= crop else f"{p} ({w}x{h})")
    if unreadable:
        log.warning("skipping %d unreadable image(s), e.g. %s", len(unreadable), unreadable[0])
    if small:
        raise DataError(f"{len(small)} image(s) are smaller than the {crop}x{crop} crop (e.g. "
                        f"{'; '.join(small[:3])}). Remove or upscale them, or lower train.crop.")
    if not usable:
        raise DataError(f"none of the {len(paths)} image file(s) could be read "
                        f"(e.g. {unreadable[0] if unreadable else '?'})")
    return usable, unreadable


class CropDataset(Dataset):
    """Item (index, seed) -> random `crop` x `crop` RGB crop [3, crop, crop] in [0, 1] of image
    `index` (read by d3sr_core.image_io, so 16-bit files keep their precision). An image that
    fails to load now is replaced by the next one (warned, counted)."""

    def __init__(self, paths: list[str], crop: int) -> None:
        self.paths, self.crop = list(paths), int(crop)
        self.failures = 0

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, path: str) -> np.ndarray:
        return read_image(path)

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        index, seed = item
        for attempt in range(len(self.paths)):
            path = self.paths[(index + attempt) % len(self.paths)]
            try:
                arr = self._load(path)
                break
            except Exception as e:
                self.failures += 1
                log.warning("skipping unreadable image %s (%s); %d so far in this worker", path, e, self.failures)
        else:
            raise DataError("no training image could be read")
        rng = np.random.default_rng(seed)
        h, w = arr.shape[:2]
        if min(h, w) < self.crop:
            raise DataError(f"{path} ({w}x{h}) is smaller than the {self.crop} crop")
        top = int(rng.integers(0, h - self.crop + 1))
        left = int(rng.integers(0, w - self.crop + 1))
        patch = arr[top: top + self.crop, left: left + self.crop]
        if rng.random() < 0.5:  # horizontal flip (ours; a common SR augmentation)
            patch = patch[:, ::-1]
        # clip: a float TIFF may hold values outside [0, 1]; 8- and 16-bit files never do
        return torch.from_numpy(np.ascontiguousarray(np.clip(patch, 0.0, 1.0))).permute(2, 0, 1)


class ResumableShardSampler(Sampler):
    """Endless stream of (index, crop seed) for one rank: epoch after epoch of torch's
    DistributedSampler (shuffled with seed + epoch, sharded across ranks), starting after
    `start` items this rank has already consumed (resume)."""

    def __init__(self, size: int, rank: int, world: int, seed: int, start: int = 0) -> None:
        self.size, self.rank, self.world, self.seed = size, rank, world, int(seed)
        self.per_rank = math.ceil(size / world)
        self.start = int(start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            shard = DistributedSampler(range(self.size), num_replicas=self.world, rank=self.rank,
                                       shuffle=True, seed=self.seed, drop_last=False)
            shard.set_epoch(epoch)
            for index in list(shard)[offset:]:
                yield index, (self.seed * 1_000_003 + epoch * 7_919 * self.size + index) % 2**63
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only needs it for len()
        return 2**62


def bicubic_degradation(scale: int) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """A plain degradation for tests and quick runs: antialiased bicubic / scale, quantised."""
    def degrade(hr: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        lr = F.interpolate(hr.float(), scale_factor=1.0 / scale, mode="bicubic", antialias=True)
        return (lr.clamp(0, 1) * 255).round() / 255
    return degrade


def make_degradation(name: str, scale: int, options=None) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """`degrade(hr BCHW [0,1], cpu generator) -> LR BCHW [0,1]` of size H/scale: 'realesrgan'
    (training.degradation, the paper's; `options` a DegradationConfig, default Real-ESRGAN's)
    or 'bicubic'."""
    if name == "bicubic":
        return bicubic_degradation(scale)
    return RealESRGANDegradation(dataclasses.replace(options or DegradationConfig(), scale=scale))


def training_pair(
    hr: torch.Tensor,
    degrade: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    generator: torch.Generator,
    usm_target: str = "sharpened",
    usm_weight: float = 0.5,
    usm_threshold: float = 10.0,
    usm_radius: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HR crops (B, 3, H, W) in [0, 1] -> (target, LR): the image the pixel and perceptual losses
    compare with, and the LR (B, 3, H/scale, W/scale) made from that same image by `degrade`.

    usm_target 'sharpened' (Real-ESRGAN's convention; the config's default, our choice): target =
    the unsharp-masked HR (``usm_sharpen`` with the given weight, threshold on the 0..255 scale and
    radius). 'none' (OSEDiff's): target = the HR itself. Either way the discriminator's real
    sample is the plain HR (the caller encodes `hr`, not the target). The mask is applied per
    crop (Real-ESRGAN sharpens the whole image before cropping; only the crop's outer 25 pixels,
    where the blur reflects at the border, can differ)."""
    if usm_target == "sharpened":
        target = usm_sharpen(hr, usm_weight, usm_threshold, usm_radius)
    elif usm_target == "none":
        target = hr
    else:
        raise ValueError(f"usm_target '{usm_target}' is not one of sharpened/none")
    return target, degrade(target, generator)
