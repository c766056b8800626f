"""Edit an image with DeepFloyd IF, giving each pixel its own strength through a map.

    python IF/run.py                      # the example in assets/, with the default models
    python IF/run.py --image photo.jpg --map map.png --prompt "a watercolour painting" --output edit.png

Three stages, as in the authors' script:
  I    DeepFloyd/IF-I-XL-v1.0 edits the image at 64 px, with the map;
  II   DeepFloyd/IF-II-L-v1.0 edits it at 256 px, with the map, guided by the stage I result;
  III  stabilityai/stable-diffusion-x4-upscaler upscales to 1024 px, without the map.
Stages I and II share one T5 text encoder: stage II is loaded without it and takes stage I's prompt embeddings.
Stage III is a Stable Diffusion upscaler with its own CLIP text encoder, so it reads the prompt text itself.
Each stage before the last writes <output>-stage1.png, <output>-stage2.png; --output is the last stage's image.

--crop-margin PX (PX counts the input's pixels, scaled to each stage's): stages I and II each edit only the box
around the pixels the map releases and paste it into the input at their size; stage III upscales only stage II's
box and pastes it into the input resized to the output's size. Outside stage II's box, the result is the input
resized (bicubic), byte for byte; inside, the chain's edit of the crop. A map that releases no pixel at stage II
gives that resized input without running stage III.

The IF models are gated: accept the licence at https://huggingface.co/DeepFloyd/IF-I-XL-v1.0 and log in with
`hf auth login` once. The safety checker and the watermarker stay off, as in the authors' script.

`build_parser`, `load_pipelines` and `edit` are also what batch editing uses, so both run the same code.
"""

import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import cli, loading, results, running  # noqa: E402
from tools.crop import edit_on_crop  # noqa: E402

DEFAULT_MODEL = "DeepFloyd/IF-I-XL-v1.0"
DEFAULT_STAGE2_MODEL = "DeepFloyd/IF-II-L-v1.0"
DEFAULT_STAGE3_MODEL = "stabilityai/stable-diffusion-x4-upscaler"

# IF's UNets predict a learned variance beside the noise; only these samplers read it.
IF_SCHEDULERS = ("default", "ddpm", "dpm++")

# The authors' settings: the stock pipelines' defaults, and no added noise before the x4 upscaler.
STAGE1_STEPS, STAGE1_GUIDANCE = 80, 10.0
STAGE2_STEPS, STAGE2_GUIDANCE, STAGE2_NOISE_LEVEL = 50, 4.0, 250
STAGE3_STEPS, STAGE3_GUIDANCE, STAGE3_NOISE_LEVEL = 75, 9.0, 0
STAGE3_MAX_NOISE_LEVEL = 350  # the x4 upscaler's max_noise_level

# The authors' script runs without them; the IF licence asks you to keep results that are shown to the public safe.
NO_SAFETY_CHECKER_OR_WATERMARK = dict(safety_checker=None, feature_extractor=None, watermarker=None)


class IFPipelines(NamedTuple):
    stage1: object
    stage2: object = None  # None when --stages stops before it
    stage3: object = None


