"""MUSIQ, MANIQA and CLIPIQA through pyiqa, an optional extra of ``training.evaluate``.

The networks are pyiqa's; the weights never come from the network. Each metric is built with
pyiqa's ``pretrained=False`` (nothing is fetched), then loaded with our own
``torch.load(weights_only=True)`` (or safetensors) from a file the user names with
``--iqa-weights NAME=FILE`` or, failing that, from the file pyiqa itself would have downloaded
into its cache (``<torch hub dir>/pyiqa/`` and ``<torch hub dir>/clip/``, the hub dir being
``$TORCH_HOME/hub``, default ``~/.cache/torch/hub``):

=========  =================  ====================================  ===========================
column     pyiqa metric       file (cache name)                     layout
=========  =================  ====================================  ===========================
musiq      ``musiq``          ``pyiqa/musiq_koniq_ckpt-e95806b9.pth``  MUSIQ, KonIQ-10k head
maniqa     ``maniqa-pipal``   ``pyiqa/MANIQA_PIPAL-ae6d356b.pth``   MANIQA incl. its ViT-B/8
clipiqa    ``clipiqa``        ``clip/RN50.pt``                      OpenAI CLIP RN50
=========  =================  ====================================  ===========================

Two offline workarounds for pyiqa 0.1.16, both limited to building the metric:

- MANIQA's constructor calls ``timm.create_model('vit_base_patch8_224', pretrained=True)``
  whatever its own ``pretrained`` says, which downloads ImageNet ViT weights; the MANIQA file
  holds that ViT too, so the backbone is created with ``pretrained=False`` instead.
- CLIPIQA imports the ``clip`` package (openai-clip), which imports ``pkg_resources`` for
  ``pkg_resources.packaging``; setuptools >= 81 no longer ships ``pkg_resources``, so while
  ``clip`` is first imported a stand-in module offering ``packaging`` is present, then removed.

Scores are pyiqa's: input (1, 3, H, W) RGB in [0, 1], output one float (MUSIQ ~0..100,
MANIQA ~0..1, CLIPIQA 0..1; higher is better for all three).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import load_file

__all__ = ["NOREF_METRICS", "NoRefSpec", "build_metric", "default_weights_path", "parse_names",
           "parse_weights", "read_state_dict"]

PYIQA_INSTALL = ("pip install --no-deps pyiqa==0.1.16 timm==1.0.31 openai-clip==1.0.1 ftfy "
                 "wcwidth opencv-python-headless (see docs/evaluation.md)")


@dataclass(frozen=True)
class NoRefSpec:
    """One no-reference metric: our column name, pyiqa's metric name, the cached file."""

    name: str
    pyiqa_name: str
    cache_file: str  # relative to torch.hub.get_dir()
    layout: str


NOREF_METRICS: dict[str, NoRefSpec] = {
    "musiq": NoRefSpec("musiq", "musiq", "pyiqa/musiq_koniq_ckpt-e95806b9.pth", "pyiqa's MUSIQ (KonIQ-10k)"),
    "maniqa": NoRefSpec("maniqa", "maniqa-pipal", "pyiqa/MANIQA_PIPAL-ae6d356b.pth", "pyiqa's MANIQA (PIPAL)"),
    "clipiqa": NoRefSpec("clipiqa", "clipiqa", "clip/RN50.pt", "OpenAI CLIP RN50"),
}


class WeightsError(ValueError):
    """A weight file that cannot be read or does not fit the metric's layout."""


def parse_names(text: str) -> list[str]:
    """``'musiq,maniqa'`` -> ``['musiq', 'maniqa']`` (order kept, duplicates dropped).
    Raises ValueError (one line) for a name that is not one of :data:`NOREF_METRICS`."""
    names: list[str] = []
    for part in text.split(","):
        name = part.strip().lower()
        if not name:
            continue
        if name not in NOREF_METRICS:
            raise ValueError(f"--no-reference: unknown metric {name!r}; choose from {','.join(NOREF_METRICS)}")
        if name not in names:
            names.append(name)
    return names


def parse_weights(text: str) -> dict[str, Path]:
    """``'musiq=/a.pth,clipiqa=/b.pt'`` -> {name: path}. Raises ValueError (one line) for a
    malformed entry, an unknown name or a path that is not a file."""
    weights: dict[str, Path] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, path = part.partition("=")
        name = name.strip().lower()
        if not sep or not path.strip():
            raise ValueError(f"--iqa-weights: {part.strip()!r} is not NAME=FILE (e.g. musiq=/path/musiq.pth)")
        if name not in NOREF_METRICS:
            raise ValueError(f"--iqa-weights: unknown metric {name!r}; choose from {','.join(NOREF_METRICS)}")
        file = Path(path.strip()).expanduser()
        if not file.is_file():
            raise ValueError(f"--iqa-weights: {name} file {file} does not exist or is not a file")
        weights[name] = file
    return weights


