"""Shared fixtures: a real ComfyUI host (in-process and as an HTTP server) and model files
generated at test time from ComfyUI's own classes with seeded weights."""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# `make test` runs two pytest-xdist workers: each gets its share of the cores, and so do the
# processes its tests start (they inherit OMP_NUM_THREADS); two workers each on every core
# would spend the time contending for them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)

# glibc hands large freed blocks back to the kernel at once, and VMs with free-page reporting
# (Firecracker, as on the 2-core machines this suite is timed on) hand them on to the host:
# each later allocation of that memory then faults through the hypervisor (3-8 s per GB there,
# against 0.2-0.6 s for memory just freed: benchmarks/results/test_suite_cpu.md). The test
# processes and those they start (xdist workers, CLI, torchrun ranks, ComfyUI servers) keep
# freed memory for reuse instead.
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 << 30))
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(64 << 30))

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# The pack's folder after ComfyUI's, so ComfyUI's top-level `nodes` module is not shadowed
# by the pack's `nodes/` package.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from d3sr_core import host  # noqa: E402

sys.path.append(str(ROOT / "scripts"))
from comfy_server import ComfyServer  # noqa: E402

# `make test` hands whole files to its two workers (--dist loadfile) in collection order
# (--no-loadscope-reorder): the longest first, so that the run does not end with one worker
# alone on a long file. Longest first as measured under `make test` (2 workers on 2 cores,
# --durations=0 summed per file; the two files on one server count as one), except where a
# worker would wait for a generated file the other one is making: test_training_dists.py (no
# generated models) goes to the second worker while the first makes tiny-sd2, and the files on
# the server come after test_osediff.py has made tiny-sd2-clip. Files not named here follow in
# their usual order.
LONGEST_FILES_FIRST = [
    "test_training_options.py", "test_training_dists.py", "test_osediff.py", "test_server_e2e.py",
    "test_browser_ui.py", "test_training_loop.py", "test_training_gan_processes.py", "test_cli_torchrun.py",
    "test_tiling.py", "test_cli.py", "test_pipeline_reference.py", "test_training_evaluate.py",
    "test_training_real_layouts.py", "test_comfy_internals.py", "test_hostile_input.py",
]
# Files that share the session's ComfyUI server (the `server` fixture): one unit of work for
# pytest-xdist, so that one worker starts it, once.
ONE_SERVER_FILES = ("test_server_e2e.py", "test_browser_ui.py")


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadfile`, with ONE_SERVER_FILES in one unit (the first file's name)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class OneServerScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            folder, _, name = scope.rpartition("/")
            return f"{folder}/{ONE_SERVER_FILES[0]}" if name in ONE_SERVER_FILES else scope

    return OneServerScheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    """ComfyUI on the path with its CPU options, before any test module imports it; not in
    pytest-xdist's controller, which only hands tests to the workers (2 s of torch imports
    saved while the workers start)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    gc.disable()        # until the test modules are imported: see pytest_collection_finish
    host.import_comfy(cpu=True)
    if _WORKERS > 1:
        import torch

        torch.set_num_threads(_THREADS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: order in a file kept


def pytest_collection_finish(session: pytest.Session) -> None:
    """gc.freeze(): the ~430 k objects that importing torch, ComfyUI and the tests made live until
    the end, so the collector's full passes during the run skip them (measured over
    test_training_options.py: 3.0 -> 1.2 s of collections); then the collector, off since
    pytest_configure, comes back on (`pytest --collect-only`: 10.5 -> 8.1 s of CPU)."""
    gc.freeze()
    gc.enable()


def generated_once(tmp_path_factory, name: str, make: Callable[[str], object]) -> Path:
    """The file `name` that `make(path)` writes (atomically, the same bytes every time), made once
    per test run: under pytest-xdist by the first worker that asks, in the run's shared temporary
    folder, while the others wait on a lock and then reuse it. Tests only read it (hard links)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        path = tmp_path_factory.mktemp("generated") / name
        make(str(path))
        return path
    from filelock import FileLock
    shared = tmp_path_factory.getbasetemp().parent / "generated"   # this run's, for all workers
    shared.mkdir(exist_ok=True)
    path = shared / name
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            make(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_sd2_file(tmp_path_factory) -> Path:
    """The tiny SD2 checkpoint (synthetic.write_checkpoint with seed 0: UNet, full-size KL VAE,
    no text encoder), written once per session. models_dir and tiny_setup hold hard links to it;
    nothing may change it."""
    from devtools import synthetic
    return generated_once(tmp_path_factory, "tiny-sd2.safetensors",
                          lambda path: synthetic.write_checkpoint(path, seed=0))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tiny_sd2_file) -> Path:
    """A ComfyUI models folder: a tiny SD2 checkpoint, an SD1.x-shaped one, D3SR files at two
    timesteps (T_L 399 and 250), one whose layers do not match the tiny SD2 model, and an
    OSEDiff-format .pkl. The tiny SD2 checkpoint with a text encoder (tiny-sd2-clip) is added
    only when a test asks for it (the sd2_clip_file fixture)."""
    import torch
    from reference_osediff import make_osediff_dict

    from d3sr_core.weight_format import write_weights
    from devtools import synthetic

    root = tmp_path_factory.mktemp("models")
    for sub in ("checkpoints", "d3sr", "loras"):
        (root / sub).mkdir()
    tiny = root / "checkpoints" / "tiny-sd2.safetensors"
    os.link(tiny_sd2_file, tiny)
    torch.save(make_osediff_dict(str(tiny))[0], root / "d3sr" / "osediff-tiny.pkl")
    sd1 = generated_once(tmp_path_factory, "tiny-sd1.safetensors", lambda path: synthetic.write_checkpoint(
        path, unet_config=synthetic.TINY_SD1_UNET_CONFIG, seed=3))
    os.link(sd1, root / "checkpoints" / "tiny-sd1.safetensors")
    unet = synthetic.unet_layout(synthetic.TINY_SD2_UNET_CONFIG)
    for t, seed in ((399, 10), (250, 11)):
        w = synthetic.random_d3sr_weights(unet, timestep=t, seed=seed)
        write_weights(str(root / "d3sr" / f"tiny-t{t}.safetensors"), w)
        write_weights(str(root / "loras" / f"tiny-t{t}.safetensors"), w)
    deeper = synthetic.unet_layout(synthetic.TINY_SD2_3LEVEL_UNET_CONFIG)
    write_weights(str(root / "d3sr" / "other-layers.safetensors"),
                  synthetic.random_d3sr_weights(deeper, seed=12))
    return root


@pytest.fixture(scope="session")
def sd2_clip_file(tmp_path_factory, models_dir, tiny_sd2_file) -> Path:
    """models_dir's checkpoints/tiny-sd2-clip.safetensors: the tiny SD2 checkpoint plus a seeded
    full-size SD2 text encoder (the same file as synthetic.write_checkpoint(seed=0,
    text_encoder=True)). 354 M parameters to generate, so written only for the tests that ask."""
    from devtools import synthetic
    made = generated_once(tmp_path_factory, "tiny-sd2-clip.safetensors",
                          lambda path: synthetic.add_sd2_text_encoder(str(tiny_sd2_file), path, seed=0))
    path = models_dir / "checkpoints" / "tiny-sd2-clip.safetensors"
    os.link(made, path)
    return path


@pytest.fixture(scope="session")
def tiny_sd2(models_dir):
    """(ModelPatcher, VAE) of the tiny SD2 checkpoint, loaded with ComfyUI's checkpoint loader."""
    import comfy.sd
    model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(models_dir / "checkpoints" / "tiny-sd2.safetensors"))
    return model, vae


@pytest.fixture(scope="session")
def sd2_clip(sd2_clip_file):
    """ComfyUI's CLIP (SD2 text encoder, seeded weights) from tiny-sd2-clip, via the checkpoint loader."""
    import comfy.sd
    _model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(sd2_clip_file), output_model=False, output_vae=False)
    assert clip is not None
    return clip


def _file_stamps(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory, tiny_sd2_file):
    """devtools.tiny_setup's training set-up (4 images of 40 x 40), made once per session for
    the training tests, which only read it (every run writes under its own tmp_path; checked
    when the session ends). Its generator is a hard link to tiny_sd2_file: prepare_tiny_setup
    writes that same checkpoint (seed 0) and keeps an existing file."""
    from devtools.tiny_setup import prepare_tiny_setup
    root = tmp_path_factory.mktemp("tiny_setup")
    (root / "models").mkdir()
    os.link(tiny_sd2_file, root / "models" / "tiny-sd2.safetensors")
    paths = prepare_tiny_setup(str(root), images=4, size=40)
    assert os.path.samefile(paths["generator"], tiny_sd2_file)
    before = _file_stamps(root)
    yield paths
    assert _file_stamps(root) == before, "a test changed the shared training set-up (tiny_setup)"


@pytest.fixture(scope="session")
def server(models_dir, sd2_clip_file, tmp_path_factory):
    """A real ComfyUI server (the pinned host or $COMFYUI_PATH) with this pack loaded and, when
    comfyui-frontend-package is installed, the web page; over models_dir with tiny-sd2-clip (the
    OSEDiff workflow's checkpoint) and a second models folder, server.extra_models (checkpoints/,
    d3sr/, empty at first), where the browser tests link tiny models under the templates' own
    file names and remove when done. test_server_e2e.py and test_browser_ui.py share it: one server start
    (pytest_xdist_make_scheduler keeps the two files on one worker)."""
    work = tmp_path_factory.mktemp("server")
    extra = work / "extra_models"
    for sub in ("checkpoints", "d3sr"):
        (extra / sub).mkdir(parents=True)
    frontend = importlib.util.find_spec("comfyui_frontend_package") is not None
    srv = ComfyServer(host.find_comfyui(), ROOT, models_dir, work / "comfyui", frontend=frontend,
                      extra_models=extra)
    srv.start()
    yield srv
    srv.stop()


def pytest_report_header(config):
    return f"ComfyUI host: {host.find_comfyui()}"


os.environ.setdefault("D3SR_TEST", "1")
