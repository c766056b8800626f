"""The ControlNet and inpainting-checkpoint flags of SD2/run.py and SDXL/run.py: their checks, the models they load,
the control images they make and what the PNG records (docs/controlnet-inpaint.md explains the variants).

    python SD2/run.py --controlnet lllyasviel/sd-controlnet-canny --control canny
    python SD2/run.py --inpaint-model sd2-community/stable-diffusion-2-inpainting --mask hole.png --feather 32
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
from PIL import Image

from tools import cli, loading

CONTROLS = ("canny", "depth")  # --control: conditions made from --image itself
CANNY_THRESHOLDS = (100, 200)  # the low and high thresholds of the common Canny ControlNet recipe
INPAINT_CHANNELS = 9  # an inpainting UNet reads the latents, the mask and the masked image's latents


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the flags as one group, and their checks to ``parser.checks`` (see ``check_args``)."""
    from tools.maps import DEFAULT_DEPTH_MODEL

    add = parser.add_argument_group("ControlNet and inpainting checkpoints").add_argument
    add("--controlnet", action="append", metavar="ID_OR_PATH", help="a ControlNet for --model (Hub id or local "
        "folder) that conditions every step; repeat it for several (default: none)")
    add("--control-image", action="append", metavar="PATH", help="the condition (edges, depth, pose...) of the "
        "image's aspect ratio: one for each --controlnet, in their order, or one for all")
    add("--control", action="append", choices=CONTROLS, help="make the condition from --image instead: canny edges "
        f"(thresholds {CANNY_THRESHOLDS[0]}/{CANNY_THRESHOLDS[1]}) or estimated depth (near = bright); one for each "
        "--controlnet, or one for all")
    add("--depth-model", metavar="ID_OR_PATH", help="with --control depth: a transformers depth-estimation model "
        f"(default: {DEFAULT_DEPTH_MODEL})")
    add("--controlnet-scale", action="append", type=cli.real_number(0), metavar="F", help="how strongly a ControlNet "
        "steers: one for each --controlnet, or one for all (default: 1)")
    add("--inpaint-model", metavar="ID_OR_PATH", help="an inpainting checkpoint (a 9-channel UNet) to edit with "
        "instead of --model: its mask channel follows the pixels as the map releases them (default: none)")
    parser.checks.append(functools.partial(check_args, default_model=parser.get_default("model")))


def check_args(args: argparse.Namespace, default_model: str) -> None:
    """Refuses flags that do not go together, in one line; with --inpaint-model, sets ``args.model`` to it."""
    nets = args.controlnet or []
    sources = args.control_image or args.control or []
    if not nets:
        given = [flag for flag, value in [("--control-image", args.control_image), ("--control", args.control),
                                          ("--controlnet-scale", args.controlnet_scale)] if value]
        if given:
            raise cli.CliError(f"{given[0]} is for a ControlNet: pass --controlnet ID_OR_PATH too, or drop {given[0]}")
    elif args.inpaint_model:
        raise cli.CliError("--controlnet and --inpaint-model do not go together: there is no ControlNet inpainting "
                           "variant here; pass one of them")
    elif args.control_image and args.control:
        raise cli.CliError("--control-image and --control are alternatives: give the conditions as files, or make "
                           "them from --image, not both")
    elif not sources:
        raise cli.CliError("--controlnet needs a condition: pass --control-image PATH, or --control canny|depth to "
                           "make it from --image")
    for flag, values in [("--control-image" if args.control_image else "--control", sources),
                         ("--controlnet-scale", args.controlnet_scale or [])]:
        if len(values) > 1 and len(values) != len(nets):
            raise cli.CliError(f"{len(values)} {flag} for {len(nets)} --controlnet: give one for each ControlNet, "
                               "or one for all")
    for path in args.control_image or []:
        cli.input_path(path, None, "--control-image")
    if args.depth_model is not None and "depth" not in (args.control or []):
        raise cli.CliError("--depth-model estimates depth for --control depth; pass that too, or drop --depth-model")
    if args.inpaint_model:
        if args.model not in (default_model, args.inpaint_model):
            raise cli.CliError("--inpaint-model replaces --model: pass only one of them")
        args.model = args.inpaint_model


