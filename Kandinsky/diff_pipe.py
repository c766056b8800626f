# Copyright 2026 The differential-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Differential img2img for Kandinsky 2.2: a grayscale map gives every pixel its own strength.

Levin & Fried, "Differential Diffusion: Giving Each Pixel Its Strength", arXiv 2306.00950.

Kandinsky 2.2 runs in two stages: the prior turns the prompt into CLIP image embeddings, and the decoder (this
pipeline) edits the image under those embeddings. The map acts on the decoder's MoVQ latent grid.

This file stands alone (torch, diffusers, PIL, numpy): copy it into your own code, or load it as a diffusers
community pipeline::

    prior = KandinskyV22PriorPipeline.from_pretrained("kandinsky-community/kandinsky-2-2-prior")
    pipe = DiffusionPipeline.from_pretrained(
        "kandinsky-community/kandinsky-2-2-decoder", custom_pipeline="Kandinsky/diff_pipe.py", trust_remote_code=True
    )
    image_embeds, negative_image_embeds = prior("a watercolour painting", negative_prompt="blurry").to_tuple()
    edited = pipe(image_embeds=image_embeds, negative_image_embeds=negative_image_embeds, image=photo, map=keep_map)
"""

import numbers
from contextlib import contextmanager

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import ImagePipelineOutput, KandinskyV22Img2ImgPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

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


class KandinskyV22DiffImg2ImgPipeline(KandinskyV22Img2ImgPipeline):
    r"""
    Kandinsky 2.2 img2img where a map gives every pixel its own strength (Differential Diffusion).

    This is the decoder stage. It takes exactly the components of [`KandinskyV22Img2ImgPipeline`] (`unet`,
    `scheduler`, `movq`), so `from_pretrained("kandinsky-community/kandinsky-2-2-decoder")`, `from_pipe`, model
    offloading and any compatible scheduler work as they do there. The image embeddings come from the stock
    [`KandinskyV22PriorPipeline`]. A uniform map of strength `s` gives exactly what stock img2img gives at
    `strength=s`.
    """

    _frozen = None  # the FrozenPixels of the call in progress

    # What tools/crop.py needs to edit a call on the crop of its changes (docs/crop.md).
    copies_adjacent = True  # stock puts the num_images_per_prompt copies of an image next to each other: a, a, b, b

    @property
    def crop_unit(self) -> int:
        return self.pixel_multiple

    @property
    def native_size(self) -> int:
        return self.unet.config.sample_size * self.image_processor.config.vae_scale_factor

    def working_grid(self, image, map, invert_map=False, height=512, width=512, **call):
        """The images in [0, 1] resized to `height` x `width` as stock resizes them, the map stretched with them
        (1 = change), and pixels per cell."""
        pixels = self._pixels(self._resize_images(image, height, width))
        change = self._map_on(tuple(pixels.shape[-2:]), map_to_tensor(map, complement=not invert_map), image)
        return {"image": pixels / 2 + 0.5}, change, self.image_processor.config.vae_scale_factor

    @torch.no_grad()
    def __call__(
        self,
        image_embeds: torch.Tensor | list[torch.Tensor],
        image,
        negative_image_embeds: torch.Tensor | list[torch.Tensor],
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        strength: float = 1.0,
        num_images_per_prompt: int = 1,
        generator=None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        *,
        map=None,
        invert_map: bool = False,
        keep_exact: bool = False,
        **kwargs,
    ):
        r"""
        Takes every argument of [`KandinskyV22Img2ImgPipeline.__call__`], in its order and with its defaults (except
        `strength`), then `map`, `invert_map` and `keep_exact`, which must be passed by name.

        Args:
            image_embeds (`torch.Tensor` of shape `(batch_size, embedding_dim)`, or a list of them):
                The CLIP image embeddings of the prompt(s), from [`KandinskyV22PriorPipeline`]: the edit's target.
            image (`PIL.Image.Image`, `torch.Tensor` or a list of them):
                The image(s) to edit, as stock Kandinsky img2img takes them (tensors of shape `(B, 3, H, W)` in
                [0, 1] or [-1, 1]). Every image is resized to `height` x `width`.
            negative_image_embeds (`torch.Tensor` of shape `(batch_size, embedding_dim)`, or a list of them):
                The unconditional embeddings for classifier-free guidance, from the same prior run (its
                `negative_image_embeds`: the embedding of the negative prompt, or of an empty image without one).
            height (`int`, *optional*, defaults to 512):
                Height in pixels of the result, a multiple of `pipe.pixel_multiple` (64 for Kandinsky 2.2, whose UNet
                needs latents in multiples of 8); `None` keeps the image's own height. Unlike stock diffusers 0.42,
                which swaps `height` and `width`, a non-square size comes out as asked.
            width (`int`, *optional*, defaults to 512):
                Width in pixels of the result, as `height`.
            num_inference_steps (`int`, *optional*, defaults to 100):
                The length T of the full schedule. Only the steps from the first released pixel on are run:
                `floor(T * max(s))` UNet steps.
            guidance_scale (`float`, *optional*, defaults to 4.0):
                Classifier-free guidance scale between `negative_image_embeds` and `image_embeds`; 1 or less turns it
                off.
            strength (`float` in [0, 1], *optional*, defaults to 1.0):
                Scales every pixel's strength: `s = strength * (1 - map)`. With a uniform map this is stock
                img2img's `strength` (whose default is 0.3).
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                Images to make per prompt; maps follow their images. As in stock, more than one needs
                `guidance_scale` > 1.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Used as stock img2img uses it (the noise, then the scheduler's own draws), so a seed gives the same
                result. A list holds one generator per output image.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`ImagePipelineOutput`] rather than a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called at the end of every step, after the frozen pixels have been reset, so it sees the latents that
                the next step will run on. It may return new `latents` or `image_embeds`, as in stock.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["latents"]`):
                The tensors passed to `callback_on_step_end`, among `"latents"`, `"image_embeds"` and
                `"negative_image_embeds"`, as in stock.
            map (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, values in [0, 1], white = keep):
                How much each pixel may change. 1 (white) keeps the pixel, 0 (black) changes it fully: a pixel's
                strength is `1 - map`. Grayscale PIL images of mode L or I;16 work as they are; float arrays must lie
                in [0, 1]. One map for all images, or one per image. It is stretched to `height` x `width` with its
                image and area-averaged down to the MoVQ latent grid (`height / 8` x `width / 8` for Kandinsky 2.2),
                so it may have any size with the image's aspect ratio, or with the aspect ratio of `height` x `width`.
                Required.
            invert_map (`bool`, *optional*, defaults to `False`):
                Read `map` the other way round, white = change, as inpainting masks and some UIs do.
            keep_exact (`bool`, *optional*, defaults to `False`):
                Composite the input back after decoding: `clamp(T * s, 0, 1) * output + (1 - that) * input`, where
                the input is the image resized to `height` x `width`. Pixels of strength 0 are then the input's own
                values instead of its lossy MoVQ round trip, and pixels of strength below 1/T fade in linearly. Off
                by default, as in the paper.
            **kwargs:
                Passed to stock (its deprecated `callback` and `callback_steps`); anything else is refused.

        Returns:
            [`ImagePipelineOutput`] or `tuple`, as stock. `pipe.num_timesteps` is the number of denoising steps
            actually run.
        """
        # 1. Check inputs
        check_moved_arguments(kwargs)
        self._check_differential_inputs(image_embeds, negative_image_embeds, image, map, strength,
                                        num_inference_steps, kwargs)
        if num_images_per_prompt > 1 and guidance_scale <= 1:
            raise ValueError(
                "Stock Kandinsky img2img repeats `image_embeds` for `num_images_per_prompt` only under guidance: with "
                "`guidance_scale` <= 1, pass every image, embedding and map n times instead."
            )
        if keep_exact and output_type == "latent":
            raise ValueError('`keep_exact` copies the input\'s pixels into the output: pass an `output_type` other '
                             'than "latent".')

        # 2. Grid: the images resized to `height` x `width` here, as stock would, and the MoVQ latent grid under them
        resized = self._resize_images(image, height, width)
        pixels = self._pixels(resized)
        pixel_grid = tuple(pixels.shape[-2:])
        self._check_size(pixel_grid)
        factor = self.image_processor.config.vae_scale_factor
        latent_grid = (pixel_grid[0] // factor, pixel_grid[1] // factor)

        # 3. Strength map and release steps; stock repeats each image's latents in place (a, a, b, b) for
        # num_images_per_prompt, and the release steps follow.
        change = map_to_tensor(map, complement=not invert_map)  # parsed once, sized to each grid that needs it
        strengths = strength * self._map_on(latent_grid, change, image)
        check_map_count(strengths, pixels)
        frozen = FrozenPixels(
            _per_output(release_steps(strengths, num_inference_steps), num_images_per_prompt), num_inference_steps,
            callback_on_step_end, callback_on_step_end_tensor_inputs,
        )

        # 4. Stock's call at the strongest pixel's strength, which starts on the first released step
        decoded_type = "pt" if keep_exact else output_type
        self._frozen = frozen
        try:
            if frozen.first_step == num_inference_steps:
                output = self._unchanged(image_embeds, pixels, num_images_per_prompt, generator, decoded_type)
            else:
                output = super().__call__(
                    image_embeds=image_embeds,
                    image=resized,
                    negative_image_embeds=negative_image_embeds,
                    height=None,  # the images have their final size: stock keeps it
                    width=None,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    strength=strengths.max().item(),
                    num_images_per_prompt=num_images_per_prompt,
                    generator=generator,
                    output_type=decoded_type,
                    return_dict=True,  # the tuple, if asked for, is made below
                    callback_on_step_end=frozen,
                    callback_on_step_end_tensor_inputs=frozen.step_end_tensor_inputs,
                    **kwargs,
                )
        finally:
            self._frozen = None

        # 5. Keep exact, in stock's output order (a, a, b, b); the core would tile a per-image tensor as a, b, a, b.
        if keep_exact:
            strengths = strength * self._map_on(pixel_grid, change, image)
            strengths, original = (_per_output(t, num_images_per_prompt) for t in (strengths, pixels / 2 + 0.5))
            images = composite_original(output.images, original, strengths, num_inference_steps)
            images = self.image_processor.postprocess(images, output_type, do_denormalize=[False] * len(images))
            output = ImagePipelineOutput(images=images)
        return output if return_dict else (output.images,)


    @property
    def pixel_multiple(self) -> int:
        """`height` and `width` must be multiples of this: 64 for Kandinsky 2.2 (8 px per latent, 3 halvings)."""
        unet_halvings = len(self.unet.config.block_out_channels) - 1
        return self.image_processor.config.vae_scale_factor * 2**unet_halvings

    def prepare_latents(self, *args, **kwargs):
        # Stock draws `noise` here and keeps only add_noise(x0, noise, t); every frozen pixel needs x0 and noise again.
        if self._frozen is None:
            return super().prepare_latents(*args, **kwargs)
        with recording_noise(self.scheduler, self._frozen):
            return super().prepare_latents(*args, **kwargs)

    @staticmethod
    def _check_differential_inputs(image_embeds, negative_image_embeds, image, map, strength, num_inference_steps,
                                   kwargs):
        # Stock checks none of these, and ignores unknown keywords: a `prompt` would be dropped without a word.
        if image is None or map is None:
            raise ValueError("Pass both `image` and `map`.")
        if image_embeds is None or negative_image_embeds is None:
            raise ValueError(
                "Pass `image_embeds` and `negative_image_embeds` from KandinskyV22PriorPipeline: "
                "`image_embeds, negative_image_embeds = prior(prompt, negative_prompt=...).to_tuple()`."
            )
        unknown = sorted(set(kwargs) - {"callback", "callback_steps"})  # stock's deprecated ones still work
        if unknown:
            hint = " The decoder takes no text: turn prompts into `image_embeds` with KandinskyV22PriorPipeline."
            raise TypeError(f"Unexpected argument(s) {', '.join(unknown)}." + (hint if "prompt" in unknown else ""))
        if not isinstance(num_inference_steps, numbers.Integral) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, not {num_inference_steps}.")
        if not isinstance(strength, numbers.Real) or not 0 <= strength <= 1:
            raise ValueError(f"`strength` must lie in [0, 1], not {strength}.")

    def _resize_images(self, image, height, width) -> list:
        """Every image resized to `height` x `width` (rounded down to the MoVQ factor) with stock's image processor.

        Stock diffusers (0.42) hands its image processor `width` as the height and `height` as the width, so a
        request for 768 x 512 (height x width) comes out 512 x 768. Images resized here, and passed on with
        `height=width=None`, keep their size through stock's own preprocessing, whichever way it passes the two: the
        result has the size asked for, and the latent grid the map lands on is the one stock then encodes.
        """
        images = image if isinstance(image, list) else [image]
        if not all(isinstance(i, (PIL.Image.Image, torch.Tensor)) for i in images):
            kinds = ", ".join(sorted({type(i).__name__ for i in images}))
            raise ValueError(f"`image` must be a PIL image, a torch tensor or a list of them, not {kinds}.")
        resized = []
        for item in images:
            if isinstance(item, PIL.Image.Image):
                item = item if item.mode == "RGB" else item.convert("RGB")  # stock would fail on L or RGBA
            else:
                item = item[None] if item.ndim == 3 else item
                if item.ndim != 4 or item.shape[1] != 3:
                    raise ValueError(
                        f"`image` tensors must have shape (B, 3, H, W) or (3, H, W), not {tuple(item.shape)}: "
                        "Kandinsky img2img takes RGB images and encodes them itself."
                    )
            size = self.image_processor.get_default_height_width(item, height, width)
            resized.append(self.image_processor.resize(item, *size))
        return resized

    def _pixels(self, resized: list) -> torch.Tensor:
        """The resized images as stock feeds them to the MoVQ: (B, 3, H, W) in [-1, 1]."""
        sizes = {_pixel_size(item) for item in resized}
        if len(sizes) > 1:
            shown = ", ".join(f"{w}x{h}" for h, w in sorted(sizes))
            raise ValueError(f"The images differ in size ({shown}): pass `height` and `width` to resize them alike.")
        return torch.cat([self.image_processor.preprocess(item) for item in resized])

    def _check_size(self, pixel_grid: tuple):
        if pixel_grid[0] % self.pixel_multiple or pixel_grid[1] % self.pixel_multiple:
            factor = self.image_processor.config.vae_scale_factor
            raise ValueError(
                f"The images are {pixel_grid[1]}x{pixel_grid[0]} pixels, but this decoder needs multiples of "
                f"{self.pixel_multiple} ({factor} pixels per MoVQ latent, and latent grids in multiples of "
                f"{self.pixel_multiple // factor} for the UNet): pass `height` and `width` that are multiples of "
                f"{self.pixel_multiple}."
            )

    @staticmethod
    def _map_on(size: tuple, map, image) -> torch.Tensor:
        """`map_on_grid` on `size` (the latent or the pixel grid), the map stretched as the images are.

        Every image is resized to `height` x `width`, whatever its own shape. A map drawn on the image has the
        image's aspect ratio and is stretched with it; a map with the aspect ratio of `height` x `width` is taken as
        it is.
        """
        map = map_to_tensor(map)
        (height, width), (grid_height, grid_width) = map.shape[-2:], size
        drawn_for_the_grid = abs(height * grid_width / width - grid_height) <= max(1, grid_height / 100)
        aspect_of = None if drawn_for_the_grid else _pixel_size(image[0] if isinstance(image, list) else image)
        return map_on_grid(map, size, aspect_of=aspect_of)

    def _unchanged(self, image_embeds, pixels, num_images_per_prompt, generator, output_type):
        # No pixel is released, so no step runs: the result is x0, as at every kept pixel of a run.
        device, dtype = self._execution_device, self.movq.dtype
        batch_size = torch.cat(image_embeds).shape[0] if isinstance(image_embeds, list) else image_embeds.shape[0]
        self.scheduler.set_timesteps(self._frozen.num_inference_steps, device=device)
        latents = self.movq.encode(pixels.to(device=device, dtype=dtype))["latents"]
        latents = latents.repeat_interleave(num_images_per_prompt, dim=0)
        timestep = self.scheduler.timesteps[-1:].repeat(batch_size * num_images_per_prompt)
        noised = self.prepare_latents(latents, timestep, batch_size, num_images_per_prompt, dtype, device, generator)
        self._num_timesteps = 0
        x0 = self._frozen.x0.expand_as(noised).contiguous()  # one image under several prompts broadcasts, as in stock
        if output_type == "latent":
            images = x0
        else:
            decoded = self.movq.decode(x0, force_not_quantize=True)["sample"]
            images = self.image_processor.postprocess(decoded, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images)


def _pixel_size(image) -> tuple:
    """(height, width) of a PIL image or an image tensor."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    return tuple(image.shape[-2:])


def _per_output(per_image: torch.Tensor, num_images_per_prompt: int) -> torch.Tensor:
    """A per-image tensor in the order of stock's outputs, which repeats each image in place: a, a, b, b."""
    return per_image if per_image.shape[0] == 1 else per_image.repeat_interleave(num_images_per_prompt, dim=0)



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
