"""Command line: upscale a file or a folder with ComfyUI as a library (no server).

  python -m d3sr_core --checkpoint v2-1_512-ema-pruned.safetensors \
      --weights d3sr_x4.safetensors --input photos/ --output upscaled/ [--factor 4]

Outputs are PNGs named like the inputs (inputs that share a name, a.png and a.jpg, keep their
extension in it: a_png.png, a_jpg.png), written atomically; existing files are kept unless
--overwrite, and an output that would replace an input (the input folder itself, or a path
that resolves to an input) is refused. Images that cannot be read are skipped and listed at the
end (exit status 1); bad options stop before any model loads (exit status 2).

Across GPUs and machines: `torchrun --nproc_per_node N [--nnodes M ...] -m d3sr_core ...` gives
input i (of the sorted list, names decided on the whole list) to rank i % world, each rank on
cuda:LOCAL_RANK (or the CPU); rank 0 shows the global progress and the summary.
Set COMFYUI_PATH to use your own ComfyUI (default: the pinned host in .host/).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from . import host
from .checks import check_factor, check_strength
from .distributed_run import Ranks, pick_device
from .image_io import IMAGE_EXTENSIONS, ImageReadError, is_image_file

EXIT_SOME_FAILED, EXIT_USAGE = 1, 2


class UsageError(Exception):
    """Options that cannot work; reported in one line before any model loads."""


def _checked(check: Callable[[float], float]) -> Callable[[str], float]:
    """An argparse type: a number that `check` accepts (its message otherwise)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m d3sr_core", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="SD2.1-base checkpoint file")
    p.add_argument("--weights", required=True, help="D3SR weight file (.safetensors)")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="output folder (not the input folder)")
    p.add_argument("--factor", type=_checked(check_factor), default=4.0,
                   help="upscale factor, 1..8 (default 4)")
    p.add_argument("--colour-fix", default="adain", choices=("adain", "wavelet", "none"))
    p.add_argument("--strength", type=_checked(check_strength), default=1.0,
                   help="LoRA strength (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    p.add_argument("--verbose", action="store_true", help="print each file as it is written")
    return p.parse_args(argv)


def list_inputs(path: str) -> list[str]:
    """The image files to process: `path` itself, or the images directly inside the folder."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if is_image_file(f) and os.path.isfile(os.path.join(path, f)))
        if files:
            return files
        raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
    raise UsageError(f"input {path} does not exist")


def output_names(inputs: list[str]) -> list[str]:
    """One PNG file name per input: `stem.png`, or `stem_ext.png` for inputs that share a stem.
    Names are compared ignoring case (as macOS and Windows file systems do); UsageError lists
    any clash that remains."""
    def key(name: str) -> str:
        return name.casefold()

    stems = [os.path.splitext(os.path.basename(p)) for p in inputs]
    count: dict[str, int] = {}
    for stem, _ext in stems:
        count[key(stem)] = count.get(key(stem), 0) + 1
    names = [f"{stem}_{ext.lstrip('.')}.png" if count[key(stem)] > 1 else f"{stem}.png"
             for stem, ext in stems]
    owners: dict[str, list[str]] = {}
    for path, name in zip(inputs, names):
        owners.setdefault(key(name), []).append(os.path.basename(path))
    clashes = [" and ".join(group) for group in owners.values() if len(group) > 1]
    if clashes:
        raise UsageError(f"{len(clashes)} output name(s) would be shared by several inputs "
                         f"({'; '.join(clashes[:5])}); rename those inputs")
    return names


def plan_outputs(inputs: list[str], output: str) -> list[tuple[str, str]]:
    """(input, output file) pairs; UsageError if the output is a file, is the folder an input
    comes from, or if an output path resolves to an input file (link, case-insensitive name)."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise UsageError(f"output {output} is a file; give a folder")
    out_dir = os.path.realpath(output)
    if any(os.path.realpath(os.path.dirname(os.path.abspath(p))) == out_dir for p in inputs):
        raise UsageError(f"output folder {output} is the folder the input images are in; their upscales "
                         "would sit among (and could replace) the originals. Choose another folder.")
    input_files = {(s.st_dev, s.st_ino): p for p in inputs for s in [os.stat(p)]}
    plan = [(p, os.path.join(output, name)) for p, name in zip(inputs, output_names(inputs))]
    for _src, target in plan:
        if os.path.exists(target):
            st = os.stat(target)
            victim = input_files.get((st.st_dev, st.st_ino))
            if victim is not None:
                raise UsageError(f"output {target} is the input {victim} (a link or the same file); "
                                 "choose another output folder")
    return plan


def _check_writable(folder: str) -> None:
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {folder} cannot be written ({existing} is not writable)")


def _error(message: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def _plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Every (input, output) pair of the whole job, before sharding, so names are the same
    whatever the number of ranks. UsageError for options or files that cannot work."""
    inputs = list_inputs(args.input)
    plan = plan_outputs(inputs, args.output)
    for f in (args.checkpoint, args.weights):
        if not os.path.isfile(f):
            raise UsageError(f"file not found: {f}")
    _check_writable(args.output)
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)   # --factor and --strength are checked here (exit 2), before anything loads
    try:
        ranks = Ranks.from_env()
    except ValueError as e:
        return _error(str(e))
    ranks.start()
    try:
        code = _run(args, ranks)
        # A barrier: rank 0 has printed everything before any rank exits (torchrun stops the
        # others when one exits non-zero), and only rank 0 carries the job's status.
        ranks.all_sum([0])
        return code if ranks.is_main else 0
    finally:
        ranks.close()


def _run(args: argparse.Namespace, ranks: Ranks) -> int:
    """Upscale this rank's share (input i goes to rank i % world); counts and failures are
    summed over the ranks and reported by rank 0."""
    plan, problem = [], None
    try:
        plan = _plan(args)
    except UsageError as e:
        problem = str(e)
    views = ranks.gather((problem, [dst for _src, dst in plan]))
    problems = list(dict.fromkeys(p for p, _ in views if p))   # the same message once
    if not problems and any(outputs != views[0][1] for _, outputs in views):
        problems = ["the ranks see different input files (" + ", ".join(
            f"rank {r}: {len(outputs)}" for r, (_, outputs) in enumerate(views)) + "); make the "
            "input folder the same for every rank and do not change it while the job starts"]
    if problems:
        if ranks.is_main:
            for p in problems:
                _error(p)
            sys.stderr.flush()
        return EXIT_USAGE
    indexed = ranks.shard(list(enumerate(plan)))
    todo = [(i, src, dst) for i, (src, dst) in indexed if args.overwrite or not os.path.exists(dst)]
    kept = ranks.all_sum([len(indexed) - len(todo)])[0]
    lengths = ranks.gather(len(todo))
    written, failed, fatal = 0, [], None   # failed: (input index, message)
    if todo:
        d3sr, fatal = _load(args, ranks)
    if ranks.all_sum([fatal is not None])[0] == 0:
        from tqdm import tqdm
        bar = tqdm(total=sum(lengths), desc="D3SR", unit="image",
                   disable=not ranks.is_main or sum(lengths) <= 1)
        for step in range(max(lengths)):   # every rank takes part in every step's count
            if step < len(todo):
                index, src, dst = todo[step]
                try:
                    fatal = _upscale_one(d3sr, args, src, dst)
                    if fatal is None:
                        written += 1
                        if args.verbose:
                            print(f"{ranks.prefix()}wrote {dst}", flush=True)
                except ImageReadError as e:
                    failed.append((index, str(e)))
            done_w, done_f, stop = ranks.all_sum([written, len(failed), fatal is not None])
            bar.update(done_w + done_f - bar.n)
            if stop:
                break
        bar.close()
    return _summary(args, ranks, kept, written, failed, fatal)


def _load(args: argparse.Namespace, ranks: Ranks) -> tuple[object, str | None]:
    """The D3SR model on this rank's device, or (None, the one-line reason it cannot load)."""
    try:
        cpu = pick_device(ranks, args.cpu)
    except ValueError as e:
        return None, str(e)
    host.import_comfy(cpu=cpu)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    import comfy.sd

    from .model import load_d3sr
    try:
        model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_clip=False)
        return load_d3sr(model, vae, args.weights, args.strength), None
    except (ValueError, RuntimeError, OSError) as e:   # the loaders' one-line messages
        return None, str(e)


def _upscale_one(d3sr: object, args: argparse.Namespace, src: str, dst: str) -> str | None:
    """Upscale `src` into `dst`; None when written, else the reason that stops the job (a model
    that gives NaN, a disk that cannot be written). ImageReadError for an unreadable input."""
    from .image_io import load_image, save_png_atomic
    from .pipeline import NonFiniteOutputError
    from .upscale import upscale

    image = load_image(src)
    try:
        save_png_atomic(upscale(d3sr, image, args.factor, args.colour_fix), dst)
    except NonFiniteOutputError as e:
        return f"{src}: {e}"
    except OSError as e:
        return f"cannot write {dst}: {e.strerror or e}"
    return None


def _summary(args: argparse.Namespace, ranks: Ranks, kept: int, written: int,
             failed: list[tuple[int, str]], fatal: str | None) -> int:
    """Rank 0 prints the job's totals, every unreadable input and every stopping error, and
    returns the job's exit status."""
    results = ranks.gather((written, failed, fatal))
    all_failed = sorted(f for _, fs, _ in results for f in fs)
    stops = [(r, why) for r, (_, _, why) in enumerate(results) if why]
    if ranks.is_main:
        total = sum(w for w, _, _ in results)
        per_rank = f" (per rank: {', '.join(str(w) for w, _, _ in results)})" if ranks.world > 1 else ""
        print(f"wrote {total} image(s) to {os.path.abspath(args.output)}{per_rank}"
              + (f"; kept {kept} existing (use --overwrite)" if kept else "")
              + (f"; skipped {len(all_failed)} unreadable" if all_failed else ""), flush=True)
        for r, why in stops:
            _error(f"{'rank ' + str(r) + ': ' if ranks.world > 1 else ''}{why}")
        if all_failed:
            print(f"error: {len(all_failed)} image(s) could not be read and were skipped:", file=sys.stderr)
            for _, reason in all_failed:
                print(f"  {reason}", file=sys.stderr)
        sys.stderr.flush()
    if stops:
        return EXIT_USAGE
    return EXIT_SOME_FAILED if all_failed else 0


if __name__ == "__main__":
    host.run_main(main)
