# Copyright 2026 The differential-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Differential img2img for Stable Diffusion XL, base and refiner: a grayscale map gives every pixel its own strength.

Levin & Fried, "Differential Diffusion: Giving Each Pixel Its Strength", arXiv 2306.00950.

This file stands alone (torch, diffusers, PIL, numpy): copy it into your own code, or load it as a diffusers
community pipeline::

    base = DiffusionPipeline.from_pretrained(
        "stabilityai/stable-diffusion-xl-base-1.0", custom_pipeline="SDXL/diff_pipe.py", trust_remote_code=True
    )

Base and refiner, as SDXL's "ensemble of experts" runs them: both stages share one schedule of T steps, and every
pixel keeps its release step on it, so a pixel is frozen in both stages until its step comes::

    seed = 0
    latents = base(prompt, image=image, map=map, num_inference_steps=100, denoising_end=0.8,
                   output_type="latent", generator=torch.Generator().manual_seed(seed)).images
    edited = refiner(prompt, image=latents, original_image=image, map=map, num_inference_steps=100,
                     denoising_start=0.8, generator=torch.Generator().manual_seed(seed)).images[0]
"""

import numbers
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLImg2ImgPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import retrieve_timesteps
from diffusers.utils import logging

logger = logging.get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Copied from SD2/diff_pipe.py: release rule (begin)
# Stock img2img's rule for SD, SDXL, Kandinsky and DeepFloyd IF: int(T * strength) steps, noised by add_noise.


def release_steps(strengths: torch.Tensor, num_inference_steps: int) -> torch.Tensor:
    """Each pixel's first step, r = T - int(T * s): stock's own expression for its first step at `strength=s`, in
    float64 as stock computes it, so a uniform map runs stock's steps. r == T (s below 1/T): never released."""
    return num_inference_steps - (num_inference_steps * strengths.double()).floor().long()