def build_parser():
    parser = cli.build_parser(
        "Differential img2img with DeepFloyd IF: a grayscale map gives every pixel its own strength. Stage I "
        "(--model, 64 px) and stage II (--stage2-model, 256 px) edit with the map; stage III "
        "(--stage3-model, the x4 upscaler) upscales the result to 1024 px. The IF models are gated: accept the "
        f"licence at https://huggingface.co/{DEFAULT_MODEL} and log in with `hf auth login`.",
        default_model=DEFAULT_MODEL,
        default_steps=STAGE1_STEPS,
        default_guidance=STAGE1_GUIDANCE,
    )
    flags = parser.common_flags  # the common flags, whose help and choices IF words its own way
    flags["model"].help = f"stage I model: Hub id or local diffusers folder (default: {DEFAULT_MODEL})"
    flags["steps"].help = f"stage I denoising steps, 1 to {cli.MAX_STEPS} (default: {STAGE1_STEPS})"
    flags["guidance_scale"].help = ("stage I classifier-free guidance scale, at least 0; 1 or less turns guidance "
                                    f"off (default: {STAGE1_GUIDANCE:g})")
    flags["scheduler"].choices = IF_SCHEDULERS
    flags["scheduler"].help = ("sampler of stages I and II: 'default' keeps IF's DDPM; dpm++ is DPM-Solver++ "
                               "multistep; IF's learned variance rules out the others (default: default)")
    flags["offload"].help = "model CPU offload, for GPUs with little memory (default: on with CUDA)"
    parser.set_defaults(offload=None)  # None: on with CUDA, as in the authors' script
    parser.groups["model and hardware"].add_argument(
        "--no-offload", dest="offload", action="store_false",
        help="keep every model on the GPU: faster, but the three stages then hold about 22 GB of fp16 weights there",
    )
    flags["crop_margin"].help = ("stages I and II edit only the box around the pixels the map changes, grown by PX "
                                 "of the input's pixels (scaled to each stage's size), and paste it into the input; "
                                 "stage III upscales only stage II's box, into the input resized to the output's "
                                 "size (default: off, the whole frame)")
    _add_stage_flags(parser)
    parser.extra_outputs = lambda args, output: stage_paths(output, args.stages)
    return parser


def _add_stage_flags(parser):
    group = parser.add_argument_group("stages")
    group.add_argument(
        "--stages", type=int, choices=(1, 2, 3), default=3,
        help="stop after this stage: 1 gives 64 px, 2 gives 256 px, 3 gives 1024 px (default: 3)",
    )
    group.add_argument(
        "--stage2-model", default=DEFAULT_STAGE2_MODEL, metavar="ID_OR_PATH",
        help=f"stage II (IF super-resolution) model: Hub id or local folder (default: {DEFAULT_STAGE2_MODEL})",
    )
    group.add_argument(
        "--stage2-steps", type=cli.whole_number(1, cli.MAX_STEPS), default=STAGE2_STEPS, metavar="N",
        help=f"stage II denoising steps, 1 to {cli.MAX_STEPS} (default: {STAGE2_STEPS})",
    )
    group.add_argument(
        "--stage2-guidance-scale", type=cli.real_number(0.0), default=STAGE2_GUIDANCE, metavar="G",
        help=f"stage II classifier-free guidance scale, at least 0 (default: {STAGE2_GUIDANCE:g})",
    )
    group.add_argument(
        "--stage2-noise-level", type=cli.whole_number(0, 999), default=STAGE2_NOISE_LEVEL, metavar="N",
        help="noise added to the stage I result before stage II reads it, 0 to 999 "
        f"(default: {STAGE2_NOISE_LEVEL})",
    )
    group.add_argument(
        "--stage3-model", default=DEFAULT_STAGE3_MODEL, metavar="ID_OR_PATH",
        help=f"stage III x4 upscaler (a StableDiffusionUpscalePipeline): Hub id or local folder "
        f"(default: {DEFAULT_STAGE3_MODEL})",
    )
    group.add_argument(
        "--stage3-steps", type=cli.whole_number(1, cli.MAX_STEPS), default=STAGE3_STEPS, metavar="N",
        help=f"stage III denoising steps, 1 to {cli.MAX_STEPS} (default: {STAGE3_STEPS})",
    )
    group.add_argument(
        "--stage3-guidance-scale", type=cli.real_number(0.0), default=STAGE3_GUIDANCE, metavar="G",
        help=f"stage III classifier-free guidance scale, at least 0 (default: {STAGE3_GUIDANCE:g})",
    )
    group.add_argument(
        "--stage3-noise-level", type=cli.whole_number(0, STAGE3_MAX_NOISE_LEVEL), default=STAGE3_NOISE_LEVEL,
        metavar="N", help=f"noise added to the stage II result before upscaling, 0 to {STAGE3_MAX_NOISE_LEVEL} "
        f"(default: {STAGE3_NOISE_LEVEL})",
    )


