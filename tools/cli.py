"""What every run.py and tool shares: flags (README.md), input and model loading, one-line errors.

Exit status: 0 done, 2 the command line or an input file is wrong, 1 the run failed (loading, memory, writing), 130
interrupted. Unexpected exceptions keep their traceback: they are bugs."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import logging
import math
import os
import re
import shlex
import sys
import warnings
from pathlib import Path, PurePath
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tools.feather import feathered_mask

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "assets"
EXAMPLE_IMAGE = ASSETS / "input.jpg"
EXAMPLE_MAP = ASSETS / "map_gradient.png"
EXAMPLE_PROMPT = ASSETS / "prompt.txt"
EXAMPLE_NEGATIVE_PROMPT = ASSETS / "negative_prompt.txt"

SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
              "dpm++": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler", "pndm": "PNDMScheduler",
              "ddpm": "DDPMScheduler"}  # --scheduler names and the diffusers classes they stand for
MAX_STEPS = 1000  # every model here was trained on a 1000-step schedule; schedulers refuse more
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes
MAX_FEATHER_PX = 100_000  # far beyond any image side; only guards against typos such as 1e9
MAX_SIDE = 8192  # the largest image side any model here works at
PATCH_SIDE = 16  # a flow family's transformer takes 2x2 patches of latents of the VAE's 8 pixels
CACHES = ("fbc", "taylorseer", "magcache", "fastercache", "pab")  # --cache: diffusers' caches (tools/caching.py)

EXIT_USAGE, EXIT_RUN_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class CliError(Exception):
    """A failure the user can fix. ``main`` prints its message as one line and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code  # pickled with the message: tools.batch passes the error between processes


# Library messages about what our code has in hand, which would break the README's promise that stderr holds only
# progress bars and our own lines: by logger, and by warning category, each with the start of its text.
QUIET_LOGS = {
    # stock SDXL casts its VAE with `.to(dtype=)`; diffusers then warns even when no module is to stay in float32
    "diffusers.models.modeling_utils": "There are modules in AutoencoderKL that should be kept in float32: [].",
    # Qwen-Image/run.py's help says that --guidance-scale 1 or less turns guidance, and so the negative prompt, off
    "diffusers.pipelines.qwenimage.pipeline_qwenimage_img2img": " negative_prompt is passed but classifier-free",
}
QUIET_WARNINGS = [(FutureWarning, "`FluxPosEmbed` is deprecated")]  # stock Chroma's transformer imports it the old way


@contextlib.contextmanager
def quiet_library_messages():
    """Silences exactly ``QUIET_LOGS`` and ``QUIET_WARNINGS`` while the block runs."""
    quiet = {name: (logging.getLogger(name), lambda record, start=start: not record.getMessage().startswith(start))
             for name, start in QUIET_LOGS.items()}
    with warnings.catch_warnings():
        for category, start in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", f"{re.escape(start)}", category)
        for logger, keep in quiet.values():
            logger.addFilter(keep)
        try:
            yield
        finally:
            for logger, keep in quiet.values():
                logger.removeFilter(keep)


def main(run: Callable[[], int | None]) -> None:
    """Runs ``run()`` and exits with its status; known failures end as one line on stderr, never a traceback."""
    try:
        with quiet_library_messages():
            sys.exit(run() or 0)
    except CliError as error:
        message, code = error, error.exit_code
    except KeyboardInterrupt:
        message, code = "interrupted", EXIT_INTERRUPTED
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(error, MemoryError) and "out of memory" not in str(error):
            raise
        message, code = "out of memory: try a smaller image, --offload or --dtype fp16", EXIT_RUN_FAILED
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


