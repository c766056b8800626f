"""The registry of pipeline families that tests/test_contract.py and tests/test_conformance.py run beside stock: an
entry is our class, stock's, tiny components, one edit's inputs, and the few facts in which families differ; where a
family cannot do a contract item, its `skip` says why."""

import contextlib
import copy
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import (
    ChromaImg2ImgPipeline, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, FlowMatchLCMScheduler, Flux2KleinInpaintPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline, FluxKontextInpaintPipeline, IFImg2ImgPipeline, IFImg2ImgSuperResolutionPipeline,
    KandinskyV22Img2ImgPipeline, QwenImageEditInpaintPipeline, QwenImageImg2ImgPipeline,
    StableDiffusion3Img2ImgPipeline, StableDiffusionControlNetImg2ImgPipeline, StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline, StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline, WanVideoToVideoPipeline, ZImageImg2ImgPipeline
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux2.pipeline_flux2_klein_inpaint import compute_empirical_mu

from benchmarks.harness import denoiser
from Chroma.diff_pipe import ChromaDiffImg2ImgPipeline
from Flux.diff_pipe import FluxDiffImg2ImgPipeline
from Flux.diff_pipe_fill import FluxDiffFillPipeline
from Flux.diff_pipe_kontext import FluxKontextDiffInpaintPipeline
from Flux2.diff_pipe import Flux2KleinDiffInpaintPipeline
from IF.diff_pipe_I import IFDiffImg2ImgPipeline
from IF.diff_pipe_II import IFDiffImg2ImgSuperResolutionPipeline
from Kandinsky.diff_pipe import KandinskyV22DiffImg2ImgPipeline
from QwenImage.diff_pipe import QwenImageDiffImg2ImgPipeline
from QwenImage.diff_pipe_edit import QwenImageEditDiffInpaintPipeline
from SD2.diff_pipe import StableDiffusionDiffImg2ImgPipeline
from SD2.diff_pipe_controlnet import StableDiffusionControlNetDiffImg2ImgPipeline
from SD2.diff_pipe_inpaint import StableDiffusionDiffInpaintPipeline
from SD3.diff_pipe import StableDiffusion3DiffImg2ImgPipeline
from SDXL.diff_pipe import StableDiffusionXLDiffImg2ImgPipeline
from SDXL.diff_pipe_controlnet import StableDiffusionXLControlNetDiffImg2ImgPipeline
from SDXL.diff_pipe_inpaint import StableDiffusionXLDiffInpaintPipeline
from Wan.diff_pipe import WanDiffVideoToVideoPipeline
from ZImage.diff_pipe import ZImageDiffImg2ImgPipeline
from tests.edit_models import flux2_klein_components
from tests.fill_models import flux_fill_components
from tests.flow_models import flux_components, sd3_components, x0_and_noise
from tests.flow_models2 import chroma_components, qwen_x0_and_noise, qwenimage_components, zimage_components
from tests.qwen_edit_models import qwenimage_edit_components, small_working_area
from tests.tiny_models import (
    if_stage1_components, if_stage2_components, kandinsky_decoder_components, sd_components, sd_controlnet_components,
    sd_inpaint_components, sdxl_components, sdxl_controlnet_components, sdxl_inpaint_components, seeded_generator,
    test_image
)
from tests.video_models import wan_components

PROMPTS = ["a red apple on a table", "a blue pear"]  # one per batch item
# The contract edits 32 px images (16 x 16 latents): a quarter of the work of the family files' 64 px. Maps are drawn
# at 64 px, and each family averages them onto its own grid.
SIZE = 32
MAP_SIZE = 64

# Our keyword-only arguments, with their defaults, in their order after stock's: every family takes them.
OUR_ARGUMENTS = {"map": None, "invert_map": False, "keep_exact": False}

# Stock's release rules: SD, SDXL, Kandinsky and IF run int(T * s) steps; flow-matching img2img starts at
# int(T - T * s), which runs ceil(T * s) steps where T * s is not whole. Both in float64, as stock computes them.
FLOOR, FLOW = "floor", "flow"


def steps_run(rule: str, num_inference_steps: int, strength: float) -> int:
    """The steps that stock img2img runs at `strength`, by its own expression."""
    if rule == FLOOR:
        return int(num_inference_steps * strength)
    return num_inference_steps - int(num_inference_steps - num_inference_steps * strength)


# Maps


def band_map(*keeps, edges=None) -> np.ndarray:
    """A keep map of vertical bands, left to right, between `edges` (in map pixels; equal widths by default)."""
    edges = edges or [MAP_SIZE * i // len(keeps) for i in range(len(keeps) + 1)]
    keep_map = np.empty((MAP_SIZE, MAP_SIZE), np.float32)
    for keep, (start, stop) in zip(keeps, pairwise(edges)):
        keep_map[:, start:stop] = keep
    return keep_map


def band_columns(edges, width: int) -> list:
    """The columns of each band on a grid `width` cells wide."""
    return [slice(start * width // MAP_SIZE, stop * width // MAP_SIZE) for start, stop in pairwise(edges)]


# Band edges at 12, 28 and 44 map pixels: whole cells of every grid (a 16-cell grid has 4 map pixels to a cell), but
# odd latent columns (3, 7, 11), which fall inside the 2x2 patches of packed families, so that a map packed in
# another order than the latents shows.
FOUR_EDGES = [0, 12, 28, 44, MAP_SIZE]


# x0 and noise as stock draws them (VAE sample first, then noise, from one generator), recomputed here


def pixels(pipe, inputs):
    return pipe.image_processor.preprocess(inputs["image"], height=inputs.get("height"), width=inputs.get("width"))


@torch.no_grad()
def vae_x0_and_noise(pipe, inputs):
    """SD, SDXL and their ControlNet and inpainting variants."""
    generator = seeded_generator()
    x0 = pipe.vae.encode(pixels(pipe, inputs)).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
    return x0, torch.randn(x0.shape, generator=generator)


@torch.no_grad()
def movq_x0_and_noise(pipe, inputs):
    """Kandinsky: the MoVQ's unquantised latents, then one noise draw."""
    pixels = pipe.image_processor.preprocess(inputs["image"], inputs["height"], inputs["width"])
    # Stock copies the latents with torch.cat; the MoVQ decodes the encoder's strided layout a few ulps apart.
    x0 = pipe.movq.encode(pixels).latents.contiguous()
    return x0, torch.randn(x0.shape, generator=seeded_generator())


def if_pixels(image, size: int) -> torch.Tensor:
    """The pixels IF starts from: bicubic resize to the stage's size, then [-1, 1]."""
    resized = image.resize((size, size), resample=PIL.Image.Resampling.BICUBIC, reducing_gap=None)
    return torch.from_numpy(np.asarray(resized, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def if_x0_and_noise(pipe, inputs):
    """IF denoises pixels: x0 is the edited image at the stage's size, and the noise is the generator's first draw."""
    images = inputs.get("original_image") or inputs["image"]
    images = images if isinstance(images, list) else [images]
    x0 = torch.cat([if_pixels(image, pipe.unet.config.sample_size) for image in images])
    return x0, torch.randn(x0.shape, generator=seeded_generator())


@torch.no_grad()
def flow_x0_and_noise(pipe, inputs):
    """SD3, Flux, Chroma, Z-Image: x0 shifted and scaled as stock does."""
    return x0_and_noise(pipe, pixels(pipe, inputs))


@torch.no_grad()
def kontext_x0_and_noise(pipe, inputs):
    """FLUX.1 Kontext encodes the image with the VAE's mode: the generator draws only the noise."""
    config = pipe.vae.config
    x0 = (pipe.vae.encode(pixels(pipe, inputs)).latent_dist.mode() - config.shift_factor) * config.scaling_factor
    return x0, torch.randn(x0.shape, generator=seeded_generator())


def klein_statistics(pipe):
    """The mean and std of FLUX.2's batch norm, with which stock normalises its latents folded into 2x2 patches."""
    bn, eps = pipe.vae.bn, pipe.vae.config.batch_norm_eps
    return bn.running_mean.view(1, -1, 1, 1), torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps)


@torch.no_grad()
def klein_x0_and_noise(pipe, inputs):
    """FLUX.2 [klein] encodes the image with the VAE's mode, folds each 2x2 patch of latents into channels and
    normalises them; the generator draws only the noise, folded. Both unfolded onto the latent grid."""
    mean, std = klein_statistics(pipe)
    x0 = (pipe._patchify_latents(pipe.vae.encode(pixels(pipe, inputs)).latent_dist.mode()) - mean) / std
    noise = torch.randn(x0.shape, generator=seeded_generator())
    return pipe._unpatchify_latents(x0), pipe._unpatchify_latents(noise)


@torch.no_grad()
def qwen_latents_x0_and_noise(pipe, inputs):
    """Qwen-Image: (B, C, 1, H, W) latents, normalised with the VAE's latent mean and std."""
    return qwen_x0_and_noise(pipe, pixels(pipe, inputs))


@torch.no_grad()
def wan_x0_and_noise(pipe, inputs):
    """Wan: each video encoded alone with the VAE's mode and normalised with its latent mean and std, as stock does;
    the generator draws only the noise, one per prompt."""
    videos = pipe.video_processor.preprocess_video(inputs["video"], height=inputs["height"], width=inputs["width"])
    x0 = torch.cat([pipe.vae.encode(video[None]).latent_dist.mode() for video in videos])
    mean, std = wan_statistics(pipe)
    x0 = (x0 - mean) * (1.0 / std)
    prompts = 1 if isinstance(inputs["prompt"], str) else len(inputs["prompt"])
    return x0, torch.randn((prompts, *x0.shape[1:]), generator=seeded_generator())


def wan_statistics(pipe):
    shape = (1, pipe.vae.config.z_dim, 1, 1, 1)
    return (torch.tensor(pipe.vae.config.latents_mean).view(shape),
            torch.tensor(pipe.vae.config.latents_std).view(shape))


# x0 decoded as stock decodes it, to images in [0, 1]


def unit_range(images):
    return (images / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def vae_decode(pipe, x0):
    return unit_range(pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample)


@torch.no_grad()
def movq_decode(pipe, x0):
    return unit_range(pipe.movq.decode(x0, force_not_quantize=True).sample)


@torch.no_grad()
def flow_decode(pipe, x0):
    config = pipe.vae.config
    return unit_range(pipe.vae.decode(x0 / config.scaling_factor + config.shift_factor).sample)


def unpacked_flow_decode(pipe, x0):
    # A packing family decodes unpacked, contiguous latents; the VAE's convolutions round differently on the
    # encoder's strided layout.
    return flow_decode(pipe, x0.contiguous())


@torch.no_grad()
def qwen_decode(pipe, x0):
    config = pipe.vae.config
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
    return unit_range(pipe.vae.decode(x0.contiguous() / (1.0 / std) + mean).sample[:, :, 0])


@torch.no_grad()
def klein_decode(pipe, x0):
    """FLUX.2 [klein] de-normalises the loop's latents, folded, then decodes them unfolded."""
    mean, std = klein_statistics(pipe)
    return unit_range(pipe.vae.decode(pipe._unpatchify_latents(pipe._patchify_latents(x0) * std + mean)).sample)


@torch.no_grad()
def wan_decode(pipe, x0):
    """Wan: (B, 3, F, H, W) videos."""
    mean, std = wan_statistics(pipe)
    return unit_range(pipe.vae.decode(x0 / (1.0 / std) + mean).sample)


# The edited input in [0, 1], laid out as the family's "pt" output


def unit_pixels(pipe, inputs):
    return pixels(pipe, inputs) / 2 + 0.5


def wan_unit_pixels(pipe, inputs):
    """Wan's "pt" output is (B, F, 3, H, W); its video processor makes (B, 3, F, H, W)."""
    videos = pipe.video_processor.preprocess_video(inputs["video"], height=inputs["height"], width=inputs["width"])
    return (videos / 2 + 0.5).transpose(1, 2)


# Stock's schedule of T steps, set on a copy of the scheduler


def plain_schedule(scheduler, num_inference_steps):
    reference = copy.deepcopy(scheduler)
    reference.set_timesteps(num_inference_steps)
    return reference


def shifted_schedule(scheduler, num_inference_steps):
    """Flux, Chroma and Qwen-Image: linspace sigmas, shifted by the token count of the image (a token a 2x2 patch
    of latents; 2 px a latent)."""
    reference, config = copy.deepcopy(scheduler), scheduler.config
    tokens = (SIZE // 2 // 2) ** 2
    mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), mu=mu)
    return reference


def zimage_schedule(scheduler, num_inference_steps):
    """Z-Image: a fixed shift, on float32 linspace sigmas."""
    reference = copy.deepcopy(scheduler)
    reference.set_timesteps(sigmas=torch.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist())
    return reference


def klein_schedule(scheduler, num_inference_steps):
    """FLUX.2: linspace sigmas, shifted by an empirical function of the token count and the step count (a token a 2x2
    patch of latents; the tiny VAE's latents are pixels)."""
    reference = copy.deepcopy(scheduler)
    mu = compute_empirical_mu((SIZE // 2) ** 2, num_inference_steps)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), mu=mu)
    return reference


def unpack(pipe, latents):
    """Packed (B, tokens, 4C) latents of the contract's images back on the latent grid, by stock's own
    `_unpack_latents`."""
    return pipe._unpack_latents(latents, SIZE, SIZE, pipe.vae_scale_factor)


def klein_on_grid(pipe, latents):
    """FLUX.2 [klein]'s latents on the latent grid: the loop's (B, tokens, 4C) unpacked by stock's own
    `_unpack_latents_with_ids` and unfolded; stock's latent output, already unfolded, normalised again (exactly: the
    tiny VAE's mean is 0 and its std 2)."""
    if latents.ndim == 4:
        mean, std = klein_statistics(pipe)
        return pipe._unpatchify_latents((pipe._patchify_latents(latents) - mean) / std)
    side = SIZE // pipe.vae_scale_factor // 2
    ids = pipe._prepare_latent_ids(torch.zeros(latents.shape[0], latents.shape[2], side, side))
    return pipe._unpatchify_latents(pipe._unpack_latents_with_ids(latents, ids))


# The registry


@dataclass(frozen=True)
class Family:
    ours: type
    stock: type
    components: Callable[[], dict]
    inputs: Callable[[int], dict]  # batch item 0 or 1: all but map, strength, steps, generator and output type
    rule: str = FLOOR
    x0_and_noise: Callable = vae_x0_and_noise  # (pipe, inputs) -> x0 and noise on the map's grid
    decode: Callable = vae_decode  # (pipe, x0) -> (B, 3, H, W) images in [0, 1]
    schedule: Callable = plain_schedule  # (scheduler, T) -> a copy on stock's schedule of T steps
    on_grid: Callable = None  # (pipe, latents) -> the loop's latents on the latent grid, where the loop packs them
    denoisers: Callable = lambda pipe: [denoiser(pipe)]  # the models that run once per step
    # Runs that make a known number of calls per step: name -> (inputs, calls of each denoiser per step).
    calls: dict = field(default_factory=lambda: {"default": ({}, 1)})
    no_guidance: dict = field(default_factory=lambda: {"guidance_scale": 1.0})  # one call of each denoiser a step
    schedulers: tuple = ()  # other scheduler classes, built from the components' config, that stock equivalence runs
    stock_inputs: dict = field(default_factory=dict)  # what stock needs for the same edit, besides `strength`
    edited: str = "image"  # the argument that holds the image being edited
    output: str = "images"  # the field of stock's output that holds them
    unit_pixels: Callable = unit_pixels  # (pipe, inputs) -> the edited input in [0, 1], laid out as the "pt" output
    # The argument that asks stock for copies of each output; None where stock makes one per prompt whatever is asked.
    copies_argument: str = "num_images_per_prompt"
    maps: Callable = list  # a list of one still map per batch item -> the `map` that gives each item its own
    repeats: str = "whole"  # stock's order of num_images_per_prompt copies: "whole" (a, b, a, b) or "each" (a, a, b, b)
    starts_from_noise: bool = False  # pixels released at step 0 start on pure noise, as stock at strength 1 does
    batch_inputs: dict = field(default_factory=dict)  # changes for the batch-against-single-runs checks
    image_as_latents: Callable = None  # x0 -> `image`, where stock encodes one image once for all its copies
    extra_arguments: dict = field(default_factory=dict)  # our keyword-only arguments besides OUR_ARGUMENTS
    passed_through: dict = field(default_factory=dict)  # non-default stock arguments that must reach stock as given
    withheld: frozenset = frozenset()  # stock arguments that ours refuses, and so leaves to stock's defaults
    # Stock inpaints with a binary `mask_image` (white = repaint), which the map replaces: without a map, ours is stock.
    binary_mask: bool = False
    refusals: tuple = ()  # the family's own bad inputs: (changes, message[, error type]), beside the contract's
    features: frozenset = frozenset()  # stock features run side by side in tests/test_conformance.py
    skip: dict = field(default_factory=dict)  # contract check -> why this family cannot do it
    # Entered around each of the family's tests in tests/test_contract.py and tests/test_conformance.py
    # (`family_context`): where stock fixes a working size too large for tiny models on a CPU, a smaller one, which
    # stock and ours both take from stock's own code, so that ours is still compared with stock.
    context: Callable = contextlib.nullcontext


def prompt_inputs(item=0):
    return dict(prompt=PROMPTS[item], image=test_image(SIZE, seed=item))


def sized_inputs(item=0):
    # For the pipelines that make images of their UNet's or transformer's default size (64 px here) unless told.
    return {**prompt_inputs(item), "height": SIZE, "width": SIZE}


def control_inputs(item=0):
    return {**prompt_inputs(item), "control_image": test_image(SIZE, seed=7 + item).transpose(0)}


def kandinsky_inputs(item=0):
    """The prior's image embeddings (size 32) stand in random; the decoder is what is tested."""
    return dict(image_embeds=torch.randn(1, 32, generator=seeded_generator(1 + item)), height=SIZE, width=SIZE,
                negative_image_embeds=torch.randn(1, 32, generator=seeded_generator(101 + item)),
                image=test_image(SIZE, seed=item))


# IF works in pixels: stage I makes SIZE / 2 px images here, and stage II upscales them to SIZE px, so that stage II
# has the grid of the latent families' images. Each edits an image of its own size, so that keep_exact can hand back
# the input's bytes; tests/test_if.py runs 32 px and 64 px stages, and resizes.
def if_stage1_inputs(item=0):
    return dict(prompt=PROMPTS[item], image=test_image(SIZE // 2, seed=item), clean_caption=False)


def if_stage2_inputs(item=0):
    """Stage II takes the stage I result and the original being edited."""
    return dict(image=test_image(SIZE // 2, seed=10 + item), original_image=test_image(SIZE, seed=item),
                prompt=PROMPTS[item], clean_caption=False)


def packed_flow_inputs(item=0):
    # Stock Flux, Chroma and Qwen-Image resize to 1024 px unless told.
    return {**prompt_inputs(item), "height": SIZE, "width": SIZE, "max_sequence_length": 32}


LATENTS = torch.zeros(1, 4, SIZE // 2, SIZE // 2)
WHITE_MASK = PIL.Image.new("L", (SIZE, SIZE), 255)  # stock inpainting's mask that repaints everything
LATENTS_NOT_TAKEN = "`latents` is not supported"
FLOW_SCHEDULERS = (FlowMatchLCMScheduler,)  # draws fresh noise from torch's global generator: runs reseed it
SD_FEATURES = frozenset({"ip_adapter", "lora", "step_end_steering", "vae_swap"})

# What the two ControlNet and the two inpainting entries share.
CONTROLNET = dict(denoisers=lambda pipe: [pipe.unet, pipe.controlnet],
                  refusals=((dict(control_image=None), "control_image"),
                            (dict(latents=torch.zeros(1, 4, 8, 8)), "`latents` must be a tensor shaped like")))
INPAINT_REFUSALS = ((dict(mask_image=WHITE_MASK), "map=mask, invert_map=True"),
                    (dict(latents=LATENTS), "`latents` is not taken"))
INPAINT_SKIPS = {"copies alone": "stock inpainting encodes only the first images with a list of generators, so a copy "
                                 "is not its own run; tests/test_inpaint.py checks the masks each copy's UNet reads"}
INPAINT = dict(stock_inputs={"mask_image": WHITE_MASK}, starts_from_noise=True, skip=INPAINT_SKIPS)
# What the two IF stages share. A batched UNet rounds apart from a single one in the last bits, and IF's guidance of 7
# magnifies that to 1e-3 in stock IF too; without guidance the batch is the single runs to float32 rounding.
IF = dict(x0_and_noise=if_x0_and_noise, decode=lambda pipe, x0: unit_range(x0), repeats="each",
          schedulers=(DPMSolverMultistepScheduler,), batch_inputs={"guidance_scale": 1.0}, skip={
              "step-end callback": "stock IF takes the older callback(i, t, images); tests/test_if.py checks it",
              "latent output": "IF denoises pixels: it has no latent output",
              "keep_exact blend": "IF denoises pixels: pixels that no step runs on already end as x0, so the blend "
                                  "changes nothing; tests/test_if.py checks that",
          })
# Flux, Chroma and Qwen-Image each take x0 as `image` for copies (`image_as_latents`): stock encodes one image with
# the first generator only.
PACKED = dict(rule=FLOW, schedule=shifted_schedule, on_grid=unpack, schedulers=FLOW_SCHEDULERS,
              refusals=((dict(latents=torch.zeros(1, 256, 16)), LATENTS_NOT_TAKEN),
                        (dict(image=torch.zeros(1, 4, 8, 8)), "height=16 and width=16")))


# The inpainting pipelines of the instruction editors, whose binary mask the map replaces (design, section 8).
EDIT = dict(rule=FLOW, schedule=shifted_schedule, on_grid=unpack, decode=unpacked_flow_decode, binary_mask=True,
            schedulers=FLOW_SCHEDULERS, stock_inputs={"mask_image": WHITE_MASK}, withheld=frozenset({"latents"}),
            refusals=((dict(mask_image=WHITE_MASK), "map=mask, invert_map=True"),
                      (dict(latents=torch.zeros(1, 256, 16)), LATENTS_NOT_TAKEN)))

# FLUX.1 Fill makes its masked image from the image's pixels, which the map replaces too.
FILL = {**EDIT, "withheld": frozenset({"latents", "masked_image_latents"}), "refusals": EDIT["refusals"] + (
    (dict(masked_image_latents=torch.zeros(1, 64, 32)), "`map` or `masked_image_latents`"),
    (dict(image=torch.zeros(1, 4, 16, 16)), "as pixels, not latents"),
)}


def kontext_inputs(item=0):
    # Kontext resizes to its own resolutions unless told, to the image's size at `max_area`.
    return {**packed_flow_inputs(item), "_auto_resize": False, "max_area": SIZE * SIZE}


def klein_inputs(item=0):
    # FLUX.2 [klein] edits the image at its own size, and reads the prompt at a layer the tiny Qwen3 has (of 2).
    return {**prompt_inputs(item), "max_sequence_length": 64, "text_encoder_out_layers": (1,)}


def wan_inputs(item=0):
    """5 frames of 64 px: a latent frame of frame 0 alone and one of a group of 4, each of 16 x 16 latents (VAE
    factor 4), the contract's latent grid."""
    video = [test_image(2 * SIZE, seed=10 * item + frame) for frame in range(5)]
    return dict(prompt=PROMPTS[item], video=video, height=2 * SIZE, width=2 * SIZE, max_sequence_length=16)


FLUX_LOADED = ("diffusers' FluxTransformer2DModel loaded from a folder computes a last bit apart from the one built "
               "in memory with the same weights, in stock too")

FAMILIES = {
    "sd": Family(
        StableDiffusionDiffImg2ImgPipeline, StableDiffusionImg2ImgPipeline, sd_components, prompt_inputs,
        schedulers=(EulerDiscreteScheduler, DPMSolverMultistepScheduler), features=SD_FEATURES,
        passed_through=dict(negative_prompt="blurry", guidance_scale=2.5, eta=0.5, cross_attention_kwargs={}),
    ),
    "sdxl": Family(
        StableDiffusionXLDiffImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline, sdxl_components, prompt_inputs,
        schedulers=(DPMSolverMultistepScheduler,), features=SD_FEATURES,
        extra_arguments={"original_image": None, "noise": None},
        passed_through=dict(prompt_2="a pear", negative_prompt="blurry", guidance_scale=2.5, aesthetic_score=5.0),
        refusals=(
            (dict(image=LATENTS, denoising_start=0.8), "`original_image`"),
            (dict(original_image=test_image(SIZE)), "`original_image` is for"),
            (dict(image=LATENTS[..., :8], original_image=test_image(SIZE), denoising_start=0.8),
             "size the base edited"),
            (dict(denoising_start=0.8, denoising_end=0.5), "`denoising_start`"),
            (dict(latents=LATENTS[..., :8]), r"`latents` must be a tensor shaped like the latents, \(1, 4, 16, 16\)"),
            (dict(noise=LATENTS.repeat(2, 1, 1, 1)), "`noise` must be a tensor shaped like the latents"),
            (dict(keep_exact=True, denoising_end=0.8), "the call that finishes it"),
        ),
    ),
    "sd_controlnet": Family(
        StableDiffusionControlNetDiffImg2ImgPipeline, StableDiffusionControlNetImg2ImgPipeline,
        sd_controlnet_components, control_inputs, schedulers=(EulerDiscreteScheduler, DPMSolverMultistepScheduler),
        passed_through=dict(controlnet_conditioning_scale=0.5, guess_mode=True, control_guidance_end=0.5),
        **CONTROLNET,
    ),
    "sdxl_controlnet": Family(
        StableDiffusionXLControlNetDiffImg2ImgPipeline, StableDiffusionXLControlNetImg2ImgPipeline,
        sdxl_controlnet_components, control_inputs, schedulers=(DDIMScheduler, DPMSolverMultistepScheduler),
        passed_through=dict(controlnet_conditioning_scale=0.5, guess_mode=True, aesthetic_score=5.0), **CONTROLNET,
    ),
    "sd_inpaint": Family(
        StableDiffusionDiffInpaintPipeline, StableDiffusionInpaintPipeline, sd_inpaint_components, sized_inputs,
        schedulers=(EulerDiscreteScheduler, DPMSolverMultistepScheduler), refusals=INPAINT_REFUSALS, **INPAINT,
        passed_through=dict(negative_prompt="blurry", guidance_scale=2.5, eta=0.5),
        withheld=frozenset({"masked_image_latents", "padding_mask_crop", "latents"}),
    ),
    "sdxl_inpaint": Family(
        StableDiffusionXLDiffInpaintPipeline, StableDiffusionXLInpaintPipeline, sdxl_inpaint_components,
        sized_inputs, schedulers=(DDIMScheduler, DPMSolverMultistepScheduler), **INPAINT,
        passed_through=dict(prompt_2="a pear", negative_prompt="blurry", guidance_scale=2.5, aesthetic_score=5.0),
        refusals=INPAINT_REFUSALS + ((dict(denoising_end=0.5), "`denoising_start` and `denoising_end`"),),
        withheld=frozenset({"masked_image_latents", "padding_mask_crop", "latents", "denoising_start",
                            "denoising_end"}),
    ),
    "kandinsky": Family(
        # DDPM first: it draws from the generators at every step, so batches show whose generator each item takes.
        KandinskyV22DiffImg2ImgPipeline, KandinskyV22Img2ImgPipeline,
        lambda: kandinsky_decoder_components(scheduler="ddpm"), kandinsky_inputs, x0_and_noise=movq_x0_and_noise,
        decode=movq_decode, schedulers=(DDIMScheduler,), repeats="each",
        passed_through=dict(guidance_scale=2.5),
        refusals=(
            (dict(image_embeds=None), "KandinskyV22PriorPipeline"),
            (dict(image=np.zeros((SIZE, SIZE, 3), np.uint8)), "PIL image, a torch tensor"),
            (dict(prompt="a red apple"), "KandinskyV22PriorPipeline", TypeError),
            (dict(height=50), "multiples of 4"),
            (dict(num_images_per_prompt=2, guidance_scale=1.0), "guidance_scale"),
        ),
    ),
    "if_stage1": Family(
        IFDiffImg2ImgPipeline, IFImg2ImgPipeline, lambda: if_stage1_components(sample_size=SIZE // 2), if_stage1_inputs,
        passed_through=dict(negative_prompt="blurry", guidance_scale=2.5, eta=0.5), **IF,
        refusals=((dict(strength=-0.1), "strength"), (dict(callback_steps=0), "callback_steps")),
    ),
    "if_stage2": Family(
        IFDiffImg2ImgSuperResolutionPipeline, IFImg2ImgSuperResolutionPipeline,
        lambda: if_stage2_components(sample_size=SIZE), if_stage2_inputs, edited="original_image", **IF,
        calls={"guidance": ({}, 1), "no guidance": ({"guidance_scale": 1.0}, 1)},
        passed_through=dict(negative_prompt="blurry", guidance_scale=2.5, noise_level=100),
        refusals=((dict(original_image=None), "original_image"), (dict(image=None), "stage I result"),
                  (dict(prompt=None), "prompt")),
    ),
    "sd3": Family(
        StableDiffusion3DiffImg2ImgPipeline, StableDiffusion3Img2ImgPipeline, sd3_components, sized_inputs,
        rule=FLOW, x0_and_noise=flow_x0_and_noise, decode=flow_decode,
        schedulers=(FlowMatchHeunDiscreteScheduler,),  # a second-order scheduler: two loop iterations per step
        image_as_latents=lambda x0: x0,  # stock SD3 encodes image i with generator i, so one image takes one
        passed_through=dict(prompt_2="a pear", negative_prompt="blurry", guidance_scale=2.5, max_sequence_length=32,
                            joint_attention_kwargs={}, clip_skip=1, mu=None),
        refusals=(
            (dict(latents=LATENTS), LATENTS_NOT_TAKEN),
            (dict(num_images_per_prompt=2, generator=[seeded_generator(0), seeded_generator(1)]),
             "2 generators for 1 image"),
        ),
        skip={"a generator per image": "stock SD3 img2img encodes image i with generator i: a batch of images takes "
                                       "one generator per image, not one per output"},
    ),
    "flux": Family(
        FluxDiffImg2ImgPipeline, FluxImg2ImgPipeline, flux_components, packed_flow_inputs,
        x0_and_noise=flow_x0_and_noise, decode=unpacked_flow_decode, image_as_latents=lambda x0: x0, **PACKED,
        passed_through=dict(prompt_2="a pear", negative_prompt="blurry", true_cfg_scale=1.5, guidance_scale=3.5,
                            joint_attention_kwargs={}),
        skip={"in memory as loaded": FLUX_LOADED},
    ),
    "flux_kontext": Family(
        FluxKontextDiffInpaintPipeline, FluxKontextInpaintPipeline, flux_components, kontext_inputs,
        x0_and_noise=kontext_x0_and_noise, **EDIT,
        calls={"default": ({}, 1), "true cfg": ({"negative_prompt": "blurry", "true_cfg_scale": 1.5}, 2)},
        passed_through=dict(prompt_2="a pear", negative_prompt="blurry", true_cfg_scale=1.5, guidance_scale=2.5,
                            joint_attention_kwargs={}, image_reference=test_image(SIZE, seed=9)),
        skip={"in memory as loaded": FLUX_LOADED},
    ),
    "chroma": Family(
        ChromaDiffImg2ImgPipeline, ChromaImg2ImgPipeline, chroma_components, packed_flow_inputs,
        x0_and_noise=flow_x0_and_noise, decode=unpacked_flow_decode, image_as_latents=lambda x0: x0, **PACKED,
        calls={"guidance": ({}, 2), "no guidance": ({"guidance_scale": 1.0}, 1)},  # CFG as two calls a step
        passed_through=dict(negative_prompt="blurry", guidance_scale=3.5, joint_attention_kwargs={}),
    ),
    "qwenimage": Family(
        QwenImageDiffImg2ImgPipeline, QwenImageImg2ImgPipeline, qwenimage_components, packed_flow_inputs,
        x0_and_noise=qwen_latents_x0_and_noise, decode=qwen_decode, image_as_latents=lambda x0: x0[:, :, 0], **PACKED,
        # True CFG runs only with a negative prompt, as two calls a step.
        calls={"no guidance": ({}, 1), "guidance": ({"negative_prompt": "blurry"}, 2)}, no_guidance={},
        passed_through=dict(negative_prompt="blurry", true_cfg_scale=1.5, attention_kwargs={}),
    ),
    "zimage": Family(
        ZImageDiffImg2ImgPipeline, ZImageImg2ImgPipeline, zimage_components,
        lambda item=0: {**prompt_inputs(item), "max_sequence_length": 32},  # no resizing: the output is SIZE px
        rule=FLOW, x0_and_noise=flow_x0_and_noise, decode=flow_decode, schedule=zimage_schedule,
        schedulers=FLOW_SCHEDULERS,
        calls={"guidance": ({}, 1), "no guidance": ({"guidance_scale": 0.0}, 1)},  # CFG batched into one call
        no_guidance={"guidance_scale": 0.0},
        image_as_latents=lambda x0: x0,  # as the packing families
        passed_through=dict(negative_prompt="blurry", guidance_scale=3.5, cfg_normalization=True, cfg_truncation=0.9,
                            joint_attention_kwargs={}),
        refusals=((dict(latents=LATENTS), LATENTS_NOT_TAKEN), (dict(height=16, width=16), "does not resize"),
                  (dict(image=torch.zeros(1, 4, 16, 16), height=64, width=64), "the image is 32x32")),
    ),
    # FLUX.1 Fill: the flow counterpart of the inpainting checkpoints (design, section 8), whose transformer reads the
    # masked image and the mask beside the latents; tests/test_fill.py checks what it reads at every step.
    "flux_fill": Family(
        FluxDiffFillPipeline, FluxFillPipeline, flux_fill_components, packed_flow_inputs,
        x0_and_noise=flow_x0_and_noise, **FILL,
        passed_through=dict(prompt_2="a pear", guidance_scale=2.5, joint_attention_kwargs={}),
        skip={
            "in memory as loaded": FLUX_LOADED,
            "binary map is stock": "stock Fill never puts the pixels outside its mask back on the noised original "
                                   "(the model reads them as known and lets them evolve), where ours holds them there, "
                                   "so the latents differ; tests/test_fill.py shows that the transformer reads stock's "
                                   "mask and masked image at every step, and that no map is stock",
            "copies alone": "stock Fill encodes one image once, with the first of a list of generators, and takes no "
                            "latents as `image` (its masked image is made from the pixels), so a copy is not its own "
                            "run; tests/test_fill.py checks the masks each copy's transformer reads",
        },
    ),
    "qwenimage_edit": Family(
        # Stock sizes its work from the image alone (about 1024 x 1024 px; TEST_AREA here): no height or width.
        QwenImageEditDiffInpaintPipeline, QwenImageEditInpaintPipeline, qwenimage_edit_components, prompt_inputs,
        x0_and_noise=qwen_latents_x0_and_noise, context=small_working_area,
        **{**EDIT, "decode": qwen_decode, "withheld": EDIT["withheld"] | {"masked_image_latents"}, "refusals": (
            *EDIT["refusals"],
            (dict(masked_image_latents=torch.zeros(1, 4, SIZE, SIZE)), "`masked_image_latents` goes with"),
            (dict(image=np.zeros((SIZE, SIZE, 3), np.uint8)), "pass `image` as a PIL image"),
            (dict(padding_mask_crop=4, keep_exact=True), 'pass output_type="pil" and no `keep_exact`'),
        )},
        # True CFG runs only with a negative prompt, as two calls a step.
        calls={"no guidance": ({}, 1), "guidance": ({"negative_prompt": "blurry"}, 2)}, no_guidance={},
        passed_through=dict(negative_prompt="blurry", true_cfg_scale=1.5, attention_kwargs={},
                            max_sequence_length=64),
        skip={"copies alone": "stock Qwen-Image-Edit encodes an image once, with the first of a list of generators, "
                              "and takes no latents as `image`: a copy is not its own run"},
    ),
    "flux2_klein": Family(
        Flux2KleinDiffInpaintPipeline, Flux2KleinInpaintPipeline, flux2_klein_components, klein_inputs,
        x0_and_noise=klein_x0_and_noise,
        **dict(EDIT, schedule=klein_schedule, on_grid=klein_on_grid, decode=klein_decode,
               refusals=EDIT["refusals"] + ((dict(image=torch.zeros(1, 16, 16, 16)), "as pixels"),)),
        calls={"guidance": ({}, 2), "no guidance": ({"guidance_scale": 1.0}, 1)},  # not distilled: true CFG
        passed_through=dict(guidance_scale=2.5, attention_kwargs={}, image_reference=test_image(SIZE, seed=9),
                            sigmas=[1.0, 0.75]),
    ),
    # Video (design, section 9): the contract's maps are still maps, one for every frame; tests/test_wan.py has the
    # maps per frame. Stock Wan 2.1 keeps the last int(T * s) steps (the floor rule) on a flow-matching scheduler.
    "wan": Family(
        WanDiffVideoToVideoPipeline, WanVideoToVideoPipeline, lambda: wan_components(spatial_factor=4), wan_inputs,
        x0_and_noise=wan_x0_and_noise, decode=wan_decode, unit_pixels=wan_unit_pixels, edited="video",
        output="frames", copies_argument=None, maps=lambda maps: [[still] for still in maps],
        # Stock noises with UniPC's add_noise, and with flow-matching Euler's scale_noise, which has no add_noise.
        schedulers=(FlowMatchEulerDiscreteScheduler,),
        calls={"guidance": ({}, 2), "no guidance": ({"guidance_scale": 1.0}, 1)},  # CFG as two calls a step
        passed_through=dict(negative_prompt="blurry", guidance_scale=2.5, attention_kwargs={}, max_sequence_length=8),
        refusals=((dict(latents=torch.zeros(1, 16, 2, 16, 16)), LATENTS_NOT_TAKEN),
                  (dict(map=np.zeros((3, MAP_SIZE, MAP_SIZE), np.float32)), "3 frames but the video has 5"),
                  (dict(height=40), "divisible by 16")),
        skip={
            "copies alone": "stock Wan makes one video per prompt, whatever `num_videos_per_prompt` asks",
            "in memory as loaded": "diffusers' WanTransformer3DModel loaded from a folder computes a last bit apart "
                                   "from the one built in memory with the same weights (2.7e-6 here), in stock too",
            # A band of strength 0.3 at T = 6 runs only the last step.
            "last steps of FlowMatchEulerDiscreteScheduler": "set with stock's set_timesteps(T), it ends its schedule "
                                                             "on sigma 1/1000 -> 0: the last step moves a latent by "
                                                             "1/1000 of the model's velocity, within 1e-2 of x0 in "
                                                             "stock too",
            "any size": "stock Wan refuses a size that 16 does not divide, so no size is rounded to the latent grid",
        },
    ),
}


def family_context(node):
    """The registry's `context` of the family that test `node` runs on (none for a test without a family)."""
    family = node.callspec.params.get("family") if hasattr(node, "callspec") else None
    return FAMILIES[family].context() if family in FAMILIES else contextlib.nullcontext()


def batched(items: list) -> dict:
    """The inputs of several items as one call: tensors stacked, prompts, images and videos (lists of frames)
    listed, the rest shared."""
    merged = {}
    for name in items[0]:
        values = [item[name] for item in items]
        if isinstance(values[0], torch.Tensor):
            merged[name] = torch.cat(values)
        elif isinstance(values[0], (str, PIL.Image.Image, list)):
            merged[name] = values
        else:
            merged[name] = values[0]
    return merged
