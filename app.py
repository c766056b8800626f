"""A web app for differential editing: upload an image, paint or make its map, edit, compare, download.

    python app.py                                   # SD 1.x/2.x on http://127.0.0.1:7860
    python app.py --family sdxl --no-refiner        # any family; its run.py flags set the model and hardware
    python app.py --model path/to/folder --device cpu --port 8000

The page drives the families' own run.py (``build_parser``, ``load_pipelines``, ``edit``), tools.maps and tools.fan,
so an edit here is the edit run.py makes with the same settings on the image at the page's working size; the PNG it
offers holds the same parameters (its command names the map as map.png: the map's own download button saves it).
One edit runs at a time; further requests wait in a queue that shows their position.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import gc
import ipaddress
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import gradio as gr
from gradio import routes as gradio_routes
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tools import cli, conditioning, fan, loading, results  # noqa: E402
from tools import maps as map_makers  # noqa: E402

DEFAULT_FAMILY = "sd2"
# Brush colours and how much each changes a pixel; every label of the page speaks of the map as white = keep,
# black = change, greys between (the preview over the image darkens alike).
BRUSH_LEVELS = {"#000000": ("black", "change fully"), "#404040": ("dark grey", "change 75%"),
                "#808080": ("grey", "change 50%"), "#bfbfbf": ("light grey", "change 25%"),
                "#ffffff": ("white", "keep")}
MAP_SOURCES = ("paint", "upload", "gradient", "radial", "feather")
# On a CPU the page starts with settings at which the default family (SD 2.1) edits in under a minute on two idle
# cores, as benchmarks/bench_app_cpu.py measures; a family's own defaults take many minutes.
CPU_STEPS, CPU_SIDE = 10, 256
# Command-line words in the families' messages, as the page names them.
PAGE_TERMS = {"--model": "Model", "--controlnet": "ControlNet", "--control": "Control", "--crop-margin": "Crop margin",
              "--image": "image", "--map": "map"}


# ---------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python app.py", add_help=False,
        description="Differential Diffusion in the browser. Every other flag is the family's run.py flag "
        "(--model, --device, --dtype, --offload, SDXL's --no-refiner, ...): see python FAMILY/run.py --help.")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    parser.add_argument("--family", type=str.lower, default=DEFAULT_FAMILY, choices=list(loading.image_families()),
                        help=f"the model folder to start with; others load on demand (default: {DEFAULT_FAMILY})")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on; 0.0.0.0 serves the network "
                        "(default: 127.0.0.1)")
    parser.add_argument("--port", type=cli.whole_number(1, 65535), default=7860, help="port (default: 7860)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link "
                        "(default: off)")
    return parser


def family_args(name: str, argv: list[str]) -> cli.Args:
    """The family's run.py flags from ``argv``, checked as run.py checks what needs no model or input file."""
    args = loading.load_family(name).build_parser().parse_args(argv, cli.Args())
    cli.resolve_device(args)
    return args


def samplers(name: str) -> list[str]:
    """The samplers that the family's --scheduler offers."""
    return list(loading.load_family(name).build_parser().common_flags["scheduler"].choices)


def has_controlnet(name: str) -> bool:
    return any(action.dest == "controlnet" for action in loading.load_family(name).build_parser()._actions)


def loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may reach beyond this machine
        return False