def warn(message: str) -> None:
    print(f"warning: {one_line(message)}", file=sys.stderr)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def display(path: PurePath | str) -> str:
    """A path as the user would type it: relative to the current folder when it lies below it."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class Example(NamedTuple):
    """The inputs a run.py takes when their flags are not given: paths, and a prompt's text or a file holding it."""
    image: Path
    map: Path
    prompt: str | PurePath
    negative_prompt: str | PurePath


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line ``CliError``s, holding what ``parse_args`` needs beyond the flags.
    ``checks`` are a model's checks of flags that go together: every parse runs them, in run.py and tools.batch."""

    def __init__(self, *args, example: Example | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.checks: list[Callable[[argparse.Namespace], None]] = []
        self.example = example
        self.default_output = Path("output.png")  # taken, or the first free name like it, when --output is not given
        self.output_holds = "the parameters are stored as PNG text"  # why --output must end as default_output does
        self.map_input = input_path  # checks --map's path; a model whose maps are not one image (a video's) replaces it
        self.extra_outputs = lambda args, output: []  # the files that a model writes beside the output: [paths]
        # build_parser's flags by dest, and groups by title, for a model to reword their help and add flags to them
        self.common_flags: dict[str, argparse.Action] = {}
        self.groups = {}

    def error(self, message: str):
        raise CliError(f"{message} (see --help)")

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        for check in self.checks:
            check(parsed)
        return parsed, rest


class Args(argparse.Namespace):
    """A parsed command line: the parser's flags, and ``command``, the command line that the PNG text records."""
    command: str = ""


def real_number(low: float, high: float = math.inf, *, whole: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` for finite numbers (with ``whole``: ``int``s) from ``low`` to ``high`` (default: none)."""
    bounds = f"a number from {low:g} to {high:g}" if high < math.inf else (
        f"a number of at least {low:g}" if low > -math.inf else "a finite number")
    wanted = f"a whole number from {low} to {high}" if whole else bounds

    def parse(text: str) -> float:
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            value = None
        if value is None or not (low <= value <= high and math.isfinite(value)):  # in this order: a huge int has
            # no float. float() reads "nan" and "inf", which no flag takes: "got 'nan'" alone would read as our slip.
            odd = isinstance(value, float) and not math.isfinite(value)
            why = "; NaN and infinity are not numbers it takes" if odd else ""
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}{why}")
        return value
    return parse


whole_number = functools.partial(real_number, whole=True)  # whole_number(low, high): the same for ints

# The types of the shared flags that take a number, by dest: tools.batch checks a jobs file's cells with them.
NUMBER_TYPES = {"feather": real_number(0, MAX_FEATHER_PX), "grow": real_number(0, MAX_FEATHER_PX),
                "steps": whole_number(1, MAX_STEPS), "guidance_scale": real_number(0), "strength": real_number(0, 1),
                "seed": whole_number(0, MAX_SEED)}


def build_parser(description: str, *, default_model: str, default_steps: int, default_guidance: float,
                 default_image: str | PurePath = EXAMPLE_IMAGE, default_map: str | PurePath = EXAMPLE_MAP,
                 default_prompt: str | PurePath = EXAMPLE_PROMPT,
                 default_negative_prompt: str | PurePath = EXAMPLE_NEGATIVE_PROMPT) -> Parser:
    """The flags every run.py shares; a model adds its own. Reads no file, so ``--help`` works without the example: a
    prompt default given as a ``Path`` is read when the flag is not given."""
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog="Map convention: white (1) keeps a pixel, black (0) changes it fully;\na pixel's strength "
                    "is --strength * (1 - map).\nExit status: 0 done, 1 the run failed, 2 bad arguments or input "
                    "files, 130 interrupted.", example=Example(Path(default_image), Path(default_map), default_prompt,
                                                               default_negative_prompt))

    def group(title: str):  # add_argument of a new group; the parser keeps the group and every action it adds
        parser.groups[title] = parser.add_argument_group(title)

        def add(*names, **options) -> None:
            action = parser.groups[title].add_argument(*names, **options)
            parser.common_flags[action.dest] = action
        return add

    text = lambda default: f"the text in {display(default)}" if isinstance(default, PurePath) else (  # noqa: E731
        repr(default) if default else "none")
    add = group("inputs")
    add("--image", metavar="PATH", help=f"image to edit, any format Pillow reads (default: {display(default_image)})")
    add("--map", metavar="PATH", help="grayscale map of each pixel's strength: white keeps, black changes fully; "
        f"8-bit, 16-bit and float maps keep their precision (default: {display(default_map)})")
    add("--invert-map", action="store_true", help="white changes, black keeps, as in inpainting masks (default: off)")
    add("--mask", metavar="PATH", help="soft inpainting instead of --map: white (half its range and up) is the "
        "region to fill, feathered into a map by --feather and --grow (default: none)")
    add("--feather", type=NUMBER_TYPES["feather"], default=0.0, metavar="PX", help="with --mask: width in image "
        "pixels of the band over which the strength fades from 1 to 0; 0 is a hard mask (default: 0)")
    add("--grow", type=NUMBER_TYPES["grow"], default=0.0, metavar="PX", help="with --mask: first grow the region by "
        "this many image pixels, so the fill covers its seam (default: 0)")
    add("--prompt", metavar="TEXT", help=f"what the edited image should show (default: {text(default_prompt)})")
    add("--negative-prompt", metavar="TEXT", help=f"what it should not show (default: {text(default_negative_prompt)})")
    add = group("sampling")
    add("--steps", type=NUMBER_TYPES["steps"], default=default_steps, metavar="N", help=f"denoising steps, 1 to "
        f"{MAX_STEPS}; pixels of less strength run fewer of them (default: {default_steps})")
    add("--guidance-scale", type=NUMBER_TYPES["guidance_scale"], default=default_guidance, metavar="G",
        help=f"classifier-free guidance scale; 1 or less turns it off (default: {default_guidance:g})")
    add("--strength", type=NUMBER_TYPES["strength"], default=1.0, metavar="S", help="scales every pixel's strength, "
        "0 to 1; 0 returns the input (default: 1)")
    add("--seed", type=NUMBER_TYPES["seed"], default=0, metavar="N", help="random seed, 0 to 2**64-1 (default: 0)")
    add("--scheduler", choices=["default", *SCHEDULERS], default="default", help="sampler: 'default' keeps the "
        "model's own; dpm++ is DPM-Solver++ multistep, euler-a Euler ancestral (default: default)")
    add("--keep-exact", action="store_true", help="copy the input's own pixels back where the strength is 0 (and "
        "blend them below one step) instead of their lossy round trip (default: off, as in the paper)")
    add("--crop-margin", type=whole_number(0, MAX_SIDE), metavar="PX", help="edit only the box around the pixels "
        "the map changes, grown by PX pixels of context, and paste it into the input: a small change costs a small "
        "crop; best with --keep-exact (default: off, the whole frame)")
    add("--crop-upscale", action="store_true", help="with --crop-margin: edit the crop at the model's native size "
        "for more detail, then scale it back down (default: off)")

    add = group("speed")  # tools/caching.py turns them on
    add("--cache", choices=CACHES, help="reuse the transformer's work between steps with a diffusers cache: fbc "
        "(FirstBlockCache), taylorseer, magcache (FLUX.1's table), fastercache, pab (Pyramid Attention Broadcast); "
        "the whole transformer still runs on every step that releases pixels. FLUX.1, Chroma, Qwen-Image, FLUX.2 "
        "and their edit models (default: none)")
    add("--cache-threshold", type=real_number(0), metavar="T", help="with --cache fbc or magcache: how much change "
        "a reuse may skip; 0 reuses nothing (default: 0.08 for fbc, 0.06 for magcache)")
    add("--compile", action="store_true", help="torch.compile the denoiser: the first step compiles for a while, "
        "then steps run faster; each new image size compiles again (default: off)")

    def check_pairs(args: argparse.Namespace) -> None:  # a check, so that tools.batch refuses them too
        if args.crop_upscale and args.crop_margin is None:
            raise CliError("--crop-upscale scales the crop that --crop-margin makes; pass --crop-margin PX too, or "
                           "drop it")
        if args.cache_threshold is not None and args.cache not in ("fbc", "magcache"):
            raise CliError("--cache-threshold sets --cache fbc or magcache; pass one of them, or drop it")
    parser.checks.append(check_pairs)
    add = group("model and hardware")
    add("--model", default=default_model, metavar="ID_OR_PATH", help="Hugging Face Hub id, or a local diffusers "
        f"folder holding model_index.json (default: {default_model})")
    add("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto", help="auto picks CUDA, then Apple MPS, "
        "then the CPU (default: auto)")
    add("--dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto", help="auto is fp16 on CUDA and MPS, "
        "fp32 on the CPU, which runs only fp32 (default: auto)")
    add("--offload", action="store_true", help="keep each model on the CPU until it runs, for GPUs with little "
        "memory; needs CUDA or MPS (default: off)")
    add = group("output")
    add("--output", metavar="PATH.png", help="PNG to write, with the parameters as PNG text (default: the first "
        "free output.png, output-1.png, ... here)")
    add("--overwrite", action="store_true", help="replace an existing --output; inputs never (default: off)")
    add("--compare", action="store_true", help="also write <output>-compare.png: input | map | output (default: off)")
    return parser


def parse_args(parser: Parser, argv: list[str] | None = None, *, command: str | None = None) -> Args:
    """Parses ``argv`` (default: the command line), checks all that needs no model and fills in what defaults stand
    for: prompt texts, input and output paths, device and dtype. The results record ``command`` as the command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, example = parser.parse_args(argv, Args()), parser.example
    args.command = command or command_line(["python", display(sys.argv[0])], parser, args)  # the values as given
    if args.mask is None and (args.feather or args.grow):
        raise CliError(f"--{'feather' if args.feather else 'grow'} shapes the map drawn from a --mask; pass --mask "
                       "PATH too, or drop it")
    if args.mask is None:
        args.map = parser.map_input(args.map, example.map, "--map")
    elif args.map is not None:
        raise CliError("--map and --mask are alternatives: --map gives the strengths directly, --mask draws them "
                       "from an inpainting mask; pass only one")
    elif args.invert_map:
        raise CliError("--invert-map reads a --map the other way round; a --mask is always white = fill, so drop "
                       "--invert-map (or invert the mask image)")
    else:
        args.mask = input_path(args.mask, None, "--mask")
    args.image = input_path(args.image, example.image, "--image")
    given_prompt, args.prompt = args.prompt, text_argument(args.prompt, example.prompt, "--prompt")
    args.negative_prompt = text_argument(args.negative_prompt, example.negative_prompt, "--negative-prompt")
    check_prompts(args.prompt, args.negative_prompt)
    args.output = _output_path(args, parser)
    resolve_device(args)
    if not args.prompt.strip() and given_prompt != "":  # `--prompt ""` is a choice; a blank prompt file is a slip
        warn(f"the prompt{'' if given_prompt else ' file'} is blank, so the edit follows no text; pass --prompt TEXT")
    return args


UNRECORDED = ("help", "output", "overwrite", "compare")  # where and whether to write, not what is written


def command_line(prog: list[str], parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The shell command that makes ``args``'s result again: ``prog`` and every flag of ``parser`` not at its default
    but those that say only where to write; a value that starts with "-" as ``--flag=-x``, lest it read as a flag."""
    words = list(prog)
    for action in parser._actions:
        value = getattr(args, action.dest, action.default)
        if action.option_strings and action.dest not in UNRECORDED and value != action.default:
            flag = action.option_strings[-1]
            if action.nargs == 0 and value == action.const:  # store_true and its kind: the flag alone
                words.append(flag)
            for item in [] if action.nargs == 0 else value if isinstance(value, list) else [value]:  # `append`: each
                words += [f"{flag}={item}"] if str(item).startswith("-") else [flag, str(item)]
    return shlex.join(words)


def input_path(given: str | None, example: Path | None, flag: str) -> Path:
    """The path of an input image (``example`` when not given), checked to be a readable image by its header."""
    if given is None and not example.is_file():
        raise CliError(f"the example {flag[2:]} {display(example)} is missing; pass {flag} PATH")
    path = example if given is None else Path(given).expanduser()
    with reading(path, flag):
        open_image(path).close()
    if path in _piped:  # `--map <(...)`: gone once read, so the command that the PNG records cannot remake the result
        warn(f"{flag} {display(path)} is a pipe: the command recorded in the result cannot read it again; save the "
             f"{flag[2:]} to a file and pass that to make the result again")
    return path


_piped: dict[Path, bytes] = {}  # the inputs that are not regular files, by path, as read the first time


def open_image(path: Path) -> Image.Image:
    """``Image.open(path)``, reading a pipe or FIFO (``--map <(...)``) once into memory: its data can be read only
    once, and opening it again would find nothing, or wait forever for another writer."""
    if path not in _piped and path.exists() and not path.is_file() and not path.is_dir():
        with open(path, "rb") as file:
            _piped[path] = file.read()
    with warnings.catch_warnings():  # a large image's two-line bomb warning: too large ends as our one line instead
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(_piped[path]) if path in _piped else path)


def text_argument(given: str | None, default: str | PurePath, flag: str) -> str:
    """``given``, else ``default``: the text itself, or a file whose text it reads, stripped."""
    if given is not None or not isinstance(default, PurePath):
        return default if given is None else given
    try:
        return Path(default).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise CliError(f"cannot read {display(default)} ({one_line(error)}); pass {flag} TEXT") from None


def not_utf8(text: str | None) -> str | None:
    """What keeps ``text`` from being UTF-8, or None. Python hands a command line's invalid bytes over as lone
    surrogates, and JSON can spell them; the tokenizers would fail on them with a traceback."""
    try:
        (text or "").encode("utf-8")
        return None
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        what = (f"the byte 0x{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF  # how Python keeps an invalid byte
                else f"a lone surrogate (U+{code:04X})")
        return f"character {error.start + 1} is {what}, which is not UTF-8 text; give the text in UTF-8"


def check_prompts(prompt: str | None, negative_prompt: str | None,
                  names: tuple[str, str] = ("--prompt", "--negative-prompt")) -> None:
    """Both prompts as UTF-8 text, or one line naming the one that is not (``names``: the caller's words for them)."""
    for text, name in zip((prompt, negative_prompt), names):
        if problem := not_utf8(text):
            raise CliError(f"{name}: {problem}")


def resolve_device(args: argparse.Namespace) -> None:
    """Resolves ``--device`` and ``--dtype``: auto picks CUDA, then Apple MPS, in fp16, then the CPU in fp32."""
    import torch
    if args.offload and args.device == "cpu":
        raise CliError("--offload moves each model onto the GPU only while it runs; it needs --device cuda or mps")
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if args.device == "auto":
        args.device = next(device for device, there in available.items() if there)
    elif not available[args.device]:
        raise CliError(f"--device {args.device}: not available here; use --device auto or cpu")
    if args.dtype == "auto":
        args.dtype = "fp32" if args.device == "cpu" else "fp16"
    if args.device == "cpu" and args.dtype != "fp32":
        raise CliError(f"--dtype {args.dtype} does not run on the CPU; use --dtype fp32 (or --dtype auto)")


def torch_dtype(name: str):
    """The torch dtype of a ``--dtype`` that ``resolve_device`` resolved: fp16, bf16 or fp32."""
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def compare_path(output: Path) -> Path:
    """Where ``--compare`` writes its strip for ``output``."""
    return output.with_name(f"{output.stem}-compare{output.suffix}")


def first_free(path: Path, companions: Callable[[Path], list[Path]] = lambda path: []) -> Path:
    """``path``, or the first ``<stem>-1.png``, ``<stem>-2.png``... that is free, together with its companions."""
    for number in itertools.count():
        candidate = path if number == 0 else path.with_name(f"{path.stem}-{number}{path.suffix}")
        if not any(target.exists() for target in [candidate, *companions(candidate)]):
            return candidate


def check_output(path: Path, inputs: dict[str, Path | None], *, overwrite: bool, flag: str = "--output") -> None:
    """Refuses ``path`` when it is one of ``inputs`` ({flag: path}), or exists and ``overwrite`` is off."""
    for input_flag, source in inputs.items():
        if source is not None and path.exists() and Path(source).exists() and os.path.samefile(path, source):
            raise CliError(f"{flag} {display(path)} is the {input_flag} file; inputs are never overwritten")
    if path.exists() and not overwrite:
        raise CliError(f"{display(path)} already exists; pass --overwrite to replace it, or another {flag}")


def _output_path(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    def companions(output: Path) -> list[Path]:
        return ([compare_path(output)] if args.compare else []) + list(parser.extra_outputs(args, output))
    if args.output is None:
        return first_free(parser.default_output, companions)
    output = Path(args.output).expanduser()
    suffix = parser.default_output.suffix
    if output.is_dir() or output.suffix.lower() != suffix:
        raise CliError(f"--output {args.output}: give a file name ending with {suffix} ({parser.output_holds})")
    if not os.access(output.parent, os.W_OK):
        raise CliError(f"--output: the folder {display(output.parent)} does not exist or is not writable")
    for target in [output, *companions(output)]:
        check_output(target, {"--image": args.image, "--map": args.map, "--mask": args.mask}, overwrite=args.overwrite)
    return output


@contextlib.contextmanager
def reading(path: Path, flag: str):
    """Turns the file system's and Pillow's failures while reading ``path`` into one-line errors naming ``flag``."""
    try:
        yield
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # Pillow raises all of these
        reason = {FileNotFoundError: "no such file", IsADirectoryError: "is a folder, not an image file",
                  UnidentifiedImageError: "not an image (Pillow cannot read this file)",
                  Image.DecompressionBombError: "too large to load safely"}.get(type(error))
        raise CliError(f"{flag} {display(path)}: {reason or 'cannot read it: ' + one_line(error)}") from None


def read_image(path: Path, flag: str, *, gray: bool = False) -> Image.Image:
    """The image at ``path``, decoded and upright by its EXIF orientation: a map is drawn on the photo as shown.
    ``gray`` (a map or mask) refuses what its gray values alone would misread: transparency and animation."""
    with reading(path, flag), open_image(path) as opened:
        opened.load()  # a truncated file fails here, while we can still name it
        if gray and getattr(opened, "n_frames", 1) > 1:
            raise CliError(f"{flag} {display(path)}: has {opened.n_frames} frames, and a map is one image; save the "
                           "frame you mean as a PNG")
        # Transparent pixels are mostly black underneath, so a map painted with transparency would change them
        # fully. Which strength transparency means is the painter's choice, so it is refused, not guessed.
        if gray and (opened.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in opened.info) and \
                opened.convert("RGBA").getchannel("A").getextrema()[0] < 255:
            raise CliError(f"{flag} {display(path)}: has transparent pixels, and only its gray values count; fill "
                           "them (white keeps, black changes) and save it without transparency")
        return ImageOps.exif_transpose(opened)


def map_values(image: Image.Image, what: str = "the map") -> np.ndarray:
    """An image's gray values in [0, 1] (float32, height x width), exactly as every pipeline's ``map_to_tensor``."""
    from SD2.diff_pipe import map_to_tensor
    try:
        return map_to_tensor(image)[0, 0].numpy().astype(np.float32)
    except ValueError as error:
        raise CliError(f"{what}: {one_line(error).replace('`', '')}") from None


def load_map(path: Path, flag: str = "--map") -> Image.Image:
    """The map at ``path``, checked; gray as it is (16-bit and float maps keep their precision), colour as luminance."""
    image = read_image(path, flag, gray=True)
    map_values(image, f"{flag} {display(path)}")
    return image if image.mode in ("1", "L", "I", "F") or image.mode.startswith("I;16") else image.convert("L")


def as_rgb(image: Image.Image, what: str = "the image") -> Image.Image:
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # Pillow would clip these to 0..255, not scale
        image = Image.fromarray(np.round(map_values(image, what) * 255).astype(np.uint8))
    return image.convert("RGB")


def load_inputs(args: argparse.Namespace) -> tuple[Image.Image, Image.Image]:
    """``(image, map)``: ``args.image`` as upright RGB, and ``args.map`` or the keep map of ``args.mask``. A map or
    mask of another shape is stretched to the image, with a warning."""
    image = as_rgb(read_image(args.image, "--image"), f"--image {display(args.image)}")
    what, source = (("mask", read_image(args.mask, "--mask", gray=True)) if args.mask is not None
                    else ("map", load_map(args.map)))
    if aspect_differs(image.size, source.size):
        warn(f"the {what} ({source.width}x{source.height}) has another shape than the image ({image.width}x"
             f"{image.height}); it is stretched to fit")
    if args.mask is not None:
        return image, mask_to_keep_map(source, image.size, args.feather, args.grow, shown=display(args.mask))
    return image, stretch_map(source, image.size) if aspect_differs(image.size, source.size) else source


def aspect_differs(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(a[0] * b[1] - a[1] * b[0]) > 0.01 * a[0] * b[1]


def stretch_map(map_image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The map resized to ``size`` (width, height) as a float map (mode F), area-averaged when it shrinks."""
    values = Image.fromarray(map_values(map_image))
    shrinking = values.width >= size[0] and values.height >= size[1]
    return values.resize(size, Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)


def mask_to_keep_map(mask: Image.Image, size: tuple[int, int], feather: float = 0.0, grow: float = 0.0, *,
                     shown: str = "the mask") -> Image.Image:
    """The keep map (mode F) of an inpainting mask (white, 0.5 and up, = fill), stretched to ``size`` first so that
    ``feather`` and ``grow`` count image pixels (see ``tools.feather.feathered_mask``)."""
    values = Image.fromarray(map_values(mask, f"--mask {shown}")).resize(size, Image.Resampling.BILINEAR)
    region = np.asarray(values) >= 0.5
    if not region.any():
        warn(f"{shown} has no white pixel, so there is nothing to fill; the output is the input")
    return Image.fromarray(feathered_mask(region, feather_px=feather, grow_px=grow))


def smallest_side(pipe) -> tuple[int, str]:
    """The fewest pixels on each side of an image that ``pipe`` edits, and why, in words for a message. A UNet halves
    the latent grid at each level but the last: a smaller image has no cell left at the bottom (a traceback from
    GroupNorm, or a meaningless result). A flow family's transformer takes whole patches, ``PATCH_SIDE`` pixels, on
    which its run.py rounds the working size."""
    if getattr(pipe, "unet", None) is None:
        return PATCH_SIDE, "the VAE's 8 pixels a latent, in 2x2 patches"
    cell, levels = pipe.vae_scale_factor, len(pipe.unet.config.block_out_channels)
    return cell * 2 ** (levels - 1), (f"{cell} pixels a latent cell, and a UNet of {levels} levels that halves it at "
                                       "each but the last")


def check_image_size(image: Image.Image, pipe) -> None:
    """Refuses an image smaller than the smallest that ``pipe`` edits (``smallest_side``)."""
    smallest, why = smallest_side(pipe)
    if min(image.size) < smallest:
        raise CliError(f"--image: the image is {image.width}x{image.height} pixels, smaller than {smallest}x"
                       f"{smallest}, the smallest this model edits ({why}); give an image at least {smallest} pixels "
                       "on each side")