def noised_original(scheduler, x0: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
    """What a frozen pixel holds before loop iteration `index`: the original noised to that step's timestep."""
    return scheduler.add_noise(x0, noise, scheduler.timesteps[index : index + 1].repeat(x0.shape[0]))


@contextmanager
def recording_noise(scheduler, frozen):
    """Hands `frozen` the x0 and noise that stock `prepare_latents` passes to `scheduler.add_noise`."""
    def add_noise(original_samples, noise, timesteps):
        frozen.record(original_samples, noise)
        return stock_add_noise(original_samples, noise, timesteps)

    stock_add_noise, scheduler.add_noise = scheduler.add_noise, add_noise
    try:
        yield
    finally:
        del scheduler.add_noise


# Copied from SD2/diff_pipe.py: release rule (end)
# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# Copied from SD2/diff_pipe.py: differential core (begin)
# In the paper's terms: map -> strength s per pixel -> release step r (the rule above) -> before step k, pixels with
# k <= r take noised_original(x0, noise, k); after the last step, pixels never released take x0 itself.


class FrozenPixels:
    """Runs the rule above as a step-end callback in stock's loop, which starts on the first released step, on the
    `x0` and `noise` that stock draws. `pack` lays a tensor out as stock's loop holds its latents. The user's own
    `callback` (function or callback object) runs after the blend and sees it, with its `tensor_inputs`."""

    def __init__(self, release_step, num_inference_steps: int, callback=None, tensor_inputs=(), pack=None):
        self.release_step, self.num_inference_steps, self.pack = release_step, num_inference_steps, pack
        self.first_step, self.last_frozen_step = int(release_step.min()), int(release_step.max())
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs  # stock reads a callback object's own list, whatever is passed
        self.callback, self.tensor_inputs = callback, list(tensor_inputs or [])
        self.x0 = self.noise = None  # stock's own, handed over by `recording_noise`

    @property
    def step_end_tensor_inputs(self) -> list:
        return sorted(set(self.tensor_inputs) | {"latents"})  # what stock must hand this callback

    def record(self, x0: torch.Tensor, noise: torch.Tensor):
        """Keeps stock's `x0` and `noise`, and lays the release steps out as they are laid out."""
        (height, width), (encoded_height, encoded_width) = self.release_step.shape[-2:], x0.shape[-2:]
        if (height, width) != (encoded_height, encoded_width):
            raise ValueError(f"The image was encoded to a {encoded_width}x{encoded_height} grid, but the map was sized "
                             f"to {width}x{height} from the VAE's scale factor: give the image a width and height "
                             "that the VAE's scale factor divides.")
        release_step = tile_to_batch(self.release_step, x0.shape[0]).to(x0.device)
        release_step = release_step.view(release_step.shape[0], 1, *[1] * (x0.ndim - 4), height, width)
        if self.pack is not None:  # packing mixes channels into tokens: pack one release step per latent value
            release_step, x0, noise = (self.pack(t) for t in (release_step.expand_as(x0).contiguous(), x0, noise))
        self.release_step, self.x0, self.noise = release_step, x0, noise

    def blend(self, scheduler, i: int, latents: torch.Tensor) -> torch.Tensor:
        """The latents to run loop iteration `i + 1` on, where iteration 0 is the first released step."""
        order, next_iteration = scheduler.order, self.first_step * scheduler.order + i + 1
        if next_iteration == len(scheduler.timesteps):
            return where(self.release_step == self.num_inference_steps, self.x0, latents)
        if next_iteration > self.last_frozen_step * order:
            return latents
        frozen = noised_original(scheduler, self.x0, self.noise, next_iteration)
        return where(self.release_step * order >= next_iteration, frozen, latents)

    def __call__(self, pipe, i, t, callback_kwargs):
        latents = self.blend(pipe.scheduler, i, callback_kwargs["latents"])
        if self.callback is None:
            return {"latents": latents}
        user_kwargs = {name: latents if name == "latents" else callback_kwargs[name] for name in self.tensor_inputs}
        return {"latents": latents, **(self.callback(pipe, i, t, user_kwargs) or {})}


def where(condition: torch.Tensor, frozen: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """`torch.where` into the latents' own dtype and memory layout, which a broadcast condition could change (and
    the VAE decodes a channels-last tensor differently in the last bits)."""
    return torch.where(condition, frozen.to(latents.dtype), latents, out=torch.empty_like(latents))


def composite_original(images: torch.Tensor, original: torch.Tensor, strengths, num_inference_steps: int):
    """`w * images + (1 - w) * original`, `w = clamp(T * s, 0, 1)`, batch-tiled like stock: strength 0 keeps the
    input's bytes, and strengths below 1/T, which no step runs on, fade in linearly."""
    weight, original = (tile_to_batch(tensor, images.shape[0]).to(images.device, images.dtype)
                        for tensor in ((num_inference_steps * strengths).clamp(0, 1), original))
    return torch.where(weight == 0, original, weight * images + (1 - weight) * original)


def tile_to_batch(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Repeats a per-image tensor to the whole batch as stock repeats its images: (a, b, a, b), not (a, a, b, b)."""
    if tensor.shape[0] in (1, batch_size):
        return tensor
    return tensor.repeat(batch_size // tensor.shape[0], *(1,) * (tensor.ndim - 1))


# Copied from SD2/diff_pipe.py: differential core (end)
# ----------------------------------------------------------------------------------------------------------------


class StableDiffusionXLDiffImg2ImgPipeline(StableDiffusionXLImg2ImgPipeline):
    r"""
    Stable Diffusion XL img2img where a map gives every pixel its own strength (Differential Diffusion).

    It takes exactly the components of [`StableDiffusionXLImg2ImgPipeline`], so it loads base and refiner checkpoints
    alike, and `from_pretrained`, `from_pipe`, LoRA, IP-Adapter, model offloading and any compatible scheduler work
    as they do there. A uniform map of strength `s` gives exactly what stock img2img gives at `strength=s`, with or
    without the base/refiner split.

    Base and refiner ("ensemble of experts"): run the base with `denoising_end=d` and `output_type="latent"`, then the
    refiner with `image=<the base's latents>`, `original_image=<the image>` and `denoising_start=d`, giving both the
    same `map`, `strength`, `num_inference_steps` and seed. Every pixel keeps its release step on the one schedule of
    `num_inference_steps` steps: a pixel released at step r stays on the noised original in both stages until r, and
    pixels never released become x0 only at the very end, in the refiner.
    """

    _stage = None  # what prepare_latents needs while __call__ runs

    # What tools/crop.py needs to edit a call on the crop of its changes (docs/crop.md).
    copies_adjacent = False  # stock repeats the whole batch for num_images_per_prompt: a, b, a, b

    # Copied from SD2/diff_pipe.py:StableDiffusionDiffImg2ImgPipeline.crop_unit
    @property
    def crop_unit(self) -> int:
        """Crops are whole latent cells: the pixels per cell of the VAE attached now."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # Copied from SD2/diff_pipe.py:StableDiffusionDiffImg2ImgPipeline.native_size
    @property
    def native_size(self) -> int:
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    # Copied from SD2/diff_pipe.py:StableDiffusionDiffImg2ImgPipeline.working_grid
    def working_grid(self, image, map, invert_map=False, **call):
        """The image in [0, 1] on the pixel grid it is edited on, the map there (1 = change), and pixels per cell."""
        pixels, cell = self.image_processor.preprocess(image), 2 ** (len(self.vae.config.block_out_channels) - 1)
        change = map_to_tensor(map, complement=not invert_map)
        latent_grid = tuple(side // cell for side in pixels.shape[-2:])
        return {"image": pixels / 2 + 0.5}, map_on_grid(change, tuple(pixels.shape[-2:]), latent_grid), cell

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        prompt_2=None,
        image=None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt=None,
        negative_prompt_2=None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator=None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        *,
        map=None,
        invert_map: bool = False,
        keep_exact: bool = False,
        original_image=None,
        noise: torch.Tensor | None = None,
        **kwargs,
    ):
        r"""
        Takes every argument of [`StableDiffusionXLImg2ImgPipeline.__call__`], in its order and with its defaults
        (except `strength`), then `map`, `invert_map`, `keep_exact`, `original_image` and `noise`, which must be passed
        by name.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt(s) to guide the edit. Pass `prompt_embeds` and `pooled_prompt_embeds` instead to skip the
                text encoders.
            prompt_2 (`str` or `list[str]`, *optional*):
                The prompt(s) for the second text encoder, as in stock.
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The image(s) to edit, in any form stock img2img takes (PIL images, arrays or tensors in [0, 1], or
                4-channel latents). With `denoising_start` (the refiner): the latents to continue from, that is the
                base's output with `output_type="latent"`.
            strength (`float` in [0, 1], *optional*, defaults to 1.0):
                Scales every pixel's strength: `s = strength * (1 - map)`. With a uniform map this is stock
                img2img's `strength` (whose default is 0.3). Unlike stock, the refiner uses it too: give both stages
                the same value.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The length T of the full schedule, shared by base and refiner. A pixel of strength s is released at
                step `T - floor(T * s)`; only the steps from the first released pixel on are run: `floor(T * max(s))`
                UNet steps, base and refiner together.
            timesteps (`list[int]`, *optional*):
                A custom schedule, as in stock; T is then its length.
            sigmas (`list[float]`, *optional*):
                A custom schedule of sigmas, as in stock; T is then its length.
            denoising_start (`float` in (0, 1), *optional*):
                Start this call at this fraction of the schedule, continuing from the latents in `image`, as stock
                does (the refiner). Pixels released later than the start are frozen there on the noised original.
                If no pixel is released by the start, the call starts afresh at the first release, from the
                original, and `image` goes unused.
            denoising_end (`float` in (0, 1), *optional*):
                End this call at this fraction of the schedule, as stock does (the base, with
                `output_type="latent"`). The latents returned are those before the next step: pixels still frozen
                hold the noised original there, and kept pixels are not yet x0.
            guidance_scale (`float`, *optional*, defaults to 5.0):
                Classifier-free guidance scale, as in stock; 1 or less turns guidance off.
            negative_prompt (`str` or `list[str]`, *optional*):
                As in stock.
            negative_prompt_2 (`str` or `list[str]`, *optional*):
                As in stock.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                Images to make per prompt; maps follow their images.
            eta (`float`, *optional*, defaults to 0.0):
                DDIM's eta, as in stock.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Used in the same order as stock img2img: the VAE sample of x0, then the noise. The refiner draws both
                again, so give it a generator seeded as the base's was (a new `torch.Generator().manual_seed(seed)`,
                not the base's generator after it ran): its x0 and noise are then exactly the base's, and frozen
                pixels pass the handoff unchanged.
            latents (`torch.Tensor` of shape (batch * num_images_per_prompt, 4, height / 8, width / 8), *optional*):
                The latents the first step that runs starts from, as stock's `latents` (for the base, stock starts
                from `add_noise(x0, noise, t)`; for the refiner, from `image`). Only the pixels released at that step
                take them: the others are frozen on `add_noise(x0, noise, t)`, with `noise` as below, and x0 and
                `noise` are drawn just as without `latents`. With a uniform map, the result is stock's with the
                same `latents`.
            prompt_embeds (`torch.Tensor`, *optional*):
                As in stock.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                As in stock.
            pooled_prompt_embeds (`torch.Tensor`, *optional*):
                As in stock.
            negative_pooled_prompt_embeds (`torch.Tensor`, *optional*):
                As in stock.
            ip_adapter_image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                The IP-Adapter image(s), as in stock (after `load_ip_adapter`).
            ip_adapter_image_embeds (`list[torch.Tensor]`, *optional*):
                Precomputed IP-Adapter image embeddings, as in stock.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a [`StableDiffusionXLPipelineOutput`] rather than a tuple.
            cross_attention_kwargs (`dict`, *optional*):
                Passed to the attention processors, as in stock (for example `{"scale": 0.5}` for a LoRA).
            guidance_rescale (`float`, *optional*, defaults to 0.0):
                As in stock.
            original_size (`tuple[int, int]`, *optional*):
                SDXL's size conditioning, as in stock.
            crops_coords_top_left (`tuple[int, int]`, *optional*, defaults to (0, 0)):
                As in stock.
            target_size (`tuple[int, int]`, *optional*):
                As in stock.
            negative_original_size (`tuple[int, int]`, *optional*):
                As in stock.
            negative_crops_coords_top_left (`tuple[int, int]`, *optional*, defaults to (0, 0)):
                As in stock.
            negative_target_size (`tuple[int, int]`, *optional*):
                As in stock.
            aesthetic_score (`float`, *optional*, defaults to 6.0):
                The refiner's aesthetic conditioning, as in stock.
            negative_aesthetic_score (`float`, *optional*, defaults to 2.5):
                As in stock.
            clip_skip (`int`, *optional*):
                Layers of CLIP to skip, as in stock.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called at the end of every step that runs, after the frozen pixels have been reset, so it sees the
                latents that the next step will run on. It may set `pipe._interrupt` or change `pipe._guidance_scale`
                as in stock.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["latents"]`):
                The tensors passed to `callback_on_step_end`, as in stock.
            map (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, values in [0, 1], white = keep):
                How much each pixel may change. 1 (white) keeps the pixel, 0 (black) changes it fully: a pixel's
                strength is `1 - map`. Grayscale PIL images of mode L or I;16 work as they are; float arrays must lie
                in [0, 1]. One map for all images, or one per image; any size with the image's aspect ratio
                (it is area-averaged down to the latent grid). Give the refiner the base's map. Required.
            invert_map (`bool`, *optional*, defaults to `False`):
                Read `map` the other way round, white = change, as inpainting masks and some UIs do.
            keep_exact (`bool`, *optional*, defaults to `False`):
                Composite the input back after decoding: `clamp(T * s, 0, 1) * output + (1 - that) * input`. Pixels
                of strength 0 are then the input's own values instead of their lossy VAE round trip, and pixels of
                strength below 1/T fade in linearly. Off by default, as in the paper. It applies to the call that
                ends the schedule (the refiner, which composites `original_image`), not to one with `denoising_end`.
            original_image (same types as `image`, *optional*, defaults to `image`):
                The image being edited, whose encoding x0 the frozen pixels keep. Only needed with `denoising_start`,
                where `image` holds latents; 4-channel latents are taken as x0 itself.
            noise (`torch.Tensor`, same shape as `latents`, *optional*):
                The noise of the noised original `add_noise(x0, noise, t)`. Defaults to the noise stock img2img draws
                from `generator`. Pass the same tensor to base and refiner to tie them without a seed (give x0 as
                4-channel `image` / `original_image` to fix it too).
            **kwargs:
                Passed to stock (its deprecated `callback` and `callback_steps`); the crop's old keywords
                (`crop_to_change`, ...) are refused with a pointer to `tools.crop.edit_on_crop`.

        Returns:
            [`StableDiffusionXLPipelineOutput`] or `tuple`, as stock. `pipe.num_timesteps` is the number of denoising
            steps this call actually ran.
        """
        # 1. Check inputs
        check_moved_arguments(kwargs)
        num_inference_steps = self._check_differential_inputs(
            image, map, original_image, keep_exact, num_inference_steps, denoising_start, denoising_end, output_type
        )
        self.check_inputs(
            prompt, prompt_2, strength, num_inference_steps, None, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, ip_adapter_image, ip_adapter_image_embeds,
        )
        for schedule in (timesteps, sigmas):
            if schedule is not None:
                num_inference_steps = len(schedule)
        continuing = is_fraction(denoising_start)  # from the latents in `image`, which the base handed over
        if original_image is None:
            original_image = image
        original = self.image_processor.preprocess(original_image)

        # 2. Grid: the original's, which the latents handed over must cover
        latent_grid = self._latent_grid(original)
        if continuing:
            self._check_continued_latents(image, latent_grid)

        # 3. Strength map and release steps, on the one schedule that base and refiner share
        change = map_to_tensor(map, complement=not invert_map)  # parsed once, sized to each grid that needs it
        strengths = strength * map_on_grid(change, latent_grid)
        check_map_count(strengths, original)
        stage_start, stage_end = self._stage_bounds(num_inference_steps, timesteps, sigmas, denoising_start,
                                                    denoising_end)
        frozen = FrozenPixels(
            release_steps(strengths, num_inference_steps), num_inference_steps, callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        # After a handoff, `image` holds the base's work only if some pixel was released before it; if none was,
        # this call starts afresh at the first release, on the original, as the base would have.
        continuing = continuing and frozen.first_step <= stage_start
        # Pixels released before the handoff were the base's to run: here the loop starts at the handoff.
        frozen.first_step = max(frozen.first_step, stage_start)
        if continuing and generator is None and noise is None:
            logger.warning(
                "Without `generator`, this call draws x0 and the noise anew, not as the base drew them: pixels still "
                "frozen at the handoff get new noise there. Pass a generator seeded as the base's was."
            )

        # 4. Stock's call: at the strongest pixel's strength, which starts on the first released step, or at the
        # handoff, from `image` as it is (stock then ignores `strength`)
        decoded_type = "pt" if keep_exact else output_type
        self._stage = SimpleNamespace(frozen=frozen, original=original, latents=latents, noise=noise)
        try:
            if frozen.first_step >= stage_end:
                output = self._without_steps(
                    prompt, prompt_embeds, image, continuing, stage_end, num_images_per_prompt, generator,
                    decoded_type,
                )
            else:
                output = super().__call__(
                    prompt=prompt,
                    prompt_2=prompt_2,
                    image=image if continuing else original_image,
                    strength=strengths.max().item(),
                    num_inference_steps=num_inference_steps,
                    timesteps=timesteps,
                    sigmas=sigmas,
                    denoising_start=denoising_start if continuing else None,
                    denoising_end=denoising_end,
                    guidance_scale=guidance_scale,
                    negative_prompt=negative_prompt,
                    negative_prompt_2=negative_prompt_2,
                    num_images_per_prompt=num_images_per_prompt,
                    eta=eta,
                    generator=generator,
                    latents=None,  # stock would skip prepare_latents, where `latents` join the frozen pixels
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds,
                    pooled_prompt_embeds=pooled_prompt_embeds,
                    negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                    ip_adapter_image=ip_adapter_image,
                    ip_adapter_image_embeds=ip_adapter_image_embeds,
                    output_type=decoded_type,
                    return_dict=True,  # the tuple, if asked for, is made below
                    cross_attention_kwargs=cross_attention_kwargs,
                    guidance_rescale=guidance_rescale,
                    original_size=original_size,
                    crops_coords_top_left=crops_coords_top_left,
                    target_size=target_size,
                    negative_original_size=negative_original_size,
                    negative_crops_coords_top_left=negative_crops_coords_top_left,
                    negative_target_size=negative_target_size,
                    aesthetic_score=aesthetic_score,
                    negative_aesthetic_score=negative_aesthetic_score,
                    clip_skip=clip_skip,
                    callback_on_step_end=frozen,
                    callback_on_step_end_tensor_inputs=frozen.step_end_tensor_inputs,
                    **kwargs,
                )
        finally:
            self._stage = None

        # 5. Keep exact
        if keep_exact:
            strengths = strength * map_on_grid(change, tuple(original.shape[-2:]), aspect_of=latent_grid)
            images = composite_original(output.images, original / 2 + 0.5, strengths, num_inference_steps)
            images = self.image_processor.postprocess(images, output_type, do_denormalize=[False] * len(images))
            output = StableDiffusionXLPipelineOutput(images=images)
        return output if return_dict else (output.images,)



    def prepare_latents(self, image, timestep, batch_size, num_images_per_prompt, dtype, device, generator=None,
                        add_noise=True):
        # Stock draws x0 and noise here and keeps only add_noise(x0, noise, t); every frozen pixel needs both again.
        # After a handoff stock passes add_noise=False and just takes `image`, the base's latents: x0 and noise are
        # then drawn from the original, in the same order, so that a generator seeded as the base's gives the same.
        if self._stage is None:  # called by other code, outside __call__
            return super().prepare_latents(
                image, timestep, batch_size, num_images_per_prompt, dtype, device, generator, add_noise
            )
        noised_original = self._noised_original(timestep, batch_size, num_images_per_prompt, dtype, device, generator)
        start = self._start_latents(
            image, not add_noise, timestep, batch_size, num_images_per_prompt, dtype, device, generator
        )
        if start is None:
            return noised_original
        # Pixels released at the first step that runs start from `start`, in its memory layout (as stock's loop
        # would); the others stay on the noised original.
        frozen = self._stage.frozen
        return where(frozen.release_step > frozen.first_step, noised_original, start)

    def _noised_original(self, timestep, batch_size, num_images_per_prompt, dtype, device, generator):
        """Encodes the original as stock does, records x0 and noise, and returns add_noise(x0, noise, timestep)."""
        stage = self._stage
        with recording_noise(self.scheduler, stage.frozen):
            noised = super().prepare_latents(
                stage.original, timestep, batch_size, num_images_per_prompt, dtype, device, generator
            )
        if stage.noise is not None:
            stage.frozen.noise = self._like_latents(stage.noise, "noise", stage.frozen.x0)
            noised = self.scheduler.add_noise(stage.frozen.x0, stage.frozen.noise, timestep)
        return noised

    def _start_latents(self, image, continuing, timestep, batch_size, num_images_per_prompt, dtype, device,
                       generator):
        """The user's `latents`, or after a handoff the latents in `image`; None means the noised original."""
        if self._stage.latents is not None:
            return self._like_latents(self._stage.latents, "latents", self._stage.frozen.x0)
        if continuing:
            return super().prepare_latents(
                image, timestep, batch_size, num_images_per_prompt, dtype, device, generator, add_noise=False
            )
        return None

    @staticmethod
    def _like_latents(tensor, name, x0):
        if not isinstance(tensor, torch.Tensor) or tensor.shape != x0.shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(
                f"`{name}` must be a tensor shaped like the latents, {tuple(x0.shape)} (images x "
                "num_images_per_prompt, channels, height / vae_scale_factor, width / vae_scale_factor), not "
                f"{shape}."
            )
        return tensor.to(device=x0.device, dtype=x0.dtype)

    def _without_steps(self, prompt, prompt_embeds, image, continuing, stage_end, num_images_per_prompt, generator,
                       output_type):
        # No pixel is released within this call, so no step runs (stock cannot do that). The result is what the
        # latents are before step `stage_end`: frozen pixels hold the noised original, or x0 at the end of the
        # schedule, and pixels released earlier (by the base) keep `image` or `latents`.
        frozen = self._stage.frozen
        device, dtype = self._execution_device, self.unet.dtype
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        schedule = self.scheduler.timesteps  # set by _stage_bounds
        at_the_end = stage_end == frozen.num_inference_steps
        timestep = schedule[min(stage_end, len(schedule) - 1)].repeat(batch_size * num_images_per_prompt)
        noised_original = self._noised_original(timestep, batch_size, num_images_per_prompt, dtype, device, generator)
        latents = frozen.x0.to(dtype) if at_the_end else noised_original
        pixels = self.image_processor.preprocess(image) if continuing else None
        start = self._start_latents(
            pixels, continuing, timestep, batch_size, num_images_per_prompt, dtype, device, generator
        )
        if start is not None:
            latents = where(frozen.release_step >= stage_end, latents, start)
        self._num_timesteps = 0
        images = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        return StableDiffusionXLPipelineOutput(images=images)

    def _decode(self, latents, output_type):
        """Latents to `output_type` as stock's last lines do (VAE upcast, latent statistics, watermark)."""
        if output_type == "latent":
            return latents
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.vae.to(dtype=torch.float32)
        latents = latents.to(self.vae.dtype)
        mean, std = getattr(self.vae.config, "latents_mean", None), getattr(self.vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(latents.device, latents.dtype) for v in (mean, std))
            latents = latents * std / self.vae.config.scaling_factor + mean
        else:
            latents = latents / self.vae.config.scaling_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type)

    def _latent_grid(self, pixels) -> tuple:
        if pixels.shape[1] == self.vae.config.latent_channels:
            return tuple(pixels.shape[-2:])
        # `vae_scale_factor` is set at construction and goes stale when `pipe.vae` is swapped afterwards (for an
        # AutoencoderTiny, say): the grid comes from the VAE attached now, and the core checks it against x0.
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return tuple(n // scale for n in pixels.shape[-2:])

    def _stage_bounds(self, num_inference_steps, timesteps, sigmas, denoising_start, denoising_end):
        """This call's first step and end step (exclusive) on the schedule of T steps, cut where stock cuts it.

        Stock's `get_timesteps` keeps the steps after a `denoising_start`, and stock cuts a `denoising_end` at the
        same timestep for the same fraction, so both bounds are T less the steps it keeps (one model call a step:
        `_check_differential_inputs` refuses a split with higher-order schedulers).
        """
        device = self._execution_device
        retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)

        def steps_before(fraction):
            return num_inference_steps - self.get_timesteps(num_inference_steps, 1.0, device, fraction)[1]

        start = steps_before(denoising_start) if is_fraction(denoising_start) else 0
        end = steps_before(denoising_end) if is_fraction(denoising_end) else num_inference_steps
        # get_timesteps also sets the scheduler's begin index, which would pin add_noise to it: start afresh.
        retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        return start, end

    def _check_differential_inputs(self, image, map, original_image, keep_exact, num_inference_steps, denoising_start,
                                   denoising_end, output_type):
        if image is None or map is None:
            raise ValueError("Pass both `image` and `map`.")
        if not isinstance(num_inference_steps, numbers.Integral) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, not {num_inference_steps}.")
        if is_fraction(denoising_start) and is_fraction(denoising_end) and denoising_start >= denoising_end:
            raise ValueError(
                f"`denoising_start` ({denoising_start}) must be smaller than `denoising_end` ({denoising_end})."
            )
        if (is_fraction(denoising_start) or is_fraction(denoising_end)) and self.scheduler.order != 1:
            raise ValueError(
                f"{type(self.scheduler).__name__} takes {self.scheduler.order} model calls per step, and a "
                "`denoising_start`/`denoising_end` split would fall inside a step; use a first-order scheduler such "
                "as EulerDiscreteScheduler or DPMSolverMultistepScheduler."
            )
        if original_image is not None and original_image is not image and not is_fraction(denoising_start):
            raise ValueError(
                "`original_image` is for a call that continues from latents (`denoising_start`, the refiner); "
                "without it, `image` is the original: pass the image once, as `image`."
            )
        if is_fraction(denoising_start) and original_image is None and self._holds_latents(image):
            raise ValueError(
                "With `denoising_start`, `image` holds the base's latents: pass the image being edited as "
                "`original_image` too, since frozen pixels keep its encoding."
            )
        if keep_exact:
            self._check_keep_exact(image if original_image is None else original_image, denoising_end, output_type)
        return int(num_inference_steps)

    def _check_keep_exact(self, original_image, denoising_end, output_type):
        if self._holds_latents(original_image) or output_type == "latent":
            raise ValueError(
                "`keep_exact` copies the input's pixels into the output: pass the image (`original_image` for the "
                'refiner) as pixels, not latents, and an `output_type` other than "latent".'
            )
        if is_fraction(denoising_end):
            raise ValueError(
                "`keep_exact` composites the input into the finished image, but `denoising_end` stops this call "
                "before the end of the schedule: pass `keep_exact` to the call that finishes it (the refiner)."
            )

    def _holds_latents(self, image) -> bool:
        first = image[0] if isinstance(image, (list, tuple)) and len(image) > 0 else image
        channels = self.vae.config.latent_channels
        return isinstance(first, torch.Tensor) and first.ndim >= 3 and first.shape[-3] == channels

    def _check_continued_latents(self, image, latent_grid):
        if self._holds_latents(image):
            grid = tuple(self.image_processor.preprocess(image).shape[-2:])
            if grid != latent_grid:
                raise ValueError(
                    f"`image` holds latents of {grid[1]}x{grid[0]}, but `original_image` is "
                    f"{latent_grid[1]}x{latent_grid[0]} on the latent grid: pass the original at the size the base "
                    "edited."
                )


def is_fraction(value) -> bool:
    """Stock SDXL applies `denoising_start` and `denoising_end` only when they are floats strictly inside (0, 1)."""
    return isinstance(value, float) and 0 < value < 1



# Copied from SD2/diff_pipe.py:check_moved_arguments
def check_moved_arguments(kwargs: dict, stock_takes_kwargs: bool = True):
    """Refuses the arguments that left the pipeline, saying where they went; and, where stock takes no `**kwargs`,
    any keyword that neither knows."""
    for name in ("crop_to_change", "crop_margin", "crop_upscale"):
        if name in kwargs:
            raise TypeError(
                f"`{name}` is no longer an argument of the pipeline: crop with tools.crop.edit_on_crop(pipe, "
                "margin=..., upscale=..., **arguments) (docs/crop.md)."
            )
    if kwargs and not stock_takes_kwargs:
        raise TypeError(f"Unexpected keyword argument {next(iter(kwargs))!r}.")


# ----------------------------------------------------------------------------------------------------------------
# Copied from SD2/diff_pipe.py: map parsing (begin)


def map_on_grid(map, size: tuple, aspect_of: tuple = None) -> torch.Tensor:
    """The map in its own polarity, float64 (B, 1, *size), on the model's grid. Shrinking averages areas, so that a
    fine map does not alias; growing is bilinear; a cell whose sources are all equal keeps their value exactly. The
    map needs the aspect ratio of `aspect_of` (the image's; default `size`) to within one of its units or 1%, or
    of an image that rounds down to it."""
    map, size = map_to_tensor(map), tuple(size)  # a float64 tensor passes as it is
    (height, width), (image_height, image_width) = map.shape[-2:], aspect_of or size
    slack_height, slack_width = max(1, image_height / 100), max(1, image_width / 100)
    # Rounding an image down to whole cells loses up to one on each side: on the short side of a long image, that
    # moves its aspect ratio by several cells of the long side, so the width's share counts too.
    low = min((image_height - slack_height) / image_width, image_height / (image_width + slack_width))
    if not low <= height / width <= (image_height + slack_height) / image_width:
        raise ValueError(f"`map` is {width}x{height} but the image is {image_width}x{image_height}: their aspect "
                         "ratios differ. Give the map the image's aspect ratio.")
    if (height, width) == size:
        return map
    if height >= size[0] and width >= size[1]:
        mean, high = F.adaptive_avg_pool2d(map, size), F.adaptive_max_pool2d(map, size)
        low = -F.adaptive_max_pool2d(-map, size)
    else:  # each bilinear sample lies within the 3x3 neighbourhood of its nearest source value
        mean, padded = F.interpolate(map, size, mode="bilinear"), F.pad(map, (1, 1, 1, 1), mode="replicate")
        high = F.interpolate(F.max_pool2d(padded, 3, stride=1), size, mode="nearest-exact")
        low = F.interpolate(-F.max_pool2d(-padded, 3, stride=1), size, mode="nearest-exact")
    return mean.clamp(low, high)


def check_map_count(maps: torch.Tensor, images: torch.Tensor):
    if maps.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"Got {maps.shape[0]} maps for {images.shape[0]} images: pass one map, or one map per image.")


def map_to_tensor(map, complement: bool = False) -> torch.Tensor:
    """A map as float64 (B, 1, H, W) in [0, 1], or `1 - map` with `complement`: a PIL image (colour as luminance), an
    array or tensor of (H, W), (B, H, W) or (B, 1, H, W) (arrays also (H, W, 1), (B, H, W, 1)), or a list of them. Each
    value, and its complement, is the float64 nearest its exact meaning: uint8 k is k/255, uint16 (and PIL mode I)
    k/65535, and a float its shortest decimal that rounds back (float32 0.3 is 0.3, not 0.30000001192092896)."""
    if isinstance(map, (list, tuple)):
        if not map:
            raise ValueError("`map` is an empty list: pass one map, or one map per image.")
        maps = [map_to_tensor(m, complement) for m in map]
        if len({tuple(m.shape[-2:]) for m in maps}) > 1:
            sizes = ", ".join(f"{m.shape[-1]}x{m.shape[-2]}" for m in maps)
            raise ValueError(f"The maps in the `map` list differ in size ({sizes}); give them all the same size.")
        return torch.cat(maps)
    if isinstance(map, PIL.Image.Image):  # 16-bit PNGs open as mode I with some Pillow versions
        mode_i = map.mode == "I"
        map = np.array(map if map.mode in ("1", "L", "F", "I") or map.mode.startswith("I;16") else map.convert("L"))
        if mode_i and (map.min() < 0 or map.max() > 65535):
            raise ValueError("A `map` of PIL mode I must hold 16-bit values in [0, 65535].")
        map = map.astype(np.uint16) if mode_i else map
    if isinstance(map, np.ndarray):
        if map.ndim == 3 and map.shape[-1] in (3, 4):
            raise ValueError(f"`map` has shape {map.shape}, which looks like a colour image; a map has one channel. "
                             "Pass a grayscale array, or the image as a PIL image, which is converted to luminance.")
        map = np.ascontiguousarray(map[..., 0] if map.ndim in (3, 4) and map.shape[-1] == 1 else map)
        map = torch.from_numpy(map if map.flags.writeable else map.copy())  # np.asarray(image) is read-only
    if not isinstance(map, torch.Tensor):
        raise TypeError(f"`map` must be a PIL image, numpy array, torch tensor or a list of them, not "
                        f"{type(map).__name__}.")
    map = (map[:, 0] if map.ndim == 4 and map.shape[1] == 1 else map[None] if map.ndim == 2 else map).detach().cpu()
    if map.ndim != 3:
        raise ValueError(f"`map` has shape {tuple(map.shape)}; expected (H, W), (B, H, W) or (B, 1, H, W): maps have "
                         "one channel.")
    if map.numel() == 0:
        raise ValueError(f"`map` is empty (shape {tuple(map.shape)}).")
    unit = {torch.bool: 1, torch.uint8: 255, torch.uint16: 65535}.get(map.dtype)
    if unit is not None:
        return ((unit - map.double() if complement else map.double()) / unit)[:, None]
    if not map.is_floating_point():
        raise ValueError(f"`map` has dtype {map.dtype}; use uint8 (0-255), uint16 (0-65535), bool, or floats in "
                         "[0, 1].")
    if not torch.isfinite(map).all():
        raise ValueError("`map` contains NaN or infinite values.")
    low, high = map.min().item(), map.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"`map` values must lie in [0, 1], but they span [{low:g}, {high:g}]. "
                         "Rescale it first, for example (m - m.min()) / (m.max() - m.min()).")
    if map.dtype == torch.float64:
        return (1 - map if complement else map)[:, None]
    # Each distinct value as its decimal, count / units, so that the complement is exact too.
    values, positions = map.unique(return_inverse=True)
    exact = values.double()
    exponent, count, units = exact.clamp(min=1e-30).log10().floor(), exact, torch.ones_like(exact)
    for digits in range(9, 0, -1):  # the fewest digits that round back win; a value none do stands for itself
        scale = 10.0 ** (digits - 1 - exponent)
        rounded = (exact * scale).round()
        hit = (rounded / scale).to(map.dtype) == values
        count, units = torch.where(hit, rounded, count), torch.where(hit, scale, units)
    return ((units - count if complement else count) / units)[positions][:, None]


# Copied from SD2/diff_pipe.py: map parsing (end)
# ----------------------------------------------------------------------------------------------------------------
