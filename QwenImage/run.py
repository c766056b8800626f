"""Edit an image with Qwen-Image, giving each pixel its own strength through a map.

    python QwenImage/run.py                      # the example in assets/, with the default model
    python QwenImage/run.py --image photo.jpg --map map.png --prompt "a watercolour painting" --output edit.png
    python QwenImage/run.py --edit --image photo.jpg --map map.png --prompt "make it winter"   # edit by instruction

The default steps and guidance are those of diffusers' `QwenImageImg2ImgPipeline` (50 steps, true_cfg_scale 4, and
a negative prompt of " " when none is given, as its docstring example does); the model card of Qwen/Qwen-Image
could not be consulted offline when they were chosen.
`build_parser`, `load_pipelines` and `edit` are also what batch editing uses, so both run the same code.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import cli, editing, loading, results, running  # noqa: E402

DEFAULT_MODEL = "Qwen/Qwen-Image"
SIZE_MULTIPLE = cli.PATCH_SIDE  # the working size is whole patches
# Stock QwenImageEditInpaintPipeline defaults to the steps and true CFG of img2img; its docstring's model.
VARIANTS = {
    "img2img": editing.Variant(None, DEFAULT_MODEL, 50, 4.0),
    "edit": editing.Variant(
        "--edit", "Qwen/Qwen-Image-Edit", 50, 4.0,
        "edit by instruction with Qwen-Image-Edit's inpainting pipeline: the prompt says what to do, the map how "
        "much each pixel may change; as stock, the image is edited at about 1024x1024 pixels of its aspect ratio, "
        "which is the output's size"),
}


def build_parser():
    parser = cli.build_parser(
        "Differential img2img with Qwen-Image: a grayscale map gives every pixel its own strength. --model takes any "
        "Qwen-Image checkpoint in diffusers format, as a Hub id or a local folder. --guidance-scale is Qwen-Image's "
        "true_cfg_scale: above 1 it runs the transformer twice per step, once with --negative-prompt (\" \" when "
        "none is given). Qwen-Image samples with flow matching, so --scheduler keeps the model's own.",
        default_model=DEFAULT_MODEL,
        default_steps=50,
        default_guidance=4.0,
    )
    parser.common_flags["guidance_scale"].help = (
        "Qwen-Image's true_cfg_scale: above 1, true classifier-free guidance with --negative-prompt, two "
        "transformer passes per step; 1 or less turns it off (default: %(default)g)")
    editing.add_variants(parser, VARIANTS)

    def check_crop(args):
        if args.edit and args.crop_margin is not None:
            raise cli.CliError("--crop-margin edits the crop at its own size, and Qwen-Image-Edit edits every image at "
                               "about 1024x1024 pixels: drop --crop-margin")
    parser.checks.append(check_crop)
    return parser


def load_pipelines(args):
    if args.scheduler != "default":
        raise cli.CliError(
            f"--scheduler {args.scheduler} is a sampler for SD 1.x/2.x and SDXL; Qwen-Image samples with flow "
            "matching: leave --scheduler default"
        )
    # By package, so that families never collide.
    if args.edit:
        from QwenImage.diff_pipe_edit import QwenImageEditDiffInpaintPipeline as pipeline_class
    else:
        from QwenImage.diff_pipe import QwenImageDiffImg2ImgPipeline as pipeline_class
    return loading.load_pipeline(
        pipeline_class, args.model, torch_dtype=cli.torch_dtype(args.dtype), device=args.device,
        offload=args.offload,
    )


def working_size(image):
    """(width, height): the image's own size rounded down to what the model takes (stock would use 1024 x 1024)."""
    return tuple(max(SIZE_MULTIPLE, n - n % SIZE_MULTIPLE) for n in image.size)


def edit(pipe, args, *, images, maps, prompts, negative_prompts, seeds):
    """Edits a batch (lists of equal length) with the sampling settings in `args`; returns (images, steps run)."""
    for image in images:  # below one patch, working_size would scale the image up without a word
        cli.check_image_size(image, pipe)
    call = dict(
        prompt=prompts,
        # Stock runs true CFG whenever a negative prompt is given; " " is what diffusers' example gives for none.
        negative_prompt=[text or " " for text in negative_prompts],
        image=images,
        invert_map=args.invert_map,
        strength=args.strength,
        keep_exact=args.keep_exact,
        num_inference_steps=args.steps,
        true_cfg_scale=args.guidance_scale,
        generator=[loading.make_generator(seed) for seed in seeds],
    )
    if args.edit:  # stock sizes the edit from the image, and the map follows the image through its resize
        call.update(map=maps)
    else:
        width, height = working_size(images[0])
        # Stock resizes the image to (width, height): the map follows, or rounding could break their aspect.
        call.update(map=[cli.stretch_map(map_image, (width, height)) for map_image in maps], height=height,
                    width=width)
    images = running.edit_images(pipe, args, **call)
    return images, pipe.num_timesteps


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
                        seconds=time.perf_counter() - started, extra_params={"variant": "edit"} if args.edit else {})


if __name__ == "__main__":
    cli.main(run)