def check_port(host: str, port: int) -> None:
    """Refuses a port that another program holds, before minutes go into loading a model."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family):  # as the server binds it, reusing TIME_WAIT ports
            pass
    except socket.gaierror:
        raise cli.CliError(f"--host {host}: not an address of this machine; pass one of its addresses, or 0.0.0.0 "
                           "to serve on all of them") from None
    except OSError as error:
        why = "is in use" if error.errno == errno.EADDRINUSE else f"cannot be served: {cli.one_line(error)}"
        raise cli.CliError(f"--port {port} on {host} {why}; pass another --port, or stop what holds it") from None


def page_terms(message: str) -> str:
    """A family's one-line message in the page's words: its boxes instead of command-line flags."""
    message = re.sub(r"pass (--[\w-]+) (?:ID_OR_)?PATH", lambda flag: f"type a folder's path in the "
                     f"{PAGE_TERMS.get(flag[1], flag[1])} box", message)
    # the family's check of the image it edits (cli.check_image_size): here, the upload at the working size
    message = re.sub(r"give an image at least \d+ pixels on each side", "upload a larger image, or raise the working "
                     "size", message)
    return re.sub(r"--[a-z][\w-]*", lambda flag: PAGE_TERMS.get(flag[0], flag[0][2:].replace("-", " ")), message)


# ---------------------------------------------------------------------------------------------------------------
# Models: one set of pipelines held at a time (two may not fit on a GPU), reused until another family, model,
# ControlNet or scheduler is asked for. Each family's load_pipelines sets the scheduler, so a new scheduler loads the
# model again.


class Models:
    def __init__(self, start_family: str, start_args: cli.Args, fixed: bool = False):
        """``fixed``: only the start family's model and ControlNets load (the page is served beyond this machine, so
        its visitors may not make the server load any folder or Hub id)."""
        self.start_family, self.start_args, self.fixed = start_family, start_args, fixed
        self.key, self.pipelines = None, None

    def args_for(self, family: str) -> cli.Args:
        """The start family's flags as given; another family's defaults, on the same device and dtype."""
        if family == self.start_family:
            return copy.copy(self.start_args)
        hardware = ["--device", self.start_args.device, "--dtype", self.start_args.dtype]
        if self.start_args.offload:
            hardware.append("--offload")
        return family_args(family, hardware)

    def get(self, family: str, args: argparse.Namespace):
        nets = tuple(getattr(args, "controlnet", None) or ())
        if self.fixed and (family, args.model, nets) != (self.start_family, self.start_args.model,
                                                         tuple(getattr(self.start_args, "controlnet", None) or ())):
            raise cli.CliError(f"this page is served beyond this machine, so it edits only with the model it was "
                               f"started with: {self.start_args.model} ({self.start_family})")
        key = (family, args.model, args.scheduler, nets)
        if key != self.key:
            self.key, self.pipelines = None, None
            free_memory()  # before loading: two models may not fit together
            self.pipelines = loading.load_family(family).load_pipelines(args)
            self.key = key
        return self.pipelines


def free_memory() -> None:
    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Maps: every map is a keep map (mode F, white = keep) at the image's size


def painted_map(layers: list[Image.Image] | None, size: tuple[int, int]) -> Image.Image:
    """The editor's painted layers over white: unpainted pixels keep, painted ones take their grey level."""
    keep = np.ones((size[1], size[0]), dtype=np.float32)
    for layer in layers or []:
        if layer is None:
            continue
        rgba = np.asarray(layer.convert("RGBA"), dtype=np.float32) / 255
        if rgba.shape[:2] != keep.shape:  # the canvas may not match the image pixel for pixel
            rgba = np.asarray(layer.convert("RGBA").resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255
        grey, alpha = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32), rgba[..., 3]
        keep = alpha * grey + (1 - alpha) * keep
    return Image.fromarray(np.clip(keep, 0, 1))


