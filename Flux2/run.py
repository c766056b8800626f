"""Edit an image by instruction with FLUX.2 [klein], giving each pixel its own strength through a map.

    python Flux2/run.py                      # the example in assets/, with the default model
    python Flux2/run.py --image photo.jpg --map map.png --prompt "make it winter" --reference style.png

The defaults are those of diffusers' `Flux2KleinInpaintPipeline` (50 steps, guidance 8) and its docstring's model.
`build_parser`, `load_pipelines` and `edit` are also what batch editing uses, so both run the same code.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import cli, editing, loading, results, running  # noqa: E402

DEFAULT_MODEL = "black-forest-labs/FLUX.2-klein-base-9B"
MAX_PIXELS = 1024 * 1024  # stock scales a larger image down to this area, and edits at that size


def build_parser():
    parser = cli.build_parser(
        "Differential inpainting with FLUX.2 [klein]: edit by instruction, with a grayscale map that gives every "
        "pixel its own strength. --model takes any FLUX.2 [klein] checkpoint in diffusers format, as a Hub id or a "
        "local folder. As stock, the image is edited at its own size in multiples of 16 pixels (scaled down to about "
        "1024x1024 pixels if larger), which is the output's size. FLUX.2 [klein] samples with flow matching, so "
        "--scheduler keeps the model's own.",
        default_model=DEFAULT_MODEL,
        default_steps=50,
        default_guidance=8.0,
        default_negative_prompt="",
    )
    parser.common_flags["guidance_scale"].help = (
        "classifier-free guidance against an empty prompt, two transformer passes per step; 1 or less, or a "
        "distilled checkpoint, turns it off (default: %(default)g)")
    parser.common_flags["negative_prompt"].help = (
        "what it should not show: the guidance runs against this prompt instead of stock's empty one (default: none)")
    editing.add_reference(parser)
    return parser


def load_pipelines(args):
    if args.scheduler != "default":
        raise cli.CliError(
            f"--scheduler {args.scheduler} is a sampler for SD 1.x/2.x and SDXL; FLUX.2 [klein] samples with flow "
            "matching: leave --scheduler default"
        )
    from Flux2.diff_pipe import Flux2KleinDiffInpaintPipeline  # by package, so that families never collide

    return loading.load_pipeline(
        Flux2KleinDiffInpaintPipeline, args.model, torch_dtype=cli.torch_dtype(args.dtype), device=args.device,
        offload=args.offload,
    )


def edit(pipe, args, *, images, maps, prompts, negative_prompts, seeds):
    """Edits a batch (lists of equal length) with the sampling settings in `args`; returns (images, steps run)."""
    for image in images:
        cli.check_image_size(image, pipe)
    negative = {}
    if any(negative_prompts):  # stock guides against an empty prompt, and takes another only as embeddings
        negative["negative_prompt_embeds"] = pipe.encode_prompt(
            prompt=[text or "" for text in negative_prompts], device=pipe._execution_device)[0]
    images = running.edit_images(
        pipe,
        args,
        **negative,
        prompt=prompts,
        image=images,
        image_reference=editing.reference_image(args),
        map=maps,  # stock sizes the edit from the image, and the map follows the image through its resize
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
                        seconds=time.perf_counter() - started,
                        extra_params={"reference": args.reference} if args.reference else {})


if __name__ == "__main__":
    cli.main(run)