def variant(args: argparse.Namespace) -> str | None:
    """``"controlnet"``, ``"inpaint"``, or None for plain differential img2img."""
    return "controlnet" if args.controlnet else "inpaint" if args.inpaint_model else None


def load_pipeline(pipeline_class, args: argparse.Namespace, **from_pretrained_kwargs):
    """``loading.load_pipeline`` for the variant the flags ask for, with its ControlNets (and depth model) loaded too;
    refuses a checkpoint given to the wrong flag and a ControlNet made for another model family."""
    nets = load_controlnets(args) if args.controlnet else []
    if nets:
        from_pretrained_kwargs["controlnet"] = nets if len(nets) > 1 else nets[0]
    flag = "--inpaint-model" if args.inpaint_model else "--model"
    pipe = loading.load_pipeline(pipeline_class, args.model, torch_dtype=cli.torch_dtype(args.dtype),
                                 device=args.device, offload=args.offload, flag=flag, **from_pretrained_kwargs)
    channels = pipe.unet.config.in_channels
    if args.inpaint_model and channels != INPAINT_CHANNELS:
        raise cli.CliError(f"--inpaint-model {args.model}: its UNet reads {channels} channels, not the "
                           f"{INPAINT_CHANNELS} of an inpainting checkpoint; pass it as --model")
    if not args.inpaint_model and channels == INPAINT_CHANNELS:
        raise cli.CliError(f"--model {args.model} is an inpainting checkpoint (its UNet reads {channels} channels): "
                           "pass it as --inpaint-model")
    for name, net in zip(args.controlnet or [], nets):
        check_controlnet_family(name, net.config, args.model, pipe.unet.config)
    if "depth" in (args.control or []):
        depth_estimator(args.depth_model, args.device)  # now: a missing depth model fails before any step runs
    return pipe


def load_controlnets(args: argparse.Namespace) -> list:
    """``--controlnet`` models, in the pipeline's dtype; a failure is one line naming the ControlNet."""
    from diffusers import ControlNetModel

    nets, dtype = [], cli.torch_dtype(args.dtype)
    for name in args.controlnet:
        path = loading.model_path(name, "--controlnet")
        if pipeline := loading.pipeline_folder(name):
            raise cli.CliError(f"--controlnet {name}: {pipeline}; here --controlnet takes a ControlNet model (a "
                               "ControlNetModel folder or Hub id) made for --model's family")
        try:
            nets.append(ControlNetModel.from_pretrained(str(path) if path.is_dir() else name, dtype=dtype))
        except (OSError, ValueError) as error:
            raise cli.CliError(loading.load_failure(error, name, "--controlnet", ControlNetModel, path.is_dir()),
                               cli.EXIT_RUN_FAILED) from error
    return nets


def check_controlnet_family(name: str, controlnet_config, model: str, unet_config) -> None:
    """A ControlNet reads the UNet's text states and added embeddings: both must be the UNet's own kind."""
    wanted = (unet_config.cross_attention_dim, unet_config.addition_embed_type)
    found = (controlnet_config.cross_attention_dim, controlnet_config.addition_embed_type)
    if found != wanted:
        shown = lambda width, added: f"text width {width}, added embeddings {added or 'none'}"  # noqa: E731
        raise cli.CliError(f"--controlnet {name} was made for another model family ({shown(*found)}) than --model "
                           f"{model} ({shown(*wanted)}); give a ControlNet trained for this model's family")


