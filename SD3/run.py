"""Edit an image with Stable Diffusion 3 or 3.5, giving each pixel its own strength through a map.

    python SD3/run.py                      # the example in assets/, with the default model (gated: see --help)
    python SD3/run.py --image photo.jpg --map map.png --prompt "a watercolour painting" --output edit.png

`build_parser`, `load_pipelines` and `edit` are also what batch editing uses, so both run the same code.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import cli, loading, results, running  # noqa: E402

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
SIZE_MULTIPLE = cli.PATCH_SIDE  # the working size is whole patches


def build_parser():
    return cli.build_parser(
        "Differential img2img with Stable Diffusion 3/3.5: a grayscale map gives every pixel its own strength. "
        "--model takes any SD3 or SD3.5 checkpoint, as a Hub id or a local diffusers folder. The default model is "
        "gated: accept its licence on the Hugging Face Hub and log in with `hf auth login` first. SD3 samples with "
        "flow matching, so --scheduler keeps the model's own.",
        default_model=DEFAULT_MODEL,
        default_steps=40,
        default_guidance=4.5,
    )


def load_pipelines(args):
    if args.scheduler != "default":
        raise cli.CliError(
            f"--scheduler {args.scheduler} is a sampler for SD 1.x/2.x and SDXL; SD3 samples with flow matching: "
            "leave --scheduler default"
        )
    from SD3.diff_pipe import StableDiffusion3DiffImg2ImgPipeline  # by package, so that families never collide

    return loading.load_pipeline(
        StableDiffusion3DiffImg2ImgPipeline, args.model, torch_dtype=cli.torch_dtype(args.dtype), device=args.device,
        offload=args.offload,
    )


def working_size(image):
    """(width, height): the image's own size rounded down to what the model takes (stock would use 1024 x 1024)."""
    return tuple(max(SIZE_MULTIPLE, n - n % SIZE_MULTIPLE) for n in image.size)


def edit(pipe, args, *, images, maps, prompts, negative_prompts, seeds):
    """Edits a batch (lists of equal length) with the sampling settings in `args`; returns (images, steps run)."""
    for image in images:  # below one patch, working_size would scale the image up without a word
        cli.check_image_size(image, pipe)
    width, height = working_size(images[0])
    images = running.edit_images(
        pipe,
        args,
        prompt=prompts,
        negative_prompt=[text or "" for text in negative_prompts],
        image=images,
        # Stock resizes the image to (width, height): the map follows, or rounding could break their aspect.
        map=[cli.stretch_map(map_image, (width, height)) for map_image in maps],
        height=height,
        width=width,
        invert_map=args.invert_map,
        strength=args.strength,
        keep_exact=args.keep_exact,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=[loading.make_generator(seed) for seed in seeds],
    )
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
                        seconds=time.perf_counter() - started)


if __name__ == "__main__":
    cli.main(run)