def painted_mask(layers: list[Image.Image] | None, size: tuple[int, int]) -> Image.Image:
    """What the brush covered, in any colour, as an inpainting mask (white = fill)."""
    covered = np.zeros((size[1], size[0]), dtype=np.float32)
    for layer in layers or []:
        if layer is not None:
            alpha = np.asarray(layer.convert("RGBA").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
            covered = np.maximum(covered, alpha[..., 3] / 255)
    return Image.fromarray(covered)


def make_map(image: Image.Image, source: str, editor: dict | None, map_file: str | None, angle: float,
             inner: float, outer: float, feather: float, grow: float) -> tuple[Image.Image, str]:
    """The keep map the page's settings describe, and a few words saying how it was made (for the PNG text)."""
    width, height = image.size
    layers = (editor or {}).get("layers")
    if source == "paint":
        return painted_map(layers, image.size), "painted"
    if source == "upload":
        if not map_file:
            raise cli.CliError("no map uploaded: upload a grayscale map, or choose another way to make one")
        with named_upload(map_file):
            map_image = cli.load_map(Path(map_file), "map")
        if cli.aspect_differs(image.size, map_image.size):
            gr.Warning(f"the map ({map_image.width}x{map_image.height}) has another shape than the image "
                       f"({width}x{height}); it is stretched to fit")
        return cli.stretch_map(map_image, image.size), f"uploaded {Path(map_file).name}"
    if source == "gradient":
        return Image.fromarray(map_makers.linear_gradient(width, height, angle_degrees=angle)), f"gradient {angle:g}°"
    if source == "radial":
        shorter = min(width, height) / 2
        inner_px, outer_px = inner * shorter, max(inner, outer) * shorter
        return (Image.fromarray(map_makers.radial(width, height, inner_radius=inner_px, outer_radius=outer_px)),
                f"radial {inner:g}-{outer:g} of half the shorter side")
    if source == "feather":
        mask = painted_mask(layers, image.size)
        return (cli.mask_to_keep_map(mask, image.size, feather, grow, shown="the painted mask"),
                f"painted mask, feather {feather:g} px, grow {grow:g} px")
    raise cli.CliError(f"unknown map source {source!r}")


def map_preview(image: Image.Image, keep_map: Image.Image, invert: bool) -> tuple[Image.Image, Image.Image]:
    """The map as the pipeline reads it (grey, white = keep), and the image darkened by each pixel's strength, on the
    map's own scale: what keeps shows as it is, what changes fully shows nearly black."""
    keep = np.asarray(keep_map, dtype=np.float32)
    if invert:
        keep = 1 - keep
    shaded = np.asarray(image.convert("RGB"), dtype=np.float32) * (1 - 0.75 * (1 - keep))[..., None]
    grey = Image.fromarray(np.round(keep * 255).astype(np.uint8))
    return grey, Image.fromarray(np.round(shaded).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# The page

def page_error(message: object) -> gr.Error:
    """A mistake the user can fix: one line on the page and one in the server's console, no traceback."""
    message = page_terms(cli.one_line(message))
    print(f"error on the page: {message}", file=sys.stderr)
    return gr.Error(message, print_exception=False)


@contextlib.contextmanager
def page_errors():
    """Failures the user can fix, and running out of memory, become a message on the page; the app keeps serving."""
    try:
        yield
    except gr.Error:
        raise
    except cli.CliError as error:
        raise page_error(error) from None
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(error, MemoryError) and "out of memory" not in str(error):
            raise
        free_memory()
        raise page_error("out of memory: try a smaller working size or fewer sweep strengths, or start the app "
                         "again with offloading or fp16") from None
    except ValueError as error:  # the pipelines' own input checks name the problem
        raise page_error(error) from None


@contextlib.contextmanager
def named_upload(path: str):
    """Errors name an upload as the user knows it, not by the server's copy of it."""
    try:
        yield
    except cli.CliError as error:
        raise cli.CliError(str(error).replace(cli.display(path), Path(path).name)) from None


def load_image(path: str | None, max_side: int) -> Image.Image:
    if not path:
        raise cli.CliError("no image: upload the image to edit first")
    with named_upload(path):
        image = cli.as_rgb(cli.read_image(Path(path), "image"), "image")
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    return image


def build_app(models: Models, output_dir: Path) -> gr.Blocks:
    start = models.start_args
    start_schedulers = samplers(models.start_family)
    start_steps, start_guidance = start.steps, start.guidance_scale  # the start flags' own, as run.py takes them
    families = list(loading.image_families())
    on_cpu = start.device == "cpu"
    start_side = CPU_SIDE if on_cpu else 768
    start_steps = min(start_steps, CPU_STEPS) if on_cpu else start_steps
    # Before any upload the page holds the example, ready to edit, as run.py does without flags.
    example = load_image(str(cli.EXAMPLE_IMAGE), start_side)
    start_nets = getattr(start, "controlnet", None) or [""]

    with gr.Blocks(title="Differential Diffusion") as demo:
        gr.Markdown("# Differential Diffusion\nGive each pixel its own strength: paint, upload or make a **map** "
                    "(white keeps a pixel, black changes it fully, greys change it partly), then edit."
                    + (f"\n\n**Running on the CPU:** the page starts at {start_steps} steps and {start_side} px, at "
                       "which SD 2.1 edits in under a minute on two idle cores; more of either gives finer results, "
                       "slowly, and larger models take longer." * on_cpu))
        with gr.Row():
            with gr.Column(scale=1):
                image_file = gr.File(str(cli.EXAMPLE_IMAGE), label="Image (any format Pillow reads)",
                                     file_types=["image"], type="filepath", elem_id="image-file")
                max_side = gr.Slider(0, 2048, value=start_side, step=64, label="Working size: longer side in pixels "
                                     "(0 keeps the upload's size)", elem_id="max-side")
                source = gr.Radio(list(MAP_SOURCES), value="paint", label="Map from", elem_id="map-source")
                with gr.Group(visible=True) as paint_group:
                    gr.Markdown("**Brush:** " + " · ".join(f"{name} = {does}" for name, does in BRUSH_LEVELS.values())
                                + ". Unpainted pixels keep. For *feather*, paint the region to fill in any colour.")
                    editor = gr.ImageEditor(
                        {"background": example, "layers": [], "composite": example},
                        label="Paint the map", type="pil", image_mode="RGBA", format="png", sources=(), layers=False,
                        transforms=(), brush=gr.Brush(colors=list(BRUSH_LEVELS), default_color="#000000",
                                                      color_mode="fixed"),
                        elem_id="map-editor")
                map_file = gr.File(label="Map to upload (grayscale; 16-bit keeps its precision)", file_types=["image"],
                                   type="filepath", elem_id="map-file", visible=False)
                with gr.Row(visible=False) as gradient_row:
                    angle = gr.Slider(0, 360, value=0, step=1, label="Gradient angle, counterclockwise (0: change "
                                      "left, keep right)")
                with gr.Row(visible=False) as radial_row:
                    inner = gr.Slider(0, 2, value=0, step=0.05, label="Inner radius, in half the shorter side "
                                      "(changed fully within)")
                    outer = gr.Slider(0, 2, value=1, step=0.05, label="Outer radius (kept beyond)")
                with gr.Row(visible=False) as feather_row:
                    feather = gr.Slider(0, 256, value=32, step=1, label="Feather (px)")
                    grow = gr.Slider(0, 64, value=0, step=1, label="Grow (px)")
                invert = gr.Checkbox(False, label="Invert map (for a map made the other way round, white = change, "
                                     "as inpainting masks)", elem_id="invert")
                with gr.Row():
                    map_grey = gr.Image(label="Map (white = keep, black = change)", interactive=False, format="png",
                                        elem_id="map-grey")
                    map_over = gr.Image(label="Map over the image (darker = more change)", interactive=False,
                                        format="png", elem_id="map-over")
            with gr.Column(scale=1):
                with gr.Row():  # served beyond this machine, the page keeps to the models given at launch
                    family = gr.Dropdown(families, value=models.start_family, label="Family",
                                         interactive=not models.fixed)
                    model = gr.Textbox(start.model, label="Model (Hub id or local folder)" if not models.fixed else
                                       "Model (the one the app was started with)", interactive=not models.fixed)
                prompt = gr.Textbox(start.prompt or cli.EXAMPLE_PROMPT.read_text().strip(), label="Prompt", lines=2,
                                    elem_id="prompt")
                negative = gr.Textbox(start.negative_prompt or cli.EXAMPLE_NEGATIVE_PROMPT.read_text().strip(),
                                      label="Negative prompt", elem_id="negative-prompt")
                with gr.Row():
                    strength = gr.Slider(0, 1, value=1, step=0.01, label="Strength (scales how much every pixel "
                                         "changes)")
                    steps = gr.Number(start_steps, label="Steps", precision=0, minimum=1,
                                      maximum=cli.MAX_STEPS, elem_id="steps")
                with gr.Row():
                    guidance = gr.Number(start_guidance, label="Guidance scale", minimum=0,
                                         elem_id="guidance")
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="seed")
                    scheduler = gr.Dropdown(start_schedulers, value=start.scheduler, label="Scheduler")
                keep_exact = gr.Checkbox(False, label="Keep exact: pixels the map keeps are the input's own bytes",
                                         elem_id="keep-exact")
                crop = gr.Number(start.crop_margin, label="Crop margin in px: edit only the box around the pixels "
                                 "the map changes, plus this margin (empty: the whole image)", precision=0, minimum=0,
                                 maximum=cli.MAX_SIDE, elem_id="crop-margin")
                with gr.Row(visible=has_controlnet(models.start_family)) as controlnet_row:
                    controlnet = gr.Textbox(start_nets[0], label="ControlNet (Hub id or local folder; empty: none)",
                                            interactive=not models.fixed, elem_id="controlnet")
                    control = gr.Radio(["canny", "depth"], value=(getattr(start, "control", None) or ["canny"])[0],
                                       label="ControlNet follows the image's", elem_id="control")
                    controlnet_scale = gr.Number((getattr(start, "controlnet_scale", None) or [1.0])[0], minimum=0,
                                                 label="ControlNet scale", elem_id="controlnet-scale")
                with gr.Row():
                    edit_button = gr.Button("Edit", variant="primary", elem_id="edit")
                    fan_button = gr.Button("Strength fan", elem_id="fan")
                    sweep_button = gr.Button("Strength sweep", elem_id="sweep")
                gr.Markdown("**Strength fan:** one edit whose sectors, clockwise from 12 o'clock, change from not at "
                            "all to fully, to see every strength on your image at once. **Strength sweep:** the whole "
                            "image edited at each listed strength, with the same seed, side by side.")
                with gr.Row():
                    sectors = gr.Slider(2, map_makers.MAX_FAN_SECTORS, value=8, step=1, label="Fan sectors")
                    strengths = gr.Textbox(", ".join(f"{s:g}" for s in fan.DEFAULT_SWEEP), label="Sweep strengths")
                result = gr.ImageSlider(label="Before / after", type="pil", format="png", elem_id="result")
                extra = gr.Image(label="Labelled fan / sweep grid", interactive=False, format="png", elem_id="extra")
                info = gr.Markdown(elem_id="info")
                download = gr.File(label="Download (PNG with its parameters)", interactive=False, elem_id="download")

        map_inputs = [image_file, max_side, source, editor, map_file, angle, inner, outer, feather, grow]

        def preview(path, side, source_name, editor_value, map_path, *numbers_and_invert):
            *numbers, invert_map = numbers_and_invert
            try:  # quiet: a map not made yet is no error until Edit, which says what is missing
                image = load_image(path, side)
                keep_map, _ = make_map(image, source_name, editor_value, map_path, *numbers)
            except (cli.CliError, ValueError):
                return None, None
            return map_preview(image, keep_map, invert_map)

        def new_image(path, side):
            with page_errors():
                image = load_image(path, side) if path else None
            return {"background": image, "layers": [], "composite": image}

        def new_family(name):
            args = models.args_for(name)  # the start family's flags (an edit model's defaults among them)
            schedulers = samplers(name)
            steps_default, guidance_default = args.steps, args.guidance_scale
            return (args.model, steps_default, guidance_default, gr.Dropdown(choices=schedulers, value=args.scheduler),
                    gr.Row(visible=has_controlnet(name)))

        def run_args(family_name, model_id, path, prompt_text, negative_text, strength_value, steps_value,
                     guidance_value, seed_value, scheduler_name, keep_exact_value, invert_value, crop_value,
                     controlnet_id, control_name, controlnet_scale_value):
            args = models.args_for(family_name)
            for dest, value in (("steps", steps_value), ("guidance_scale", guidance_value), ("seed", seed_value),
                                ("strength", strength_value)):
                if value is None:
                    raise cli.CliError(f"{dest.replace('_', ' ')} is empty: give a number")
                try:  # the flags' own types check the ranges, with run.py's messages
                    setattr(args, dest, cli.NUMBER_TYPES[dest](str(value)))
                except argparse.ArgumentTypeError as error:
                    raise cli.CliError(f"{dest.replace('_', ' ')} {error}") from None
            args.model, args.scheduler = model_id.strip() or args.model, scheduler_name
            # a browser can send a lone surrogate, on which the tokenizers would fail with a traceback
            cli.check_prompts(prompt_text, negative_text, ("prompt", "negative prompt"))
            args.prompt, args.negative_prompt = prompt_text or "", negative_text or ""
            args.keep_exact, args.invert_map = bool(keep_exact_value), bool(invert_value)
            args.image, args.mask, args.feather, args.grow = Path(path).name if path else None, None, 0.0, 0.0
            args.overwrite, args.compare = True, False
            args.crop_margin = None if crop_value is None else int(crop_value)
            args.crop_upscale = args.crop_upscale and args.crop_margin is not None
            if has_controlnet(family_name):
                net = (controlnet_id or "").strip()
                args.controlnet, args.control_image = [net] if net else None, None
                args.control = [control_name] if net else None
                scale = 1.0 if controlnet_scale_value is None else float(controlnet_scale_value)
                args.controlnet_scale = [scale] if net else None
                args.depth_model = args.depth_model if net and control_name == "depth" else None
                for check in loading.load_family(family_name).build_parser().checks:  # flags that must go together
                    check(args)
            return args

        def save(picture, args, steps_run, extra_params, name):
            folder = Path(tempfile.mkdtemp(dir=output_dir))
            return str(results.write_png(picture, folder / name, results.png_parameters(args, steps_run, extra_params)))

        def edit(family_name, model_id, path, side, source_name, editor_value, map_path, angle_value, inner_value,
                 outer_value, feather_value, grow_value, *settings, progress=gr.Progress(track_tqdm=True)):
            *settings, count = settings
            with page_errors():
                image = load_image(path, side)
                args = run_args(family_name, model_id, path, *settings)
                keep_map, how = make_map(image, source_name, editor_value, map_path, angle_value, inner_value,
                                         outer_value, feather_value, grow_value)
                if source_name == "feather" and args.invert_map:
                    raise cli.CliError("a painted mask is always white = fill; untick Invert map")
                # run.py's and tools.batch's own builder over the family's parser, so that the command keeps every
                # flag the app was started with (SDXL's --no-refiner, ...) in their order and list format
                args.map = "map.png"  # as the map's own download button saves it
                run_py, parser = loading.families()[family_name], loading.load_family(family_name).build_parser()
                args.command = cli.command_line(["python", str(run_py.relative_to(cli.REPO_ROOT))], parser, args)
                args.map = how
                progress(0, desc=f"loading {args.model}")
                pipelines = models.get(family_name, args)
                started = time.perf_counter()
                (output,), steps_run = loading.load_family(family_name).edit(
                    pipelines, args, images=[image], maps=[keep_map], prompts=[args.prompt],
                    negative_prompts=[args.negative_prompt], seeds=[args.seed])
                seconds = time.perf_counter() - started
                extra_params = {"family": family_name, "tool": "app", "size": f"{image.width}x{image.height}",
                                **(conditioning.png_parameters(args) if has_controlnet(family_name) else {})}
                written = save(output, args, steps_run, extra_params, "edit.png")
                grey, _ = map_preview(image, keep_map, args.invert_map)
                return (image, output), None, grey, summary(count + 1, steps_run, seconds), written, count + 1

        def fan_or_sweep(mode, family_name, model_id, path, side, sector_count, strengths_text, *settings,
                         progress=gr.Progress(track_tqdm=True)):
            *settings, count = settings
            with page_errors():
                image = load_image(path, side)
                args = run_args(family_name, model_id, path, *settings)
                if args.invert_map or args.strength != 1:
                    raise cli.CliError(f"invert map and strength do not apply to the {mode}: it sets every pixel's "
                                       "strength itself; untick Invert map and set Strength to 1")
                args.command = f"python -m tools.fan --family {family_name} {mode}"
                progress(0, desc=f"loading {args.model}")
                pipelines = models.get(family_name, args)
                family_module = loading.load_family(family_name)
                started = time.perf_counter()
                if mode == "fan":
                    output, fan_map, steps_run = fan.fan_edit(family_module, pipelines, args, image, int(sector_count))
                    args.map = f"strength fan, {int(sector_count)} sectors"
                    extra_params = {"family": family_name, "tool": "fan", "sectors": int(sector_count)}
                    pair, shown = (image, output), fan.label_fan(output, int(sector_count))
                    grey, _ = map_preview(image, fan_map, invert=False)
                else:
                    values = parse_strengths(strengths_text)
                    outputs, steps_run = fan.sweep_edit(family_module, pipelines, args, image, values)
                    output = shown = fan.sweep_grid(outputs, values)
                    args.map = "uniform"
                    extra_params = {"family": family_name, "tool": "sweep",
                                    "strengths": ",".join(f"{s:g}" for s in values)}
                    pair, grey = (image, outputs[-1]), None
                seconds = time.perf_counter() - started
                written = save(output, args, steps_run, extra_params, f"{mode}.png")
                return pair, shown, grey, summary(count + 1, steps_run, seconds), written, count + 1

        def run_fan(*values, progress=gr.Progress(track_tqdm=True)):  # Gradio passes progress by signature
            return fan_or_sweep("fan", *values, progress=progress)

        def run_sweep(*values, progress=gr.Progress(track_tqdm=True)):
            return fan_or_sweep("sweep", *values, progress=progress)

        def parse_strengths(text):
            items = [item.strip() for item in (text or "").split(",") if item.strip()]
            if not 1 <= len(items) <= fan.MAX_SWEEP_ITEMS:
                raise cli.CliError(f"sweep strengths: list 1 to {fan.MAX_SWEEP_ITEMS} numbers from 0 to 1, "
                                   "separated by commas")
            try:
                return tuple(cli.real_number(0, 1)(item) for item in items)
            except argparse.ArgumentTypeError as error:
                raise cli.CliError(f"sweep strengths: each {error}") from None

        results_shown = gr.State(0)  # numbers each result, so that a repeated one still reads as new
        settings = [prompt, negative, strength, steps, guidance, seed, scheduler, keep_exact, invert, crop, controlnet,
                    control, controlnet_scale, results_shown]
        outputs = [result, extra, map_grey, info, download, results_shown]
        # Queued (an error shows only on queued events) but unlimited: they never wait for an edit.
        image_file.change(new_image, [image_file, max_side], editor, concurrency_limit=None)
        for component in [*map_inputs, invert]:
            component.change(preview, [*map_inputs, invert], [map_grey, map_over], concurrency_limit=None,
                             show_progress="hidden")
        source.change(lambda name: [gr.update(visible=name in shows) for shows in
                                    (("paint", "feather"), ("upload",), ("gradient",), ("radial",), ("feather",))],
                      source, [paint_group, map_file, gradient_row, radial_row, feather_row], queue=False)
        family.change(new_family, family, [model, steps, guidance, scheduler, controlnet_row], concurrency_limit=None)
        edit_button.click(edit, [family, model, *map_inputs, *settings], outputs, concurrency_id="model")
        fan_button.click(run_fan,
                         [family, model, image_file, max_side, sectors, strengths, *settings], outputs,
                         concurrency_id="model")
        sweep_button.click(run_sweep,
                           [family, model, image_file, max_side, sectors, strengths, *settings], outputs,
                           concurrency_id="model")
    demo.queue(default_concurrency_limit=1)
    return demo


def summary(number: int, steps_run: int, seconds: float) -> str:
    return f"**Result {number}:** {steps_run} denoising step{'' if steps_run == 1 else 's'} run in {seconds:.1f} s"


@contextlib.contextmanager
def app_folder():
    """A folder of the app's own for its results and Gradio's uploads, removed when the app exits, by Ctrl-C or a
    termination signal. It lies in GRADIO_TEMP_DIR if that is set, else in the system temp folder."""
    folder = Path(tempfile.mkdtemp(prefix="differential-diffusion-app-", dir=os.environ.get("GRADIO_TEMP_DIR")))
    given_uploads, gradio_default = os.environ.get("GRADIO_TEMP_DIR"), gradio_routes.DEFAULT_TEMP_DIR
    os.environ["GRADIO_TEMP_DIR"] = str(folder / "uploads")  # read by Gradio as it builds the page and serves
    gradio_routes.DEFAULT_TEMP_DIR = str(folder / "uploads")  # read when gradio was imported; the server makes it
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # a terminated app cleans up as at Ctrl-C
    try:
        yield folder
    finally:
        signal.signal(signal.SIGTERM, previous)
        gradio_routes.DEFAULT_TEMP_DIR = gradio_default
        if given_uploads is None:
            del os.environ["GRADIO_TEMP_DIR"]
        else:
            os.environ["GRADIO_TEMP_DIR"] = given_uploads
        shutil.rmtree(folder, ignore_errors=True)


def run(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    own, rest = parser.parse_known_args(argv)
    if own.help:
        parser.print_help()
        return
    args = family_args(own.family, rest)
    check_port(own.host, own.port)
    models = Models(own.family, args, fixed=own.share or not loopback(own.host))
    with app_folder() as output_dir:
        demo = build_app(models, output_dir)
        print(f"loading {args.model} ({own.family}) on {args.device} in {args.dtype}", file=sys.stderr)
        models.get(own.family, args)  # at start: a model that cannot load says so at once, not at the first edit
        # Quiet: Gradio's own lines speak of launch() arguments; these speak of the app's flags.
        demo.launch(server_name=own.host, server_port=own.port, share=own.share, allowed_paths=[str(output_dir)],
                    show_error=False, quiet=True, prevent_thread_lock=True)
        print(f"serving on {demo.local_url}" + (f" and {demo.share_url}" if demo.share_url else "")
              + ("" if own.share else " (--share serves a public link too)") + "; Ctrl-C stops", file=sys.stderr)
        try:
            while demo.is_running:
                time.sleep(0.2)
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
        finally:
            demo.close()


if __name__ == "__main__":
    cli.main(run)
