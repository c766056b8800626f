# Copyright 2026 The differential-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Differential img2img for DeepFloyd IF stage II: a grayscale map gives every pixel its own strength.

Levin & Fried, "Differential Diffusion: Giving Each Pixel Its Strength", arXiv 2306.00950.

Stage II denoises `original_image` (the image being edited) at its own pixel resolution (256 px on the short side
for the released models; `unet.config.sample_size`), conditioned on `image`, the stage I result upscaled. The map
works on that grid: kept pixels stay the original's, and the released ones follow the stage I edit.

This file stands alone (torch, diffusers, PIL, numpy): copy it into your own code, or load it as a diffusers
community pipeline::

    pipe = DiffusionPipeline.from_pretrained(
        "DeepFloyd/IF-II-L-v1.0", custom_pipeline="IF/diff_pipe_II.py", trust_remote_code=True,
        text_encoder=None, variant="fp16", torch_dtype=torch.float16,
    )
"""

import numbers
from contextlib import contextmanager

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import IFImg2ImgSuperResolutionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.deepfloyd_if import IFPipelineOutput

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


class IFDiffImg2ImgSuperResolutionPipeline(IFImg2ImgSuperResolutionPipeline):
    r"""
    DeepFloyd IF stage II img2img super-resolution where a map gives every pixel its own strength.

    It takes exactly the components of [`IFImg2ImgSuperResolutionPipeline`], so `from_pretrained`, `from_pipe`,
    LoRA, model offloading and the compatible schedulers work as they do there. A uniform map of strength `s` gives
    exactly what the stock pipeline gives at `strength=s`.
    """

    # Stock omits the watermarker here (stage I lists it), so a stage II saved without one would not load back.
    _optional_components = [*IFImg2ImgSuperResolutionPipeline._optional_components, "watermarker"]

    _frozen = None  # the FrozenPixels of the call in progress

    # What tools/crop.py needs to edit a call on the crop of its changes (docs/crop.md).
    copies_adjacent = True  # IF puts the num_images_per_prompt copies of an image next to each other: a, a, b, b
    pixel_range = (-1, 1)  # of the image tensors that IF takes and returns

    # Copied from IF/diff_pipe_I.py:IFDiffImg2ImgPipeline.crop_unit
    @property
    def crop_unit(self) -> int:
        """8 px, the multiple that stock IF resizes images to, or more where the UNet halves the image more often, so
        that a crop passes every level of the UNet whole."""
        return max(8, 2 ** (len(self.unet.config.down_block_types) - 1))

    # Copied from IF/diff_pipe_I.py:IFDiffImg2ImgPipeline.native_size
    @property
    def native_size(self) -> int:
        return self.unet.config.sample_size

    def working_grid(self, image, original_image, map, invert_map=False, **call):
        """The original in [0, 1] on stage II's pixel grid, with the stage I result upscaled to that grid as stock
        upscales it; the map there (1 = change); and pixels per cell: one."""
        pixels = self.preprocess_original_image(original_image)
        stage1_result = self.preprocess_image(image, 1, pixels.device).float()
        upscaled = F.interpolate(stage1_result, pixels.shape[-2:], mode="bilinear", align_corners=True)
        change = map_on_grid(map_to_tensor(map, complement=not invert_map), tuple(pixels.shape[-2:]))
        return {"original_image": pixels / 2 + 0.5, "image": upscaled / 2 + 0.5}, change, 1

    @property
    def num_timesteps(self) -> int:
        """The number of denoising steps the last call ran (0 when the map released no pixel)."""
        return self._num_timesteps

    @torch.no_grad()
    def __call__(
        self,
        image,
        original_image=None,
        strength: float = 1.0,
        prompt=None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float = 4.0,
        negative_prompt=None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback=None,
        callback_steps: int = 1,
        cross_attention_kwargs: dict | None = None,
        noise_level: int = 250,
        clean_caption: bool = True,
        *,
        map=None,
        invert_map: bool = False,
        keep_exact: bool = False,
        **kwargs,
    ):
        r"""
        Takes every argument of [`IFImg2ImgSuperResolutionPipeline.__call__`], in its order and with its defaults
        (except `strength`), then `map`, `invert_map` and `keep_exact`, which must be passed by name.

        Args:
            image (`torch.Tensor`, `PIL.Image.Image`, `np.ndarray` or a list of them):
                The stage I result(s), the conditioning that stage II upscales: tensors in [-1, 1] as stage I returns
                them with `output_type="pt"`, or PIL images.
            original_image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The image(s) being edited. PIL images are resized to stage II's size (`unet.config.sample_size` on
                the short side); arrays and tensors are taken as they are, in [-1, 1], as stock IF takes them.
            strength (`float` in [0, 1], *optional*, defaults to 1.0):
                Scales every pixel's strength: `s = strength * (1 - map)`, in [0, 1]. With a uniform map this is
                the stock pipeline's `strength`.
            prompt (`str` or `list[str]`, *optional*):
                The prompt(s). Stage II is usually loaded with `text_encoder=None` and given stage I's
                `prompt_embeds` and `negative_prompt_embeds` instead.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The length T of the full schedule. Only the steps from the first released pixel on are run:
                `floor(T * max(s))` UNet steps.
            timesteps (`list[int]`, *optional*):
                A custom schedule, as in stock; T is then its length.
            guidance_scale (`float`, *optional*, defaults to 4.0):
                Classifier-free guidance scale, as in stock; 1 or less turns guidance off.
            negative_prompt (`str` or `list[str]`, *optional*):
                As in stock.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                Images to make per prompt; maps follow their images.
            eta (`float`, *optional*, defaults to 0.0):
                DDIM's eta, as in stock.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Used in the same order as the stock pipeline, so a seed gives the same result.
            prompt_embeds (`torch.Tensor`, *optional*):
                As in stock (from `encode_prompt`).
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                As in stock.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"` (both in [0, 1]) or `"pt"` (in [-1, 1]).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`IFPipelineOutput`] rather than a tuple.
            callback (`Callable`, *optional*):
                `callback(step, timestep, intermediate_images)`, called every `callback_steps` steps after the frozen
                pixels have been reset, so it sees the images that the next step will run on.
            callback_steps (`int`, *optional*, defaults to 1):
                How often `callback` is called.
            cross_attention_kwargs (`dict`, *optional*):
                Passed to the attention processors, as in stock.
            noise_level (`int`, *optional*, defaults to 250):
                How much noise is added to the upscaled `image` (the conditioning), as in stock.
            clean_caption (`bool`, *optional*, defaults to `True`):
                Clean the prompt before encoding it, as in stock (needs `bs4` and `ftfy`).
            map (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, values in [0, 1], white = keep):
                How much each pixel may change. 1 (white) keeps the pixel, 0 (black) changes it fully: a pixel's
                strength is `1 - map`. Grayscale PIL images of mode L or I;16 work as they are; float arrays must lie
                in [0, 1]. One map for all images, or one per image; any size with the image's aspect ratio (it is
                area-averaged down to stage II's pixel grid). Use the map that stage I used. Required.
            invert_map (`bool`, *optional*, defaults to `False`):
                Read `map` the other way round, white = change, as inpainting masks and some UIs do.
            keep_exact (`bool`, *optional*, defaults to `False`):
                Composite the original back at the end: `clamp(T * s, 0, 1) * output + (1 - that) * original`, with
                the original at stage II's size. IF works in pixels, so pixels of strength below 1/T already
                end as that original, and this changes next to nothing; it is here so that every pipeline takes it.
            **kwargs:
                Refused, as stock takes none: the crop's old keywords (`crop_to_change`, ...) with a pointer to
                `tools.crop.edit_on_crop`, any other as an unexpected keyword argument.

        Returns:
            [`IFPipelineOutput`] or `tuple`, as stock. `pipe.num_timesteps` is the number of denoising steps
            actually run.
        """
        # 1. Check inputs
        check_moved_arguments(kwargs, stock_takes_kwargs=False)
        if image is None or original_image is None or map is None:
            raise ValueError("Pass `image` (the stage I result), `original_image` (the image being edited) and `map`.")
        check_strength_and_steps(strength, num_inference_steps)
        batch_size = prompt_batch_size(prompt, prompt_embeds)
        self.check_inputs(
            prompt, image, original_image, batch_size, callback_steps, negative_prompt, prompt_embeds,
            negative_prompt_embeds,
        )
        if timesteps is not None:
            num_inference_steps = len(timesteps)

        # 2. Grid: IF denoises pixels, so the map works on stage II's own pixel grid, the original's
        pixels = self.preprocess_original_image(original_image)

        # 3. Strength map and release steps, one row per output image (IF puts an image's copies side by side)
        strengths = strength * map_on_grid(map_to_tensor(map, complement=not invert_map), tuple(pixels.shape[-2:]))
        check_map_count(strengths, pixels)
        release_step = per_output(release_steps(strengths, num_inference_steps), num_images_per_prompt)
        self._frozen = frozen = FrozenPixels(release_step, num_inference_steps)
        self._num_timesteps = num_inference_steps - frozen.first_step

        # 4. Stock's call at the strongest pixel's strength, which starts on the first released step; keep_exact
        # composites the [-1, 1] images, and then finishes them as stock would.
        finish = dict(output_type="pt", return_dict=True) if keep_exact else dict(
            output_type=output_type, return_dict=return_dict
        )
        try:
            if self._num_timesteps == 0:
                output = return_original(self, pixels, batch_size, num_images_per_prompt, generator, **finish)
            else:
                output = super().__call__(
                    image=image,
                    original_image=pixels,
                    strength=strengths.max().item(),
                    prompt=prompt,
                    num_inference_steps=num_inference_steps,
                    timesteps=timesteps,
                    guidance_scale=guidance_scale,
                    negative_prompt=negative_prompt,
                    num_images_per_prompt=num_images_per_prompt,
                    eta=eta,
                    generator=generator,
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds,
                    **finish,
                    callback=blending_callback(self, frozen, callback, callback_steps),
                    callback_steps=1,
                    cross_attention_kwargs=cross_attention_kwargs,
                    noise_level=noise_level,
                    clean_caption=clean_caption,
                )
        finally:
            self._frozen = None

        # 5. Keep exact
        if not keep_exact:
            return output
        return composite_kept_pixels(self, output, frozen, strengths, num_images_per_prompt, output_type, return_dict)

    def prepare_intermediate_images(self, *args, **kwargs):
        # Stock draws `noise` here and keeps only add_noise(x0, noise, t); every frozen pixel needs x0 and noise again.
        if self._frozen is None:  # called outside a differential call
            return super().prepare_intermediate_images(*args, **kwargs)
        # The upscaled conditioning is noised by `image_noising_scheduler`, which is not recorded.
        with recording_noise(self.scheduler, self._frozen):
            return super().prepare_intermediate_images(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Copied from IF/diff_pipe_I.py: IF helpers (begin)
#
# What both IF stages add to the core: IF's batch order, its older step callback and its post-processing.
# ----------------------------------------------------------------------------------------------------------------


def check_strength_and_steps(strength, num_inference_steps):
    # Stock IF checks neither: a strength above 1 would silently clip, and bad step counts fail deep in the loop.
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 <= strength <= 1:
        raise ValueError(f"`strength` must be a number in [0, 1], not {strength!r}.")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral) or (
        num_inference_steps < 1
    ):
        raise ValueError(f"`num_inference_steps` must be a positive integer, not {num_inference_steps!r}.")


def prompt_batch_size(prompt, prompt_embeds) -> int:
    """The number of prompts, counted as stock counts them; 0 when there are none (stock's check_inputs says so)."""
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    return prompt_embeds.shape[0] if prompt_embeds is not None else 0


def per_output(tensor, num_images_per_prompt):
    """One row per image that IF makes (or one for all). IF puts the copies of an image side by side
    (repeat_interleave), where the core would tile per-image tensors to the batch."""
    return tensor.repeat_interleave(num_images_per_prompt, dim=0) if tensor.shape[0] > 1 else tensor


def blending_callback(pipe, frozen: FrozenPixels, callback=None, callback_steps: int = 1):
    """IF's step callback `callback(i, t, intermediate_images)`, called with `callback_steps=1`.

    Stock calls it after `scheduler.step` and then runs the next step on the same tensor, so the blend updates that
    tensor in place. The user's own `callback` follows every `callback_steps` steps and sees the blended images.
    """

    def blend_in_place(i, t, intermediate_images):
        blended = frozen.blend(pipe.scheduler, i, intermediate_images)
        if blended is not intermediate_images:
            intermediate_images.copy_(blended)
        if callback is not None and i % callback_steps == 0:
            callback(i, t, intermediate_images)

    return blend_in_place


def return_original(pipe, pixels, batch_size, num_images_per_prompt, generator, output_type, return_dict):
    """The result when no pixel is released: x0 itself, as at every kept pixel of a run, and no step runs.

    `x0` is recorded through stock `prepare_intermediate_images`, so it is batched exactly as in a run.
    """
    device, dtype = pipe._execution_device, pipe.unet.dtype
    pipe.scheduler.set_timesteps(pipe._frozen.num_inference_steps, device=device)
    timestep = pipe.scheduler.timesteps[-1:].repeat(batch_size * num_images_per_prompt)
    pixels = pixels.to(device=device, dtype=dtype)
    pipe.prepare_intermediate_images(pixels, timestep, batch_size, num_images_per_prompt, dtype, device, generator)
    return postprocess_like_stock(pipe, pipe._frozen.x0, output_type, return_dict)


def composite_kept_pixels(pipe, output, frozen, strengths, num_images_per_prompt, output_type, return_dict):
    """`keep_exact`: the [-1, 1] `output` composited with x0 as the core composites with the input, then finished.

    x0 is the original at the stage's resolution, as IF sees it. In pixel space, without a VAE round trip, pixels
    released at no step (T * s < 1) already end as x0 and the others show the output whole: the composite changes
    nothing beyond rounding. Pass an `original_image` at the stage's size to get its own bytes back.
    """
    strengths = per_output(strengths, num_images_per_prompt)
    images = composite_original(output.images, frozen.x0, strengths, frozen.num_inference_steps)
    return postprocess_like_stock(pipe, images, output_type, return_dict)


def postprocess_like_stock(pipe, images, output_type, return_dict):
    """Stock IF's ending for `images` in [-1, 1]: "pt" gives them as they are; otherwise [0, 1] arrays pass the
    safety checker (if any), and "pil" images get the watermark (if any)."""
    nsfw_detected = watermark_detected = None
    if output_type != "pt":
        images = (images / 2 + 0.5).clamp(0, 1)
        images = images.cpu().permute(0, 2, 3, 1).float().numpy()
        images, nsfw_detected, watermark_detected = pipe.run_safety_checker(
            images, pipe._execution_device, pipe.unet.dtype
        )
        if output_type == "pil":
            images = pipe.numpy_to_pil(images)
            if pipe.watermarker is not None:
                pipe.watermarker.apply_watermark(images, pipe.unet.config.sample_size)
    pipe.maybe_free_model_hooks()
    if not return_dict:
        return images, nsfw_detected, watermark_detected
    return IFPipelineOutput(images=images, nsfw_detected=nsfw_detected, watermark_detected=watermark_detected)


# Copied from IF/diff_pipe_I.py: IF helpers (end)
# ----------------------------------------------------------------------------------------------------------------



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
