"""Edit an image with Z-Image, giving each pixel its own strength through a map.

    python ZImage/run.py                      # the example in assets/, with the default model
    python ZImage/run.py --image photo.jpg --map map.png --prompt "a watercolour painting" --output edit.png

The default steps and guidance are those of the example in diffusers' `ZImageImg2ImgPipeline` docstring (8 steps,
guidance 0, for the distilled Z-Image-Turbo); the model card of Tongyi-MAI/Z-Image-Turbo could not be consulted
offline when they were chosen.
`build_parser`, `load_pipelines` and `edit` are also what batch editing uses, so both run the same code.
"""

import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import cli, loading, results, running  # noqa: E402

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
SIZE_MULTIPLE = cli.PATCH_SIDE  # the working size is whole patches


def build_parser():
    parser = cli.build_parser(
        "Differential img2img with Z-Image: a grayscale map gives every pixel its own strength. --model takes any "
        "Z-Image checkpoint in diffusers format, as a Hub id or a local folder. Z-Image-Turbo is distilled to run "
        "without guidance (--guidance-scale 0); above 0, classifier-free guidance with --negative-prompt doubles the "
        "transformer's batch. Z-Image samples with flow matching, so --scheduler keeps the model's own.",
        default_model=DEFAULT_MODEL,
        default_steps=8,
        default_guidance=0.0,
    )
    parser.common_flags["guidance_scale"].help = (
        "classifier-free guidance scale: above 0 it doubles the transformer's batch with --negative-prompt; "
        "0 turns it off, as Z-Image-Turbo is meant to run (default: %(default)g)")
    return parser


def load_pipelines(args):
    if args.scheduler != "default":
        raise cli.CliError(
            f"--scheduler {args.scheduler} is a sampler for SD 1.x/2.x and SDXL; Z-Image samples with flow matching: "
            "leave --scheduler default"
        )
    from ZImage.diff_pipe import ZImageDiffImg2ImgPipeline  # by package, so that families never collide

    return loading.load_pipeline(
        ZImageDiffImg2ImgPipeline, args.model, torch_dtype=cli.torch_dtype(args.dtype), device=args.device,
        offload=args.offload,
    )


def working_size(image):
    """(width, height): the image's own size rounded down to what the model takes."""
    return tuple(max(SIZE_MULTIPLE, n - n % SIZE_MULTIPLE) for n in image.size)


def fitted(picture, size, smooth=Image.BILINEAR):
    # Z-Image does not resize to a given size: image and map are brought to `size` here, so that their aspects agree.
    if picture.size == size:
        return picture
    shrinking = picture.width >= size[0] and picture.height >= size[1]
    return picture.resize(size, Image.BOX if shrinking else smooth)


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
        image=[fitted(image, (width, height), Image.BICUBIC) for image in images],
        map=[fitted(map_image, (width, height)) for map_image in maps],
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
