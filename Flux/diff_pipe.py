# Copyright 2026 The differential-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Differential img2img for FLUX.1: a grayscale map gives every pixel its own strength.

Levin & Fried, "Differential Diffusion: Giving Each Pixel Its Strength", arXiv 2306.00950.

This file stands alone (torch, diffusers, PIL, numpy): copy it into your own code, or load it as a diffusers
community pipeline::

    pipe = DiffusionPipeline.from_pretrained(
        "black-forest-labs/FLUX.1-dev", custom_pipeline="Flux/diff_pipe.py", trust_remote_code=True
    )
"""

import numbers
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import FluxImg2ImgPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.hooks.hooks import CacheContext, HookRegistry, StateManager, _set_cache_context
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.flux import FluxPipelineOutput

# ----------------------------------------------------------------------------------------------------------------
# Copied from SD3/diff_pipe.py: flow release rule (begin)
# Stock flow-matching img2img's rule (SD3, FLUX.1, Chroma, Qwen-Image, Z-Image): int(T - T * strength), scale_noise.


def release_steps(strengths: torch.Tensor, num_inference_steps: int) -> torch.Tensor:
    """Each pixel's first step, r = int(T - T * s): stock's own expression for its first step at `strength=s`, in
    float64 as stock computes it, so a uniform map runs stock's steps: ceil(T * s) where T * s is not whole. Only
    strength 0 gives r == T, never released."""
    return (num_inference_steps - num_inference_steps * strengths.double()).floor().long()


def noised_original(scheduler, x0: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
    """What a frozen pixel holds before loop iteration `index`. Not `scheduler.scale_noise`, which ignores the
    timestep once stock has set the scheduler's begin index."""
    sigma = scheduler.sigmas[index].to(x0.device, x0.dtype)
    return sigma * noise + (1.0 - sigma) * x0


@contextmanager
def recording_noise(scheduler, frozen, noising: bool = True):
    """Hands `frozen` the x0 and noise that stock `prepare_latents` passes to `scheduler.scale_noise`; without
    `noising`, skips the noising, for a call that runs no step and so sets no schedule."""
    def scale_noise(sample, timestep, noise=None):
        frozen.record(sample, noise)
        return stock_scale_noise(sample, timestep, noise) if noising else sample

    stock_scale_noise = scheduler.scale_noise
    scheduler.scale_noise = scale_noise
    try:
        yield
    finally:
        del scheduler.scale_noise


# Copied from SD3/diff_pipe.py: flow release rule (end)
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


# ----------------------------------------------------------------------------------------------------------------
# Copied from Flux/diff_pipe.py: denoiser caches (begin)
# diffusers' caches (FirstBlockCache, TaylorSeer, MagCache, FasterCache, ...) keep their state per named context, which
# stock's img2img and inpainting loops do not all set (design, section 10).