def stage_paths(output: Path, stages: int) -> list[Path]:
    """Where the stages before the last write their images: <output stem>-stage1.png, ..."""
    return [output.with_name(f"{output.stem}-stage{stage}{output.suffix}") for stage in range(1, stages)]


def load_pipelines(args) -> IFPipelines:
    from IF.diff_pipe_I import IFDiffImg2ImgPipeline  # by package, so that families never collide
    from IF.diff_pipe_II import IFDiffImg2ImgSuperResolutionPipeline

    offload = args.device == "cuda" if args.offload is None else args.offload
    stage1 = _load_if_stage(IFDiffImg2ImgPipeline, args.model, "--model", args, offload, super_resolution=False)
    stage2 = stage3 = None
    if args.stages >= 2:
        # Stage II takes stage I's prompt embeddings: loading IF's T5 (4.8B parameters) twice would be waste.
        stage2 = _load_if_stage(IFDiffImg2ImgSuperResolutionPipeline, args.stage2_model, "--stage2-model", args,
                                offload, super_resolution=True, text_encoder=None)
    if args.stages == 3:
        from diffusers import StableDiffusionUpscalePipeline

        stage3 = loading.load_pipeline(
            StableDiffusionUpscalePipeline, args.stage3_model, torch_dtype=cli.torch_dtype(args.dtype),
            device=args.device, offload=offload, flag="--stage3-model", **NO_SAFETY_CHECKER_OR_WATERMARK,
        )
    return IFPipelines(stage1, stage2, stage3)


def _load_if_stage(pipeline_class, model, flag, args, offload, *, super_resolution, **components):
    load = dict(torch_dtype=cli.torch_dtype(args.dtype), device=args.device, offload=offload, flag=flag,
                requires_safety_checker=False, **NO_SAFETY_CHECKER_OR_WATERMARK, **components)
    pipe = None
    if args.dtype == "fp16":  # the IF repositories hold fp16 copies: half the download
        try:
            pipe = loading.load_pipeline(pipeline_class, model, variant="fp16", **load)
        except cli.CliError as error:
            if "variant" not in str(error):  # diffusers names the variant when a model has no fp16 files
                raise
    if pipe is None:
        pipe = loading.load_pipeline(pipeline_class, model, **load)
    _check_stage(pipe, model, flag, super_resolution)
    loading.set_scheduler(pipe, args.scheduler)
    return pipe


def _check_stage(pipe, model, flag, super_resolution):
    # A stage I UNet reads 3 channels; a stage II UNet reads 6, the noisy image and the upscaled stage I result.
    channels = pipe.unet.config.in_channels
    if super_resolution and channels != 6:
        raise cli.CliError(f"{flag} {model}: is not an IF super-resolution (stage II) model: its UNet reads "
                           f"{channels} channels, not 6")
    if not super_resolution and channels != 3:
        raise cli.CliError(f"{flag} {model}: is not an IF stage I model: its UNet reads {channels} channels, not 3; "
                           "a stage II model goes to --stage2-model")


