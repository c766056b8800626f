"""Edit an image with Stable Diffusion XL, giving each pixel its own strength through a map.

    python SDXL/run.py                      # the example in assets/: SDXL base to 0.8, then the refiner from 0.8
    python SDXL/run.py --image photo.jpg --map map.png --prompt "a watercolour painting" --output edit.png
    python SDXL/run.py --no-refiner         # the base alone, over the whole schedule
    python SDXL/run.py --image photo.jpg --mask hole.png --feather 32 --prompt "a brick wall"   # soft inpainting
    python SDXL/run.py --controlnet diffusers/controlnet-canny-sdxl-1.0 --control canny   # ControlNet on the base
    python SDXL/run.py --inpaint-model diffusers/stable-diffusion-xl-1.0-inpainting-0.1   # an inpainting checkpoint

The image is scaled to SDXL's working size first: by default it keeps its aspect ratio at about 1024 x 1024 pixels
in area (a square image becomes 1024 x 1024, a 3:2 photo 1256 x 840); --width and --height fix either side or both.
The map is stretched to the same size. With --controlnet or --inpaint-model the base runs the whole schedule alone:
diffusers' SDXL ControlNet and inpainting pipelines have no handoff to the refiner.

`build_parser`, `load_pipelines` and `edit` are also what batch editing uses, so both run the same code.
"""

import argparse
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import cli, conditioning, loading, results, running  # noqa: E402

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
DEFAULT_REFINER_START = 0.8
NATIVE_SIZE = 1024  # SDXL was trained on images of about 1024 x 1024 pixels in area, in many aspect ratios
SIZE_MULTIPLE = 8  # the VAE's scale factor: the latents must cover the image exactly
MAX_SIDE = 8192


class Pipelines(NamedTuple):
    base: object
    refiner: object  # None with --no-refiner


def build_parser():
    parser = cli.build_parser(
        "Differential img2img with Stable Diffusion XL: a grayscale map gives every pixel its own strength. "
        "By default the base model runs the first 80% of the schedule and the refiner the rest, as SDXL's "
        "authors intended; every pixel keeps its own release step across the handoff.",
        default_model=DEFAULT_MODEL,
        default_steps=100,
        default_guidance=17.5,
    )
    group = parser.add_argument_group("SDXL")
    group.add_argument(
        "--refiner", default=DEFAULT_REFINER, metavar="ID_OR_PATH",
        help="refiner model, a Hub id or a local diffusers folder; it shares the base's VAE and second text "
        f"encoder (default: {DEFAULT_REFINER})",
    )
    group.add_argument(
        "--no-refiner", action="store_true",
        help="run the base model alone, over the whole schedule; --controlnet and --inpaint-model imply it (default: "
        "off, base then refiner)",
    )
    group.add_argument(
        "--refiner-start", type=_fraction, default=DEFAULT_REFINER_START, metavar="F",
        help="fraction of the schedule after which the refiner takes over, between 0 and 1 exclusive; the base runs "
        f"until then (default: {DEFAULT_REFINER_START:g})",
    )
    group.add_argument(
        "--width", type=_side, metavar="PX",
        help=f"output width in pixels, a multiple of {SIZE_MULTIPLE} (default: from --height and the image's aspect "
        f"ratio, or about {NATIVE_SIZE}x{NATIVE_SIZE} pixels in area)",
    )
    group.add_argument(
        "--height", type=_side, metavar="PX",
        help=f"output height in pixels, a multiple of {SIZE_MULTIPLE} (default: from --width and the image's "
        f"aspect ratio, or about {NATIVE_SIZE}x{NATIVE_SIZE} pixels in area)",
    )
    conditioning.add_arguments(parser)
    parser.checks.append(_base_alone_for_variants)
    return parser


def _base_alone_for_variants(args):
    if conditioning.variant(args) and not args.no_refiner:
        if args.refiner != DEFAULT_REFINER or args.refiner_start != DEFAULT_REFINER_START:
            raise cli.CliError(f"--{'controlnet' if args.controlnet else 'inpaint-model'} runs the base alone over "
                               "the whole schedule (its diffusers pipeline has no handoff to a refiner): drop "
                               "--refiner and --refiner-start")
        args.no_refiner = True


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1 (exclusive), got {text!r}")
    return value


def _side(text):
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not SIZE_MULTIPLE <= value <= MAX_SIDE or value % SIZE_MULTIPLE:
        raise argparse.ArgumentTypeError(
            f"must be a multiple of {SIZE_MULTIPLE} from {SIZE_MULTIPLE} to {MAX_SIDE} pixels, got {text!r}"
        )
    return value


def output_size(image_size, width=None, height=None):
    """The (width, height) an image of `image_size` is edited at; see the module docstring."""
    image_width, image_height = image_size
    aspect = image_width / image_height
    if width is None and height is None:
        width = NATIVE_SIZE * math.sqrt(aspect)
        height = NATIVE_SIZE / math.sqrt(aspect)
    elif width is None:
        width = height * aspect
    elif height is None:
        height = width / aspect
    return tuple(min(MAX_SIDE, max(SIZE_MULTIPLE, round(side / SIZE_MULTIPLE) * SIZE_MULTIPLE))
                 for side in (width, height))


