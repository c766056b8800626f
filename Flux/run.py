"""Edit an image with FLUX.1, giving each pixel its own strength through a map.

    python Flux/run.py                      # the example in assets/, with the default model (gated: see --help)
    python Flux/run.py --image photo.jpg --map map.png --prompt "a watercolour painting" --output edit.png
    python Flux/run.py --kontext --image photo.jpg --map map.png --prompt "make it winter"   # edit by instruction
    python Flux/run.py --fill --image photo.jpg --mask hole.png --feather 32 --prompt "a wooden door"

`build_parser`, `load_pipelines` and `edit` are also what batch editing uses, so both run the same code.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import cli, editing, loading, results, running  # noqa: E402

DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"
SIZE_MULTIPLE = cli.PATCH_SIDE  # the working size is whole patches
# Steps and guidance as stock's FluxKontextInpaintPipeline and FluxFillPipeline default them.
VARIANTS = {
    "img2img": editing.Variant(None, DEFAULT_MODEL, 28, 3.5),
    "kontext": editing.Variant(
        "--kontext", "black-forest-labs/FLUX.1-Kontext-dev", 28, 3.5,
        "edit by instruction with FLUX.1 Kontext's inpainting pipeline: the prompt says what to do, the map how much "
        "each pixel may change; the image is edited at the Kontext resolution nearest its aspect ratio (see "
        "--own-size), which is the output's size"),
    "fill": editing.Variant(
        "--fill", "black-forest-labs/FLUX.1-Fill-dev", 50, 30.0,
        "edit with FLUX.1 Fill, which reads a mask and the masked image: each pixel joins the mask at the step its "
        "strength releases it"),
}


def build_parser():
    parser = cli.build_parser(
        "Differential img2img with FLUX.1: a grayscale map gives every pixel its own strength. --model takes any "
        "FLUX.1 checkpoint, as a Hub id or a local diffusers folder. The default model is gated: accept its "
        "licence on the Hugging Face Hub and log in with `hf auth login` first. FLUX.1-dev is guidance-distilled: "
        "--guidance-scale is an input of the model, not classifier-free guidance, and --negative-prompt is used "
        "only with --true-cfg-scale above 1. Flux samples with flow matching, so --scheduler keeps the model's own.",
        default_model=DEFAULT_MODEL,
        default_steps=28,
        default_guidance=3.5,
    )
    parser.common_flags["guidance_scale"].help = (
        "FLUX.1-dev's distilled guidance, an input of the transformer (one pass per step, not classifier-free "
        "guidance); FLUX.1-schnell ignores it (default: %(default)g)")
    parser.add_argument(
        "--true-cfg-scale", type=cli.real_number(1.0), default=1.0, metavar="G",
        help="true classifier-free guidance with --negative-prompt, at least 1; above 1 it runs the transformer "
        "twice per step; not with --fill (default: 1, off)",
    )
    editing.add_variants(parser, VARIANTS)
    editing.add_reference(parser, needs="--kontext")
    parser.groups["edit models"].add_argument(
        "--own-size", action="store_true", help="with --kontext: edit at the image's own size, in multiples of 16 "
        "pixels, instead of the Kontext resolution nearest its aspect ratio (default: off)")
    parser.checks.append(check_flags)
    return parser


def check_flags(args):
    if args.own_size and not args.kontext:
        raise cli.CliError("--own-size keeps --kontext from resizing the image: pass --kontext too, or drop --own-size")
    if args.kontext and args.crop_margin is not None and not args.own_size:
        raise cli.CliError("--crop-margin edits the crop at its own size, and --kontext resizes what it edits to a "
                           "Kontext resolution: pass --own-size too")
    if args.fill and args.true_cfg_scale != 1:
        raise cli.CliError("FLUX.1 Fill takes no negative prompt: drop --true-cfg-scale with --fill")


def load_pipelines(args):
    if args.scheduler != "default":
        raise cli.CliError(
            f"--scheduler {args.scheduler} is a sampler for SD 1.x/2.x and SDXL; Flux samples with flow matching: "
            "leave --scheduler default"
        )
    # By package, so that families never collide.
    variant = editing.chosen_variant(args, VARIANTS)
    if variant == "kontext":
        from Flux.diff_pipe_kontext import FluxKontextDiffInpaintPipeline as pipeline_class
    elif variant == "fill":
        from Flux.diff_pipe_fill import FluxDiffFillPipeline as pipeline_class
    else:
        from Flux.diff_pipe import FluxDiffImg2ImgPipeline as pipeline_class
    return loading.load_pipeline(
        pipeline_class, args.model, torch_dtype=cli.torch_dtype(args.dtype), device=args.device, offload=args.offload,
    )


def working_size(image):
    """(width, height): the image's own size rounded down to what the model takes (stock would use 1024 x 1024)."""
    return tuple(max(SIZE_MULTIPLE, n - n % SIZE_MULTIPLE) for n in image.size)


def edit(pipe, args, *, images, maps, prompts, negative_prompts, seeds):
    """Edits a batch (lists of equal length) with the sampling settings in `args`; returns (images, steps run)."""
    for image in images:  # below one patch, working_size would scale the image up without a word
        cli.check_image_size(image, pipe)
    call = dict(prompt=prompts, image=images, invert_map=args.invert_map, strength=args.strength,
                keep_exact=args.keep_exact, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                generator=[loading.make_generator(seed) for seed in seeds])
    if not args.fill:
        call.update(negative_prompt=[text or "" for text in negative_prompts], true_cfg_scale=args.true_cfg_scale)
    if args.kontext:  # stock sizes the edit from the image, and the map follows the image through its resize
        call.update(map=maps, image_reference=editing.reference_image(args), _auto_resize=not args.own_size)
    else:
        width, height = working_size(images[0])
        # Stock resizes the image to (width, height): the map follows, or rounding could break their aspect.
        call.update(map=[cli.stretch_map(map_image, (width, height)) for map_image in maps], height=height,
                    width=width)
    return running.edit_images(pipe, args, **call), pipe.num_timesteps


def run():
    args = cli.parse_args(build_parser())
    image, map_image = cli.load_inputs(args)
    pipe = load_pipelines(args)
    started = time.perf_counter()
    (result,), steps_run = edit(
        pipe, args, images=[image], maps=[map_image], prompts=[args.prompt],
        negative_prompts=[args.negative_prompt], seeds=[args.seed],
    )
    results.save_result(result, args, image=image, map_image=map_image, steps_run=steps_run,
                        seconds=time.perf_counter() - started, extra_params=png_parameters(args))


def png_parameters(args):
    """What the PNG text records of the variant, beside the command that holds every flag."""
    variant = editing.chosen_variant(args, VARIANTS)
    if variant == "img2img":
        return {}
    return {"variant": variant, **({"reference": args.reference} if args.reference else {}),
            **({"own_size": True} if args.own_size else {})}


if __name__ == "__main__":
    cli.main(run)