def edit(pipelines, args, *, images, maps, prompts, negative_prompts, seeds, on_stage=None):
    """Edits a batch (lists of equal length) through the stages loaded; returns (images, steps run in all).

    `on_stage(stage, images, steps_run)`, if given, receives each stage's PIL images as soon as that stage is done,
    with the number of denoising steps run so far.
    """
    from diffusers.utils import is_bs4_available, is_ftfy_available, pt_to_pil
    from PIL import Image

    stage1, stage2, stage3 = pipelines
    generators = lambda: [loading.make_generator(seed) for seed in seeds]  # noqa: E731  (a fresh one for each stage)
    negative_prompts = [text or "" for text in negative_prompts]
    # IF was trained on cleaned captions; cleaning needs two optional packages.
    prompt_embeds, negative_prompt_embeds = stage1.encode_prompt(
        prompts, negative_prompt=negative_prompts, clean_caption=is_bs4_available() and is_ftfy_available()
    )
    with_map = dict(map=maps, invert_map=args.invert_map, strength=args.strength, keep_exact=args.keep_exact,
                    prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, output_type="pt")
    report = on_stage or (lambda stage, pil_images, steps_run: None)

    def run_stage(stage, **call):
        """The stage's images in [-1, 1], as IF hands them on, and the box it edited (None for the whole frame, or
        when the map releases no pixel). IF's loop takes only the older step callback: Ctrl-C stops through it."""
        with running.stopping_between_steps(stage, call, "callback"):
            if args.crop_margin is None:
                return stage(**call, **with_map).images, None
            # IF resizes the input's short side to the stage's sample size: the margin is scaled alike, rounded up.
            margin = math.ceil(args.crop_margin * stage.unet.config.sample_size / min(images[0].size))
            pixels, box = edit_on_crop(stage, margin, args.crop_upscale, **call, **with_map)
            return pixels * 2 - 1, box

    edited, box = run_stage(stage1, image=images, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                            generator=generators())
    steps_run = stage1.num_timesteps
    report(1, pt_to_pil(edited), steps_run)
    if stage2 is not None:
        edited, box = run_stage(stage2, image=edited, original_image=images, num_inference_steps=args.stage2_steps,
                                guidance_scale=args.stage2_guidance_scale, noise_level=args.stage2_noise_level,
                                generator=generators())
        steps_run += stage2.num_timesteps
        report(2, pt_to_pil(edited), steps_run)
    if stage3 is None:
        return pt_to_pil(edited), steps_run

    def upscale(pixels):  # the upscaler runs its whole schedule; like IF, it takes only the older step callback
        call = dict(prompt=prompts, negative_prompt=negative_prompts, image=(pixels / 2 + 0.5).clamp(0, 1),
                    num_inference_steps=args.stage3_steps, guidance_scale=args.stage3_guidance_scale,
                    noise_level=args.stage3_noise_level, generator=generators())
        with running.stopping_between_steps(stage3, call, "callback"):
            return stage3(**call).images

    if args.crop_margin is None:
        upscaled = upscale(edited)
        steps_run += args.stage3_steps
    else:  # outside stage II's crop its result is the input: so is the output, at the output's size
        factor, (height, width) = stage3.vae_scale_factor, edited.shape[-2:]
        upscaled = [image.convert("RGB").resize((width * factor, height * factor), Image.Resampling.BICUBIC)
                    for image in images]
        if box is not None:
            top, left, bottom, right = box
            for output, crop in zip(upscaled, upscale(edited[..., top:bottom, left:right])):
                output.paste(crop, (left * factor, top * factor))
            steps_run += args.stage3_steps
    report(3, upscaled, steps_run)
    return upscaled, steps_run


def stage_parameters(args) -> dict:
    """What the PNG text adds to the common parameters, so that a result can be made again."""
    names = ["stages", "stage2_model", "stage2_steps", "stage2_guidance_scale", "stage2_noise_level",
             "stage3_model", "stage3_steps", "stage3_guidance_scale", "stage3_noise_level"]
    return {name: getattr(args, name) for name in names}


def run():
    args = cli.parse_args(build_parser())
    image, map_image = cli.load_inputs(args)
    pipelines = load_pipelines(args)
    started = time.perf_counter()
    stage_files = dict(enumerate(stage_paths(args.output, args.stages), start=1))

    def save_stage(stage, images, steps_run):
        # Written at once: a later stage that fails (out of memory, say) leaves the earlier ones on disk.
        if stage in stage_files:
            text = results.png_parameters(args, steps_run, {**stage_parameters(args), "stage": stage})
            print(f"stage {stage}: {results.write_png(images[0], stage_files[stage], text, overwrite=args.overwrite)}")

    (result,), steps_run = edit(
        pipelines, args, images=[image], maps=[map_image], prompts=[args.prompt],
        negative_prompts=[args.negative_prompt], seeds=[args.seed], on_stage=save_stage,
    )
    results.save_result(result, args, image=image, map_image=map_image, steps_run=steps_run,
                        seconds=time.perf_counter() - started, extra_params=stage_parameters(args))


if __name__ == "__main__":
    cli.main(run)
