# Copyright 2026 The differential-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Differential Diffusion on Stable Diffusion XL inpainting checkpoints (9-channel UNets): a grayscale map gives every
pixel its own strength, and the UNet's mask channel follows the pixels as they are released.

Levin & Fried, "Differential Diffusion: Giving Each Pixel Its Strength", arXiv 2306.00950.

This file stands alone (torch, diffusers, PIL, numpy): copy it into your own code, or load it as a diffusers
community pipeline::

    pipe = DiffusionPipeline.from_pretrained(
        "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", custom_pipeline="SDXL/diff_pipe_inpaint.py",
        trust_remote_code=True,
    )
    edited = pipe(prompt, image=image, map=map).images[0]
"""

import numbers
from contextlib import contextmanager

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLInpaintPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

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


class StableDiffusionXLDiffInpaintPipeline(StableDiffusionXLInpaintPipeline):
    r"""
    Stable Diffusion XL inpainting checkpoints where a map gives every pixel its own strength (Differential
    Diffusion).

    It takes exactly the components of [`StableDiffusionXLInpaintPipeline`], with a 9-channel inpainting UNet, so
    `from_pretrained`, `from_pipe`, LoRA, IP-Adapter, model offloading and any compatible scheduler work as they do
    there. There is no `mask_image`: the map sets the UNet's mask at every step. A pixel of strength s is released at
    step `T - floor(T * s)`, as in img2img; until then it is frozen on the noised original and the mask shows it as
    known, and from then on the UNet repaints it. A uniform map of strength `s` gives stock inpainting at
    `strength=s` with an all-white mask. The base/refiner split (`denoising_start`, `denoising_end`) is not taken.
    """

    _frozen = None  # the ReleasedMask of the call in progress

    # What tools/crop.py needs to edit a call on the crop of its changes (docs/crop.md).
    copies_adjacent = False  # stock repeats the whole batch for num_images_per_prompt: a, b, a, b

    # Copied from SD2/diff_pipe_inpaint.py:StableDiffusionDiffInpaintPipeline.crop_unit
    @property
    def crop_unit(self) -> int:
        """Whole latent cells, in multiples of 8 pixels, which stock inpainting checks whatever the VAE's factor."""
        return max(8, 2 ** (len(self.vae.config.block_out_channels) - 1))

    # Copied from SD2/diff_pipe.py:StableDiffusionDiffImg2ImgPipeline.native_size
    @property
    def native_size(self) -> int:
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    # Copied from SD2/diff_pipe_inpaint.py:StableDiffusionDiffInpaintPipeline.working_grid
    def working_grid(self, image, map, invert_map=False, height=None, width=None, **call):
        """The image in [0, 1] on the pixel grid it is edited on (stock's default size is the UNet's sample size),
        the map there (1 = change), and pixels per cell."""
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        pixels = self.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
        pixel_grid, cell = tuple(pixels.shape[-2:]), 2 ** (len(self.vae.config.block_out_channels) - 1)
        change = map_on_grid(map_to_tensor(map, complement=not invert_map), pixel_grid, [n // cell for n in pixel_grid])
        return {"image": pixels / 2 + 0.5}, change, cell

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        prompt_2=None,
        image=None,
        mask_image=None,
        masked_image_latents: torch.Tensor = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 7.5,
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
        **kwargs,
    ):
        r"""
        Takes every argument of [`StableDiffusionXLInpaintPipeline.__call__`], in its order and with its defaults
        (except `strength`, whose stock default is 0.9999), then `map`, `invert_map` and `keep_exact`, which must be
        passed by name. The map replaces `mask_image`, `masked_image_latents` and `padding_mask_crop`, which must stay
        unset; `latents` (which stock inpainting takes as the noise itself), `denoising_start` and `denoising_end`
        are not taken. Arguments not listed here act as in stock.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt(s) to guide the edit. Pass `prompt_embeds` and `pooled_prompt_embeds` instead to skip the
                text encoders.
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The image(s) to edit, as stock takes them.
            height (`int`, *optional*), width (`int`, *optional*):
                Resize `image` to this size, as stock does (default: the UNet's sample size); the map follows.
            strength (`float` in [0, 1], *optional*, defaults to 1.0):
                Scales every pixel's strength: `s = strength * (1 - map)`.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The length T of the full schedule. Only the steps from the first released pixel on are run:
                `floor(T * max(s))` UNet steps.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Used in stock's order: the VAE sample of the image (x0), the noise, then the VAE sample of the first
                masked image. Where some pixel is released at step 0, stock would draw no x0 (it starts from pure
                noise); x0 is still drawn first when other pixels are frozen, and not at all when none is.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called at the end of every step that runs, after the frozen pixels have been reset and the mask has
                been updated, so it sees the `latents`, `mask` and `masked_image_latents` of the next step.
            map (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, values in [0, 1], white = keep):
                How much each pixel may change. 1 (white) keeps the pixel, 0 (black) changes it fully: a pixel's
                strength is `1 - map`. An inpainting mask (white = repaint) is `map=mask, invert_map=True`. One map
                for all images, or one per image; any size with the image's aspect ratio (area-averaged down to the
                latent grid). Required.
            invert_map (`bool`, *optional*, defaults to `False`):
                Read `map` the other way round, white = change, as inpainting masks do.
            keep_exact (`bool`, *optional*, defaults to `False`):
                Composite the input back after decoding: `clamp(T * s, 0, 1) * output + (1 - that) * input`, so that
                pixels of strength 0 keep the input's own values. Needs an `output_type` other than `"latent"`.
            **kwargs:
                Passed to stock (its deprecated `callback` and `callback_steps`); the crop's old keywords
                (`crop_to_change`, ...) are refused with a pointer to `tools.crop.edit_on_crop`.

        Returns:
            [`StableDiffusionXLPipelineOutput`] or `tuple`, as stock. `pipe.num_timesteps` is the number of denoising
            steps actually run.
        """
        # 1. Check inputs
        check_moved_arguments(kwargs)
        if denoising_start is not None or denoising_end is not None:
            raise ValueError(
                "`denoising_start` and `denoising_end` (the base/refiner split) are not taken by differential "
                "inpainting: run the whole schedule in one call."
            )
        self._check_differential_inputs(image, map, mask_image, masked_image_latents, padding_mask_crop, latents,
                                        num_inference_steps, strength, keep_exact, output_type)
        for schedule in (timesteps, sigmas):
            if schedule is not None:
                num_inference_steps = len(schedule)

        # 2. Grid: stock's default size is the UNet's sample size, and it resizes the image to the size it runs at.
        # `vae_scale_factor` goes stale when `pipe.vae` is swapped, so the grid comes from the VAE attached now.
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        pixels = self.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
        pixel_grid, scale = tuple(pixels.shape[-2:]), 2 ** (len(self.vae.config.block_out_channels) - 1)
        latent_grid = tuple(n // scale for n in pixel_grid)

        # 3. Strength map and release steps
        change = map_to_tensor(map, complement=not invert_map)  # parsed once, sized to each grid that needs it
        strengths = strength * map_on_grid(change, latent_grid)
        check_map_count(strengths, pixels)
        frozen = ReleasedMask(
            release_steps(strengths, num_inference_steps), num_inference_steps, pixels, callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        # With every pixel released at step 0 nothing is frozen: that is stock inpainting at strength 1.
        differential = frozen.last_frozen_step > 0

        # 4. Stock's call at the strongest pixel's strength, which starts on the first released step, with the mask
        # of that step
        decoded_type = "pt" if keep_exact else output_type
        self._frozen = frozen if differential else None
        try:
            if frozen.first_step == num_inference_steps:
                output = self._unchanged(prompt, prompt_embeds, pixels, num_images_per_prompt, generator, decoded_type)
            else:
                output = super().__call__(
                    prompt=prompt,
                    prompt_2=prompt_2,
                    image=image,
                    mask_image=frozen.released_pixels(frozen.first_step),
                    height=height,
                    width=width,
                    strength=strengths.max().item(),
                    num_inference_steps=num_inference_steps,
                    timesteps=timesteps,
                    sigmas=sigmas,
                    guidance_scale=guidance_scale,
                    negative_prompt=negative_prompt,
                    negative_prompt_2=negative_prompt_2,
                    num_images_per_prompt=num_images_per_prompt,
                    eta=eta,
                    generator=generator,
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
                    callback_on_step_end=frozen if differential else callback_on_step_end,
                    callback_on_step_end_tensor_inputs=(
                        frozen.step_end_tensor_inputs if differential else callback_on_step_end_tensor_inputs
                    ),
                    **kwargs,
                )
        finally:
            self._frozen = None

        # 5. Keep exact
        if keep_exact:
            strengths = strength * map_on_grid(change, pixel_grid, aspect_of=latent_grid)
            images = composite_original(output.images, pixels / 2 + 0.5, strengths, num_inference_steps)
            return self._finish(images, output_type, return_dict)
        return output if return_dict else (output.images,)

    def _finish(self, images, output_type, return_dict):
        # From pixels in [0, 1] that we composited ourselves to what the caller asked for.
        images = self.image_processor.postprocess(images, output_type, do_denormalize=[False] * len(images))
        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)

    # Copied from SD2/diff_pipe_inpaint.py:StableDiffusionDiffInpaintPipeline.prepare_latents
    def prepare_latents(self, *args, is_strength_max=True, return_noise=False, return_image_latents=False, **kwargs):
        # Stock draws x0 and the noise here and keeps only add_noise(x0, noise, t); frozen pixels need both again.
        # From step 0 (`is_strength_max`) stock starts on pure noise and never encodes the image: x0 is then asked
        # for, and the pixels still frozen start on the noised original of step 0, as everywhere else.
        frozen = self._frozen
        if frozen is None:
            return super().prepare_latents(*args, is_strength_max=is_strength_max, return_noise=return_noise,
                                           return_image_latents=return_image_latents, **kwargs)
        with recording_noise(self.scheduler, frozen):
            latents, noise, *image_latents = super().prepare_latents(
                *args, is_strength_max=is_strength_max, return_noise=True,
                return_image_latents=return_image_latents or is_strength_max, **kwargs,
            )
        if is_strength_max:
            frozen.record(image_latents[0], noise)
            noised = noised_original(self.scheduler, frozen.x0, frozen.noise, 0)
            latents = where(frozen.release_step > 0, noised, latents)
        outputs = (latents, noise) if return_noise else (latents,)
        return outputs + tuple(image_latents[:1]) if return_image_latents else outputs

    def encode_mean(self, pixels: torch.Tensor) -> torch.Tensor:
        """The scaled latents of `pixels` (in [-1, 1]) from the VAE's mean: an encoding that draws no random numbers.
        SDXL's VAE overflows in float16, so it encodes in float32 where its config asks for it, as stock does."""
        vae, dtype = self.vae, self.vae.dtype
        upcast = vae.config.force_upcast and dtype != torch.float32
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            encoded = vae.encode(pixels.to(vae.device, vae.dtype))
        finally:
            if upcast:
                vae.to(dtype=dtype)
        latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
        return latents * vae.config.scaling_factor

    def _unchanged(self, prompt, prompt_embeds, pixels, num_images_per_prompt, generator, output_type):
        # No pixel is released, so no step runs: the result is x0, drawn as stock draws it.
        device, dtype = self._execution_device, self.vae.dtype
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        x0 = self._encode_vae_image(pixels.to(device, dtype), generator)
        latents = tile_to_batch(x0, batch_size * num_images_per_prompt)
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

    # Copied from SD2/diff_pipe_inpaint.py:StableDiffusionDiffInpaintPipeline._check_differential_inputs with SD2->SDXL
    def _check_differential_inputs(self, image, map, mask_image, masked_image_latents, padding_mask_crop, latents,
                                   num_inference_steps, strength, keep_exact, output_type):
        if image is None or map is None:
            raise ValueError("Pass both `image` and `map`.")
        if mask_image is not None or masked_image_latents is not None or padding_mask_crop is not None:
            raise ValueError(
                "The map sets the inpainting mask at every step: leave `mask_image`, `masked_image_latents` and "
                "`padding_mask_crop` unset, and pass an inpainting mask (white = repaint) as "
                "`map=mask, invert_map=True`."
            )
        if latents is not None:
            raise ValueError(
                "`latents` is not taken: stock inpainting uses them as the noise and skips encoding the image, which "
                "frozen pixels need. Pass a `generator` instead."
            )
        if self.unet.config.in_channels != 9:
            raise ValueError(
                f"This pipeline is for inpainting checkpoints, whose UNet reads 9 channels; this one reads "
                f"{self.unet.config.in_channels}. For other checkpoints use the img2img pipeline of SDXL/diff_pipe.py."
            )
        if not isinstance(num_inference_steps, numbers.Integral) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, not {num_inference_steps}.")
        if not 0 <= strength <= 1:
            raise ValueError(f"`strength` must lie in [0, 1], not {strength}.")
        if keep_exact and output_type == "latent":
            raise ValueError('`keep_exact` copies the input\'s pixels into the output: pick an `output_type` other '
                             'than "latent".')


# ----------------------------------------------------------------------------------------------------------------
# Copied from SD2/diff_pipe_inpaint.py: released mask (begin)
#
# The core's FrozenPixels, extended for inpainting checkpoints, whose 9-channel UNets also read a mask and the masked
# image (design, section 7). Every inpainting file carries this block unchanged.
# ----------------------------------------------------------------------------------------------------------------


class ReleasedMask(FrozenPixels):
    """FrozenPixels for inpainting UNets, which also read a mask channel and the masked image's latents.

    Before each step k, the mask is 1 where the pixel is released (k >= release_step: the UNet runs on it) and 0
    where it is still frozen, and the masked image shows exactly the still-frozen pixels. Both change only at steps
    where some pixel is released; the masked image is re-encoded then, and only then. Stock encodes the first masked
    image (`released_pixels(first_step)`, which the pipeline passes as stock's `mask_image`) with a VAE sample, as it
    always does; re-encodings take the VAE's mean, which draws nothing from the generator, so that the scheduler's
    own draws stay stock's: the pipeline's `encode_mean` does it.
    """

    def __init__(self, release_step, num_inference_steps, pixels, callback=None, tensor_inputs=()):
        super().__init__(release_step, num_inference_steps, callback, tensor_inputs)
        self.image_release_step = release_step  # one per map, as given: `record` lays `release_step` out as x0
        self.pixels = pixels  # the preprocessed image, in [-1, 1]

    @property
    def step_end_tensor_inputs(self) -> list:
        return sorted(set(super().step_end_tensor_inputs) | {"mask", "masked_image_latents"})

    def released_pixels(self, step: int) -> torch.Tensor:
        """1 where a pixel is released by `step`, per map, at pixel resolution (each latent cell covers a block)."""
        released = (self.image_release_step <= step).float()
        return F.interpolate(released, size=self.pixels.shape[-2:], mode="nearest")

    def __call__(self, pipe, i, t, callback_kwargs):
        order = pipe.scheduler.order
        next_iteration = self.first_step * order + i + 1
        step = next_iteration // order
        if next_iteration % order == 0 and step < self.num_inference_steps and (self.release_step == step).any():
            callback_kwargs = {**callback_kwargs, **self.mask_inputs(pipe, step, callback_kwargs["mask"])}
        outputs = super().__call__(pipe, i, t, callback_kwargs)
        return {name: callback_kwargs[name] for name in ("mask", "masked_image_latents")} | outputs

    def mask_inputs(self, pipe, step, stock_mask):
        """The mask and masked image latents of `step`, batched as stock's (images, then the guidance copies)."""
        batch_size = self.x0.shape[0]  # the images' batch: one map may serve them all
        copies = stock_mask.shape[0] // batch_size
        mask = tile_to_batch((self.release_step <= step).to(stock_mask.dtype), batch_size)
        mask = mask.expand(batch_size, -1, -1, -1).repeat(copies, 1, 1, 1)
        masked_image = self.pixels * (self.released_pixels(step) < 0.5)
        latents = tile_to_batch(pipe.encode_mean(masked_image), batch_size).to(stock_mask.dtype)
        return {"mask": mask, "masked_image_latents": latents.repeat(copies, 1, 1, 1)}


# Copied from SD2/diff_pipe_inpaint.py: released mask (end)



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