@contextmanager
def cache_contexts(pipe, frozen):
    """While stock's loop runs, names each call of a caching transformer as stock's text-to-image loops do ("cond",
    then "uncond" for a second call in the same step), with the step it runs. On the first step run and on every
    step that releases pixels, the cache starts afresh, so the whole transformer runs there: a release is a change
    that no stored residual has seen. A cache that counts steps from 0 (MagCache) counts from the first step run."""
    denoiser, scheduler = pipe.transformer, pipe.scheduler
    if not getattr(denoiser, "is_cache_enabled", False):
        yield
        return
    releases, seen = set(frozen.release_step.unique().tolist()), []

    def before_call(module, args, kwargs):
        # Before the scheduler's first step, the loop is at the first step run (stock sets no begin index in Wan).
        index = frozen.first_step * scheduler.order if scheduler.step_index is None else scheduler.step_index
        step, name = index // scheduler.order, "uncond" if seen and seen[-1] == index else "cond"
        afresh = name == "cond" and index % scheduler.order == 0 and (not seen or step in releases)
        if afresh:
            denoiser._reset_stateful_cache()
        seen.append(index)
        pipe._current_timestep = scheduler.timesteps[index]  # what FasterCache and Pyramid Attention Broadcast read
        context = CacheContext(name, step_index=step, num_inference_steps=frozen.num_inference_steps,
                               timestep=pipe._current_timestep, sigma=float(scheduler.sigmas[index]))
        _set_cache_context(denoiser, context)
        for hook, state in cache_states(denoiser):
            if getattr(state, "step_index", step) == 0:  # a fresh MagCache state: align its table with the schedule
                state.step_index = step
            if afresh and hasattr(hook, "block_skip_range"):  # FasterCache computes on counts that skip_range divides
                state.iteration = hook.block_skip_range

    handles = [denoiser.register_forward_pre_hook(before_call, with_kwargs=True),
               denoiser.register_forward_hook(lambda module, args, output: _set_cache_context(denoiser, None))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        denoiser._reset_stateful_cache()  # the next call, maybe of another size, starts afresh too


def cache_states(denoiser) -> list:
    """(hook, state) for every cache hook under `denoiser`: the state it keeps for the context now set (or its one
    state, for hooks that keep one for all contexts)."""
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    hooks = [hook for child in (registry, *registry._get_child_registries()) for hook in child.hooks.values()]
    states = []
    for hook in (hook for hook in hooks if hook._is_stateful):
        managers = [value for value in vars(hook).values() if isinstance(value, StateManager)]
        states += [(hook, manager.get_state()) for manager in managers if manager._context is not None]
        states += [(hook, hook.state)] if not managers and hasattr(hook, "state") else []
    return states


# Copied from Flux/diff_pipe.py: denoiser caches (end)
# ----------------------------------------------------------------------------------------------------------------


class FluxDiffImg2ImgPipeline(FluxImg2ImgPipeline):
    r"""
    FLUX.1 img2img where a map gives every pixel its own strength (Differential Diffusion).

    It takes exactly the components of [`FluxImg2ImgPipeline`], so `from_pretrained`, `from_pipe`, LoRA, IP-Adapter,
    model offloading and any compatible flow-matching scheduler work as they do there. A uniform map of strength `s`
    gives exactly what stock img2img gives at `strength=s`.

    Flux hands its transformer latents packed in 2x2 patches, (B, H/2 * W/2, 4C). The map is applied on the unpacked
    latent grid, at full latent resolution, and packed the same way; `output_type="latent"` and
    `callback_on_step_end` see packed latents, as in stock.
    """

    _frozen = None  # the FrozenPixels of the call in progress

    # What tools/crop.py needs to edit a call on the crop of its changes (docs/crop.md).
    copies_adjacent = False  # stock repeats the whole batch for num_images_per_prompt: a, b, a, b

    @property
    def crop_unit(self) -> int:
        """Sizes are whole 2x2 patches of latents, as stock rounds them."""
        return self.vae_scale_factor * 2

    # Copied from SD3/diff_pipe.py:StableDiffusion3DiffImg2ImgPipeline.native_size
    @property
    def native_size(self) -> int:
        return self.default_sample_size * self.vae_scale_factor

    # Copied from SD3/diff_pipe.py:StableDiffusion3DiffImg2ImgPipeline.working_grid
    def working_grid(self, image, map, invert_map=False, height=None, width=None, **call):
        """The image in [0, 1] on the pixel grid it is edited on, the map there (1 = change), and pixels per cell."""
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        pixels, cell = self.image_processor.preprocess(image, height=height, width=width), self.vae_scale_factor
        change = map_to_tensor(map, complement=not invert_map)
        return {"image": pixels / 2 + 0.5}, map_on_grid(change, tuple(pixels.shape[-2:]), (height, width)), cell

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        image: PipelineImageInput = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image: PipelineImageInput | None = None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        *,
        map=None,
        invert_map: bool = False,
        keep_exact: bool = False,
        **kwargs,
    ):
        r"""
        Every argument of [`FluxImg2ImgPipeline.__call__`] works as there, in the same order; these differ:

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The image(s) to edit, in any form stock img2img takes (tensors in [0, 1], or unpacked latents with the
                VAE's channels). It is resized to `height` x `width`, as in stock, which default to 1024 x 1024.
            map (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, values in [0, 1], white = keep):
                How much each pixel may change. 1 (white) keeps the pixel, 0 (black) changes it fully: a pixel's
                strength is `1 - map`. Grayscale PIL images of mode L or I;16 work as they are; float arrays must lie
                in [0, 1]. One map for all images, or one per image; any size with the aspect ratio of `height` x
                `width` (it is area-averaged down to the unpacked latent grid). Keyword only.
            strength (`float`, *optional*, defaults to 1.0):
                Scales every pixel's strength: `s = strength * (1 - map)`. With a uniform map this is stock
                img2img's `strength`. Stock's default is 0.6; here the map sets the strengths.
            invert_map (`bool`, *optional*, defaults to `False`):
                Read `map` the other way round, white = change, as inpainting masks and some UIs do.
            keep_exact (`bool`, *optional*, defaults to `False`):
                Composite the input back after decoding: `clamp(T * s, 0, 1) * output + (1 - that) * input`. Pixels
                of strength 0 are then the input's own values instead of its lossy VAE round trip, and pixels of
                strength below 1/T (which run only the last step) fade in linearly. Off by default, as in the paper.
            **kwargs:
                Refused, as stock takes none: the crop's old keywords (`crop_to_change`, ...) with a pointer to
                `tools.crop.edit_on_crop`, any other as an unexpected keyword argument.
            num_inference_steps (`int`, *optional*, defaults to 28):
                The length T of the full schedule (or `len(sigmas)`). A pixel of strength `s` runs from the step on
                which stock img2img at `strength=s` starts, `int(T - T * s)`, so it runs `ceil(T * s)` steps; only
                the steps from the first released pixel on are run at all.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Used in the same order as stock img2img (VAE sample, then noise), so a seed gives the same result.
            latents (`torch.Tensor`, *optional*):
                Not supported: the frozen pixels are made from the image and the noise that stock draws. Pass the
                image, or its latents, as `image`.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called at the end of every step, after the frozen pixels have been reset, so it sees the (packed)
                latents that the next step will run on.

        Returns:
            [`FluxPipelineOutput`] or `tuple`, as stock. `pipe.num_timesteps` is the number of denoising loop
            iterations actually run.
        """
        # 1. Check inputs
        check_moved_arguments(kwargs, stock_takes_kwargs=False)
        if image is None or map is None:
            raise ValueError("Pass both `image` and `map`.")
        if latents is not None:
            raise ValueError(
                "`latents` is not supported: the frozen pixels are made from the image and the noise that the "
                "pipeline draws. Pass the image, or its latents, as `image`."
            )
        if not isinstance(num_inference_steps, numbers.Integral) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, not {num_inference_steps}.")
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(
            prompt, prompt_2, strength, height, width, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        if sigmas is not None:
            num_inference_steps = len(sigmas)

        pixels = self.image_processor.preprocess(image, height=height, width=width)
        image_is_latents = pixels.shape[1] == self.latent_channels
        if keep_exact and (image_is_latents or output_type == "latent"):
            raise ValueError(
                "`keep_exact` copies the input's pixels into the output: pass `image` as pixels, not latents, and an "
                '`output_type` other than "latent".'
            )

        # 2. Grid
        pixel_grid = tuple(pixels.shape[-2:])
        # Stock's latent grid: even, so that 2x2 patches tile it.
        latent_grid = tuple(2 * (int(n) // (self.vae_scale_factor * 2)) for n in (height, width))
        if image_is_latents and tuple(pixels.shape[-2:]) != latent_grid:
            raise ValueError(
                f"`image` holds {pixels.shape[-1]}x{pixels.shape[-2]} latents, but `height` and `width` give "
                f"{latent_grid[1]}x{latent_grid[0]}: pass height={pixels.shape[-2] * self.vae_scale_factor} and "
                f"width={pixels.shape[-1] * self.vae_scale_factor}."
            )

        # 3. Strength map and release steps
        change = map_to_tensor(map, complement=not invert_map)  # parsed once, sized to each grid that needs it
        # The map has the aspect ratio of `height` x `width`, as asked, not of the grid they are rounded down to
        strengths = strength * map_on_grid(change, latent_grid, aspect_of=(height, width))
        check_map_count(strengths, pixels)
        frozen = FrozenPixels(
            release_steps(strengths, num_inference_steps),
            num_inference_steps,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            pack=lambda latents: self._pack_latents(latents, *latents.shape),
        )

        # 4. Stock's call at the strongest pixel's strength, which starts on the first released step
        decoded_type = "pt" if keep_exact else output_type
        self._frozen = frozen
        try:
            if frozen.first_step == num_inference_steps:
                batch_size = prompt_embeds.shape[0] if prompt is None else 1 if isinstance(prompt, str) else len(prompt)
                images = self._unchanged(
                    pixels, batch_size * num_images_per_prompt, height, width, generator, decoded_type
                )
            else:
                with cache_contexts(self, frozen):
                    images = super().__call__(
                        prompt=prompt,
                        prompt_2=prompt_2,
                        negative_prompt=negative_prompt,
                        negative_prompt_2=negative_prompt_2,
                        true_cfg_scale=true_cfg_scale,
                        image=image,
                        height=height,
                        width=width,
                        strength=strengths.max().item(),
                        num_inference_steps=num_inference_steps,
                        sigmas=sigmas,
                        guidance_scale=guidance_scale,
                        num_images_per_prompt=num_images_per_prompt,
                        generator=generator,
                        latents=latents,
                        prompt_embeds=prompt_embeds,
                        pooled_prompt_embeds=pooled_prompt_embeds,
                        ip_adapter_image=ip_adapter_image,
                        ip_adapter_image_embeds=ip_adapter_image_embeds,
                        negative_ip_adapter_image=negative_ip_adapter_image,
                        negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds,
                        negative_prompt_embeds=negative_prompt_embeds,
                        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                        output_type=decoded_type,
                        return_dict=True,
                        joint_attention_kwargs=joint_attention_kwargs,
                        callback_on_step_end=frozen,
                        callback_on_step_end_tensor_inputs=frozen.step_end_tensor_inputs,
                        max_sequence_length=max_sequence_length,
                    ).images
        finally:
            self._frozen = None

        # 5. Keep exact
        if keep_exact:
            strengths = strength * map_on_grid(change, pixel_grid, aspect_of=(height, width))
            images = composite_original(images, pixels / 2 + 0.5, strengths, num_inference_steps)
            images = self.image_processor.postprocess(images, output_type, do_denormalize=[False] * len(images))
        return FluxPipelineOutput(images=images) if return_dict else (images,)

    # Copied from SD3/diff_pipe.py:StableDiffusion3DiffImg2ImgPipeline.prepare_latents
    def prepare_latents(self, *args, **kwargs):
        # Stock draws `noise` here and keeps only scale_noise(x0, t, noise); frozen pixels need x0 and noise again.
        if self._frozen is None:
            return super().prepare_latents(*args, **kwargs)
        with recording_noise(self.scheduler, self._frozen):
            return super().prepare_latents(*args, **kwargs)

    def _unchanged(self, pixels, batch_size, height, width, generator, output_type):
        # No pixel is released, so no step runs: the result is x0, as at every kept pixel of a run.
        device, dtype = self._execution_device, self.vae.dtype
        channels = self.transformer.config.in_channels // 4
        with recording_noise(self.scheduler, self._frozen, noising=False):
            super().prepare_latents(pixels, None, batch_size, channels, height, width, dtype, device, generator)
        self._num_timesteps = 0
        latents = self._frozen.x0  # packed, as stock returns latents
        if output_type == "latent":
            images = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor + self.vae.config.shift_factor)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return images




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