def default_weights_path(name: str) -> Path:
    """Where pyiqa (or its CLIP loader) keeps the file of metric ``name`` once downloaded."""
    return Path(torch.hub.get_dir()) / NOREF_METRICS[name].cache_file


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a weights-only torch file; a ``params`` entry
    (pyiqa's training checkpoints) is unwrapped and a ``module.`` prefix dropped.
    Raises WeightsError (one line) when the file is not a plain state dict."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure means the same to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f"{path} cannot be read as a weights-only state dict ({first[:200]})") from None
    if isinstance(state, Mapping) and isinstance(state.get("params"), Mapping):
        state = state["params"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds no state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


def _load_strict(net: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, layout: str) -> None:
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        example = (missing or unexpected or wrong)[0]
        raise WeightsError(f"{path} does not fit {layout}: {len(missing)} missing, {len(unexpected)} "
                           f"unexpected, {len(wrong)} mis-shaped tensor(s), e.g. {example}")
    net.load_state_dict(state, strict=True)


def _clip_backbone_from_file(path: Path) -> contextlib.AbstractContextManager:
    """While CLIPIQA is built, its CLIP backbone comes from ``path``: OpenAI's TorchScript
    archive (the file pyiqa caches) or a weights-only state dict. pyiqa's own loader tries
    TorchScript and then reads the same, already consumed, file handle again (EOFError)."""
    from pyiqa.archs import clip_model, clipiqa_arch

    def load(_backbone: str, device: str = "cpu", **_kwargs) -> torch.nn.Module:
        try:
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError:
            state = read_state_dict(path)
        return clip_model.build_model(state).float().to(device)

    return mock.patch.object(clipiqa_arch, "load", load)


def _timm_backbone_not_downloaded() -> contextlib.AbstractContextManager:
    """While MANIQA is built, timm.create_model ignores ``pretrained=True`` (see module doc)."""
    import timm

    original = timm.create_model

    def create_model(*args, **kwargs):
        kwargs["pretrained"] = False
        return original(*args, **kwargs)

    return mock.patch.object(timm, "create_model", create_model)


@contextlib.contextmanager
def _pkg_resources_for_clip() -> Iterator[None]:
    """A stand-in ``pkg_resources`` (only ``packaging``) while openai-clip is first imported."""
    if "clip" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        yield
        return
    import packaging.version

    shim = types.ModuleType("pkg_resources")
    shim.packaging = packaging  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = shim
    try:
        yield
    finally:
        if sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]


def _import_pyiqa():
    """pyiqa, or raise ImportError with a one-line reason."""
    if importlib.util.find_spec("pyiqa") is None:
        raise ImportError(f"pyiqa is not installed ({PYIQA_INSTALL})")
    try:
        import pyiqa
    except ImportError as err:
        raise ImportError(f"pyiqa cannot be imported: {err} ({PYIQA_INSTALL})") from None
    return pyiqa


def build_metric(name: str, weights: Path | None = None, device: str | torch.device = "cpu"
                 ) -> tuple[Callable[[torch.Tensor], float] | None, str]:
    """(score function, "") for metric ``name`` with its weights from ``weights`` or pyiqa's
    cache, or (None, one-line reason it cannot be computed). The function takes a
    (1, 3, H, W) RGB tensor in [0, 1] on ``device`` and returns a float. Never downloads."""
    spec = NOREF_METRICS[name]
    path = weights if weights is not None else default_weights_path(name)
    if not path.is_file():
        return None, (f"no weights: pass --iqa-weights {name}=FILE ({spec.layout}) or put "
                      f"{Path(spec.cache_file).name} in {path.parent}; pyiqa would download it, "
                      "which this command never does")
    try:
        pyiqa = _import_pyiqa()
    except ImportError as err:
        return None, str(err)
    dev = torch.device(device)
    try:
        if name == "clipiqa":
            # The backbone is our file, read by _clip_backbone_from_file: no download, no hash check.
            with _pkg_resources_for_clip(), _clip_backbone_from_file(path):
                metric = pyiqa.create_metric(spec.pyiqa_name, device=dev, backbone=str(path))
        else:
            state = read_state_dict(path)
            context = _timm_backbone_not_downloaded() if name == "maniqa" else contextlib.nullcontext()
            with context:
                metric = pyiqa.create_metric(spec.pyiqa_name, device=dev, pretrained=False)
            _load_strict(metric.net, state, path, spec.layout)
    except WeightsError as err:
        return None, str(err)
    except Exception as err:  # noqa: BLE001 - pyiqa / CLIP loader failures on a foreign file
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        return None, f"{path} could not be loaded as {spec.layout}: {type(err).__name__} {first}".rstrip()
    metric.eval()

    def score(image: torch.Tensor) -> float:
        with torch.no_grad():
            return float(metric(image.clamp(0, 1)).reshape(-1)[0])

    return score, ""