def load_pipelines(args):
    from SDXL.diff_pipe import StableDiffusionXLDiffImg2ImgPipeline

    if conditioning.variant(args) == "controlnet":
        from SDXL.diff_pipe_controlnet import StableDiffusionXLControlNetDiffImg2ImgPipeline as base_class
    elif conditioning.variant(args) == "inpaint":
        from SDXL.diff_pipe_inpaint import StableDiffusionXLDiffInpaintPipeline as base_class
    else:
        base_class = StableDiffusionXLDiffImg2ImgPipeline
    options = dict(torch_dtype=cli.torch_dtype(args.dtype), device=args.device, offload=args.offload)
    base = conditioning.load_pipeline(base_class, args)
    loading.set_scheduler(base, args.scheduler)
    if args.no_refiner:
        return Pipelines(base, None)
    # The refiner was trained with the base's VAE and second text encoder: share them rather than load them twice.
    refiner = loading.load_pipeline(
        StableDiffusionXLDiffImg2ImgPipeline, args.refiner, flag="--refiner", **options,
        text_encoder_2=base.text_encoder_2, vae=base.vae,
    )
    loading.set_scheduler(refiner, args.scheduler)
    return Pipelines(base, refiner)


def edit(pipelines, args, *, images, maps, prompts, negative_prompts, seeds):
    """Edits a batch (lists of equal length) with the sampling settings in `args`; returns (images, steps run).

    Every image and map is scaled to the size `output_size` gives for the first image.
    """
    size = output_size(images[0].size, args.width, args.height)
    for pipe in filter(None, pipelines):  # both stages edit at `size`, whatever the image's own
        smallest, why = cli.smallest_side(pipe)
        if min(size) < smallest:
            raise cli.CliError(f"the image would be edited at {size[0]}x{size[1]} pixels, smaller than {smallest}x"
                               f"{smallest}, the smallest this model edits ({why}); give --width and --height of at "
                               f"least {smallest}")
    images = [image.resize(size, Image.Resampling.LANCZOS) if image.size != size else image for image in images]
    common = dict(
        prompt=prompts,
        negative_prompt=[text or "" for text in negative_prompts],
        map=[cli.stretch_map(map_image, size) for map_image in maps],
        invert_map=args.invert_map,
        strength=args.strength,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
    )
    # Each stage gets fresh generators with the same seeds: the refiner then draws the base's x0 and noise again,
    # so pixels still frozen at the handoff continue exactly.
    generators = lambda: [loading.make_generator(seed) for seed in seeds]  # noqa: E731
    base, refiner = pipelines
    if refiner is None:
        images = running.edit_images(base, args, image=images, generator=generators(), keep_exact=args.keep_exact,
                                     **common, **conditioning.pipeline_arguments(args, images))
        return images, base.num_timesteps

    def base_then_refiner(image, keep_exact, output_type="pil", **call):
        latents = base(
            image=image, generator=generators(), denoising_end=args.refiner_start, output_type="latent", **call
        ).images
        return refiner(
            image=latents, original_image=image, generator=generators(), denoising_start=args.refiner_start,
            keep_exact=keep_exact, output_type=output_type, **call,
        )

    # With --crop-margin both stages run on the one crop, and only its pixels are pasted into the input.
    images = running.edit_images(base, args, base_then_refiner, image=images, keep_exact=args.keep_exact, **common)
    return images, base.num_timesteps + refiner.num_timesteps


def run():
    args = cli.parse_args(build_parser())
    image, map_image = cli.load_inputs(args)
    conditioning.check_control_images(args, image)
    size = output_size(image.size, args.width, args.height)
    stretched = abs(size[0] * image.height - size[1] * image.width) > 0.01 * size[0] * image.height
    if args.width and args.height and stretched:
        print(f"warning: the image ({image.width}x{image.height}) is stretched to {size[0]}x{size[1]}; give only "
              "--width or --height to keep its aspect ratio", file=sys.stderr)
    pipelines = load_pipelines(args)
    started = time.perf_counter()
    (result,), steps_run = edit(
        pipelines, args, images=[image], maps=[map_image], prompts=[args.prompt],
        negative_prompts=[args.negative_prompt], seeds=[args.seed],
    )
    refiner = {"refiner": "none"} if args.no_refiner else {"refiner": args.refiner, "refiner_start": args.refiner_start}
    results.save_result(result, args, image=image, map_image=map_image, steps_run=steps_run,
                        seconds=time.perf_counter() - started,
                        extra_params={**refiner, "width": size[0], "height": size[1],
                                      **conditioning.png_parameters(args)})


if __name__ == "__main__":
    cli.main(run)