@functools.cache  # one estimator for all the images of a run or a batch
def depth_estimator(model: str | None, device: str):
    """The transformers depth-estimation pipeline of ``--depth-model`` (None: tools.maps' default)."""
    from tools import maps

    model = model or maps.DEFAULT_DEPTH_MODEL
    if pipeline := loading.pipeline_folder(model):
        raise cli.CliError(f"--depth-model {model}: {pipeline}; here --depth-model takes a transformers "
                           f"depth-estimation model, such as {maps.DEFAULT_DEPTH_MODEL}")
    try:
        return maps.depth_estimator(model, device)
    except (OSError, ValueError) as error:
        why = (str(error.__cause__ or error).strip() or type(error).__name__).splitlines()[0]
        fix = "give a folder of a transformers depth-estimation model" if Path(model).is_dir() else (
            "pass --depth-model PATH for a local folder")  # a Hub id that is not cached, or a folder not there
        raise cli.CliError(f"--depth-model {model}: cannot load it as a depth-estimation model: {cli.one_line(why)}; "
                           f"{fix}", cli.EXIT_RUN_FAILED) from error


def canny_edges(image: Image.Image) -> Image.Image:
    """White edges on black, in three channels, as Canny ControlNets were trained on."""
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("RGB")), *CANNY_THRESHOLDS)
    return Image.fromarray(edges).convert("RGB")


def depth_condition(image: Image.Image, model: str | None, device: str) -> Image.Image:
    """The estimated nearness of every pixel (near = white, far = black), in three channels, as depth ControlNets
    read it."""
    from tools.maps import depth_map

    nearness = depth_map(image, model=depth_estimator(model, device), near="keep")
    return Image.fromarray(np.round(nearness * 255).astype(np.uint8)).convert("RGB")


def check_control_images(args: argparse.Namespace, image: Image.Image) -> None:
    """Refuses a --control-image whose aspect ratio differs from ``image``'s: stretching it would misplace it."""
    for path in args.control_image or []:
        size = cli.read_image(Path(path), "--control-image").size  # upright, as it is used
        if cli.aspect_differs(image.size, size):
            raise cli.CliError(f"--control-image {path} is {size[0]}x{size[1]}, not of the aspect ratio of the image "
                               f"({image.width}x{image.height}); give a condition of the image's shape")


def control_images(args: argparse.Namespace, image: Image.Image) -> list[Image.Image]:
    """One condition for each ControlNet, for ``image`` (the picture being edited, at the size it is edited)."""
    check_control_images(args, image)
    made = {}
    for source in args.control_image or args.control:
        if source not in made:
            made[source] = (canny_edges(image) if source == "canny" else
                            depth_condition(image, args.depth_model, args.device) if source == "depth" else
                            cli.as_rgb(cli.read_image(Path(source), "--control-image")))
    conditions = [made[source] for source in args.control_image or args.control]
    return conditions * len(args.controlnet) if len(conditions) == 1 else conditions


def pipeline_arguments(args: argparse.Namespace, images: list[Image.Image]) -> dict:
    """What the variant's pipeline takes beyond the img2img arguments, for ``images`` of one size: the size itself
    (stock would use the control image's or the UNet's own), the conditions and their scales."""
    if not variant(args):
        return {}
    width, height = images[0].size
    if args.inpaint_model:
        return dict(width=width, height=height)
    scales = args.controlnet_scale or [1.0]
    if len(args.controlnet) == 1:
        conditions = [control_images(args, image)[0] for image in images]
        return dict(width=width, height=height, control_image=conditions, controlnet_conditioning_scale=scales[0])
    if len(images) > 1:  # tools.batch then runs the rows one by one
        raise cli.CliError("diffusers' pipelines with several ControlNets edit one image per call; pass --batch-size 1")
    return dict(width=width, height=height, control_image=control_images(args, images[0]),
                controlnet_conditioning_scale=scales * len(args.controlnet) if len(scales) == 1 else scales)


def png_parameters(args: argparse.Namespace) -> dict:
    """The settings of the variant for the PNG text (which writes lists as JSON); none for plain img2img."""
    if args.inpaint_model:
        return {"inpaint_model": args.inpaint_model}
    if not args.controlnet:
        return {}
    from tools.maps import DEFAULT_DEPTH_MODEL

    depth = {"depth_model": args.depth_model or DEFAULT_DEPTH_MODEL} if "depth" in (args.control or []) else {}
    return {"controlnet": args.controlnet, "control": args.control_image or args.control, **depth,
            "controlnet_scale": args.controlnet_scale or [1.0]}
