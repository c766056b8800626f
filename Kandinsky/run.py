"""Edit an image with Kandinsky 2.2, giving each pixel its own strength through a map.

    python Kandinsky/run.py                      # the example in assets/, with the default models
    python Kandinsky/run.py --image photo.jpg --map map.png --prompt "a watercolour painting" --output edit.png
    python Kandinsky/run.py --image photo.jpg --map map.png --image-weight 0.3   # the prior also sees the photo

Kandinsky 2.2 runs in two stages, as the authors run it: the prior (--prior) turns the prompt and the negative
prompt into CLIP image embeddings, and the decoder (--model) edits the image under them, with the map.
`build_parser`, `load_pipelines` and `edit` are also what batch editing uses, so both run the same code.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import cli, loading, results, running  # noqa: E402

DEFAULT_MODEL = "kandinsky-community/kandinsky-2-2-decoder"
DEFAULT_PRIOR = "kandinsky-community/kandinsky-2-2-prior"
# The decoder's MoVQ makes one latent of 8 x 8 pixels, and its UNet halves the latent grid three times.
SIZE_MULTIPLE = 64
MAX_SIZE = 4096


class Pipelines(NamedTuple):
    prior: object  # diffusers.KandinskyV22PriorPipeline
    decoder: object  # KandinskyV22DiffImg2ImgPipeline


def build_parser():
    parser = cli.build_parser(
        "Differential img2img with Kandinsky 2.2: a grayscale map gives every pixel its own strength. The prior "
        "(--prior) turns the prompt and the negative prompt into image embeddings; the decoder (--model) edits the "
        "image under them. --scheduler and --guidance-scale apply to the decoder.",
        default_model=DEFAULT_MODEL,
        default_steps=150,
        default_guidance=4.0,
    )
    group = parser.add_argument_group("Kandinsky 2.2")
    group.add_argument(
        "--prior", default=DEFAULT_PRIOR, metavar="MODEL",
        help="the prior: Hugging Face Hub id, or a local diffusers folder holding model_index.json "
        f"(default: {DEFAULT_PRIOR})",
    )
    group.add_argument(
        "--prior-steps", type=cli.whole_number(2, cli.MAX_STEPS), default=25, metavar="N",
        help=f"denoising steps of the prior, 2 to {cli.MAX_STEPS}: its UnCLIP scheduler needs two (default: 25)",
    )
    group.add_argument(
        "--prior-guidance-scale", type=cli.real_number(0), default=4.0, metavar="G",
        help="classifier-free guidance scale of the prior, at least 0; 1 or less turns it off (default: 4)",
    )
    group.add_argument(
        "--image-weight", type=cli.real_number(0, 1), default=0.0, metavar="W",
        help="condition on the input image as well as the prompt: the target embedding is W * CLIP(image) + "
        "(1 - W) * prior(prompt), as the prior's interpolate mixes them; 0.3 keeps more of the image's look "
        "(default: 0, the prompt alone)",
    )
    for flag in ("--height", "--width"):
        group.add_argument(
            flag, type=_image_side, default=512, metavar="PX",
            help=f"{flag[2:]} of the result in pixels, a multiple of {SIZE_MULTIPLE} up to {MAX_SIZE}; the image "
            "is resized to it (default: 512)",
        )
    return parser


def _image_side(text: str) -> int:
    value = cli.whole_number(SIZE_MULTIPLE, MAX_SIZE)(text)
    if value % SIZE_MULTIPLE:
        below = value // SIZE_MULTIPLE * SIZE_MULTIPLE
        raise argparse.ArgumentTypeError(
            f"must be a multiple of {SIZE_MULTIPLE} (Kandinsky 2.2 works on blocks of {SIZE_MULTIPLE} pixels), "
            f"got {value}; try {below} or {below + SIZE_MULTIPLE}"
        )
    return value


def load_pipelines(args):
    from diffusers import KandinskyV22PriorPipeline

    from Kandinsky.diff_pipe import KandinskyV22DiffImg2ImgPipeline

    load = dict(torch_dtype=cli.torch_dtype(args.dtype), device=args.device, offload=args.offload)
    prior = loading.load_pipeline(KandinskyV22PriorPipeline, args.prior, flag="--prior", **load)
    decoder = loading.load_pipeline(KandinskyV22DiffImg2ImgPipeline, args.model, **load)
    loading.set_scheduler(decoder, args.scheduler)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value % decoder.pixel_multiple:  # only a decoder of another architecture than Kandinsky 2.2's
            raise cli.CliError(f"{flag} {value}: the decoder {args.model} needs multiples of {decoder.pixel_multiple}")
    return Pipelines(prior, decoder)


def edit(pipelines, args, *, images, maps, prompts, negative_prompts, seeds):
    """Edits a batch (lists of equal length) with the sampling settings in `args`; returns (images, steps run).

    The steps run are the decoder's, which the map governs. Each item's prior runs alone with its own seed, so an
    item comes out as it would alone; the decoder then takes the whole batch, with a fresh generator per seed.
    """
    import torch

    embeddings = [
        image_embeddings(pipelines.prior, args, image, prompt, negative_prompt, seed)
        for image, prompt, negative_prompt, seed in zip(images, prompts, negative_prompts, seeds)
    ]
    images = running.edit_images(
        pipelines.decoder,
        args,
        image_embeds=torch.cat([positive for positive, _ in embeddings]),
        negative_image_embeds=torch.cat([negative for _, negative in embeddings]),
        image=images,
        map=maps,
        invert_map=args.invert_map,
        keep_exact=args.keep_exact,
        strength=args.strength,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=[loading.make_generator(seed) for seed in seeds],
    )
    return images, pipelines.decoder.num_timesteps


def image_embeddings(prior, args, image, prompt, negative_prompt, seed):
    """(image_embeds, negative_image_embeds) for one edit: one prior run on the prompt and the negative prompt.

    As in the authors' script, the negative embedding is the prior's embedding of the negative prompt; without a
    negative prompt it is the embedding of an empty image, diffusers' default.
    """
    output = prior(
        prompt,
        negative_prompt=negative_prompt or None,
        num_inference_steps=args.prior_steps,
        guidance_scale=args.prior_guidance_scale,
        generator=loading.make_generator(seed),
    )
    image_embeds = output.image_embeds
    if args.image_weight > 0:
        weight = args.image_weight
        image_embeds = weight * clip_image_embedding(prior, image) + (1 - weight) * image_embeds
    return image_embeds, output.negative_image_embeds


def clip_image_embedding(prior, image):
    """The CLIP embedding of `image`, made as KandinskyV22PriorPipeline.interpolate makes it for an image."""
    import torch

    encoder = prior.image_encoder
    pixel_values = prior.image_processor(image, return_tensors="pt").pixel_values
    with torch.no_grad():
        return encoder(pixel_values.to(device=prior._execution_device, dtype=encoder.dtype))["image_embeds"]


def run():
    args = cli.parse_args(build_parser())
    image, map_image = cli.load_inputs(args)
    if abs(image.width * args.height - image.height * args.width) > 0.01 * image.width * args.height:
        print(f"warning: the image ({image.width}x{image.height}) is stretched to {args.width}x{args.height}; "
              "give --width and --height its aspect ratio to keep its shape", file=sys.stderr)
    pipelines = load_pipelines(args)
    started = time.perf_counter()
    (result,), steps_run = edit(
        pipelines, args, images=[image], maps=[map_image], prompts=[args.prompt],
        negative_prompts=[args.negative_prompt], seeds=[args.seed],
    )
    extra = {name: getattr(args, name) for name in
             ("prior", "prior_steps", "prior_guidance_scale", "image_weight", "height", "width")}
    results.save_result(result, args, image=image, map_image=map_image, steps_run=steps_run,
                        seconds=time.perf_counter() - started, extra_params=extra)


if __name__ == "__main__":
    cli.main(run)
