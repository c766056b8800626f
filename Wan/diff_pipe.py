# Copyright 2026 The differential-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Differential video-to-video for Wan 2.1: a grayscale map, still or one per frame, gives every pixel its own strength.

Levin & Fried, "Differential Diffusion: Giving Each Pixel Its Strength", arXiv 2306.00950.

This file stands alone (torch, diffusers, PIL, numpy): copy it into your own code, or load it as a diffusers
community pipeline::

    pipe = DiffusionPipeline.from_pretrained(
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", custom_pipeline="Wan/diff_pipe.py", trust_remote_code=True
    )
"""

import numbers
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import WanVideoToVideoPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.hooks.hooks import CacheContext, HookRegistry, StateManager, _set_cache_context
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

# ----------------------------------------------------------------------------------------------------------------
# Stock Wan 2.1 video-to-video's rule: it keeps the last int(T * strength) steps, the floor rule of SD img2img
# although its scheduler is flow matching, and noises with `add_noise` where the scheduler has one (UniPC, the
# default) and `scale_noise` where it has not (flow-matching Euler). The SD2 block's noising knows only `add_noise`.


# Copied from SD2/diff_pipe.py:release_steps
def release_steps(strengths: torch.Tensor, num_inference_steps: int) -> torch.Tensor:
    """Each pixel's first step, r = T - int(T * s): stock's own expression for its first step at `strength=s`, in
    float64 as stock computes it, so a uniform map runs stock's steps. r == T (s below 1/T): never released."""
    return num_inference_steps - (num_inference_steps * strengths.double()).floor().long()


def noised_original(scheduler, x0: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
    """What a frozen latent cell holds before loop iteration `index`: the original noised to that step as stock
    noises it. `scale_noise` is not called: it reads the timestep's step from a begin index that a scheduler reused
    from another pipeline may hold, so the flow formula takes the sigma of `index` itself."""
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(x0, noise, scheduler.timesteps[index : index + 1].repeat(x0.shape[0]))
    sigma = scheduler.sigmas[index].to(x0.device, x0.dtype)
    return sigma * noise + (1.0 - sigma) * x0


@contextmanager
def recording_noise(scheduler, frozen, noising: bool = True):
    """Hands `frozen` the x0 and noise that stock `prepare_latents` noises, through the very method it calls;
    without `noising`, skips the noising, for a call that runs no step and so sets no schedule."""
    def add_noise(original_samples, noise, timesteps):
        frozen.record(original_samples, noise)
        return stock_noising(original_samples, noise, timesteps) if noising else original_samples

    def scale_noise(sample, timestep, noise=None):
        frozen.record(sample, noise)
        return stock_noising(sample, timestep, noise) if noising else sample

    name = "add_noise" if hasattr(scheduler, "add_noise") else "scale_noise"  # stock's own test
    stock_noising = getattr(scheduler, name)
    setattr(scheduler, name, add_noise if name == "add_noise" else scale_noise)
    try:
        yield
    finally:
        delattr(scheduler, name)


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


class FrozenCells(FrozenPixels):
    """The core above on video latents (B, C, F', H', W'): its release steps come as (B, 1, F', H', W'), one per
    latent cell in time as in space, where the core's own `record` lays out one per pixel of a still image."""

    def record(self, x0: torch.Tensor, noise: torch.Tensor):
        grid, encoded = tuple(self.release_step.shape[-3:]), tuple(x0.shape[-3:])
        if grid != encoded:
            raise ValueError(f"The video was encoded to {encoded[0]} latent frames of {encoded[2]}x{encoded[1]}, "
                             f"but the map was sized to {grid[0]} of {grid[2]}x{grid[1]}: give the video a width and "
                             "height that 16 divides and 1 + 4k frames.")
        batch_size = max(x0.shape[0], noise.shape[0])  # stock broadcasts one video over several prompts
        self.release_step, self.x0, self.noise = tile_to_batch(self.release_step, batch_size).to(x0.device), x0, noise


class WanDiffVideoToVideoPipeline(WanVideoToVideoPipeline):
    r"""
    Wan 2.1 video-to-video where a map gives every pixel of every frame its own strength (Differential Diffusion).

    It takes exactly the components of [`WanVideoToVideoPipeline`], so `from_pretrained`, `from_pipe`, LoRA, model
    offloading and any scheduler stock takes work as they do there. A uniform map of strength `s` gives exactly what
    stock gives at `strength=s`. Wan's VAE encodes frame 0 alone, then each group of 4 frames, into one latent frame:
    the map is averaged over the frames of a latent frame as over the pixels of a latent cell, and each latent cell is
    released at the step where stock at its strength starts, `T - int(T * s)`.

    `tools.crop` edits the box that holds every pixel released in any frame, as it crops an image (docs/video.md).
    """

    _frozen = None  # the FrozenCells of the call in progress

    # What tools/crop.py needs to edit a call on the crop of its changes (docs/crop.md).
    copies_adjacent = False  # stock makes one video per prompt, whatever num_videos_per_prompt asks
    crop_unit = 16  # stock refuses a height or width that 16 does not divide
    native_size = round((480 * 832) ** 0.5)  # the area of stock's default size, 480p, which Wan 2.1 1.3B is made for

    def working_grid(self, video, map, invert_map=False, height=480, width=832, **call):
        """The video in [0, 1] on the pixel grid it is edited on, as stock's "pt" output lays it out, (B, F, 3, H, W),
        with the frames that stock drops (past the last 1 + 4k) dropped; the map there, (B, F, H, W) with F 1 for a
        still map (1 = change); and pixels per latent cell."""
        height = height or self.transformer.config.sample_height * self.vae_scale_factor_spatial
        width = width or self.transformer.config.sample_width * self.vae_scale_factor_spatial
        pixels = self.video_processor.preprocess_video(video, height=height, width=width)
        change = video_map_to_tensor(map, complement=not invert_map)
        check_video_map(change, pixels)
        frames = (pixels.shape[2] - 1) // self.vae_scale_factor_temporal * self.vae_scale_factor_temporal + 1
        change = map_on_frames(change, (height, width), aspect_of=(height, width))[:, :frames]
        return {"video": (pixels[:, :, :frames] / 2 + 0.5).transpose(1, 2)}, change, self.vae_scale_factor_spatial

    @torch.no_grad()
    def __call__(
        self,
        video: list[PIL.Image.Image] = None,
        prompt: str | list[str] = None,
        negative_prompt: str | list[str] = None,
        height: int = 480,
        width: int = 832,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float = 5.0,
        strength: float = 1.0,
        num_videos_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        *,
        map=None,
        invert_map: bool = False,
        keep_exact: bool = False,
        **kwargs,
    ):
        r"""
        Every argument of [`WanVideoToVideoPipeline.__call__`] works as there, in the same order; these differ:

        Args:
            video (`list[PIL.Image.Image]`, `np.ndarray`, `torch.Tensor`, or a list of videos):
                The video(s) to edit, in any form stock takes, resized to `height` x `width`. Wan's VAE encodes
                1 + 4k frames (frame 0 alone, then groups of 4); frames beyond the last whole group are dropped, as
                in stock.
            map (values in [0, 1], white = keep):
                How much each pixel may change. 1 (white) keeps the pixel, 0 (black) changes it fully: a pixel's
                strength is `1 - map`. Grayscale PIL images of mode L or I;16 work as they are; float arrays must lie
                in [0, 1]; any size with the aspect ratio of `height` x `width`. It takes the forms `video` takes, with
                one channel, or a still image:
                - a still map (`PIL.Image.Image`, or an array or tensor (H, W)): the same map for every frame of
                  every video;
                - one map per frame of a video: a list of F images or arrays (H, W), or an array or tensor
                  (F, H, W), F the number of frames of `video`;
                - one map per video of a batch: a list with one entry per video, each a still map given as a list
                  of one image, or an array (1, H, W), or a map per frame as above (a list, or an array (F, H, W));
                  or an array or tensor (B, F, H, W), F being 1 or the frame count.
                A flat list of images is always the frames of one video, as it is for `video`. The frames that share
                a latent frame are averaged, area by area. Keyword only.
            strength (`float`, *optional*, defaults to 1.0):
                Scales every pixel's strength: `s = strength * (1 - map)`. With a uniform map this is stock's
                `strength`. Stock's default is 0.8; here the map sets the strengths.
            invert_map (`bool`, *optional*, defaults to `False`):
                Read `map` the other way round, white = change, as inpainting masks and some UIs do.
            keep_exact (`bool`, *optional*, defaults to `False`):
                Composite the input back after decoding, frame by frame: `clamp(T * s, 0, 1) * output + (1 - that) *
                input`, with each frame's own map at pixel resolution. Pixels of strength 0 are then the input's own
                values instead of its lossy VAE round trip. Off by default, as in the paper.
            **kwargs:
                Refused, as stock takes none: the crop's old keywords with a pointer to `tools.crop`, any other as an
                unexpected keyword argument.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The length T of the full schedule (or `len(timesteps)`). A latent cell of strength `s` runs the last
                `int(T * s)` steps, as stock at `strength=s`; only the steps from the first released cell on run.
            num_videos_per_prompt (`int`, *optional*, defaults to 1):
                Passed to stock, which makes one video per prompt whatever it is.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Used as stock uses it (the VAE takes its mode; the generator draws the noise), so a seed gives the
                same result.
            latents (`torch.Tensor`, *optional*):
                Not supported: the frozen cells are made from the video and the noise that stock draws.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called at the end of every step, after the frozen cells have been reset, so it sees the latents that
                the next step will run on.

        Returns:
            [`WanPipelineOutput`] or `tuple`, as stock. `pipe.num_timesteps` is the number of denoising steps run.
        """
        # 1. Check inputs
        check_moved_arguments(kwargs, stock_takes_kwargs=False)
        if video is None or map is None:
            raise ValueError("Pass both `video` and `map`.")
        if latents is not None:
            raise ValueError("`latents` is not supported: the frozen cells are made from the video and the noise that "
                             "the pipeline draws. Pass the video as `video`.")
        if not isinstance(num_inference_steps, numbers.Integral) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, not {num_inference_steps}.")
        if not 0 <= strength <= 1:
            raise ValueError(f"`strength` must lie in [0, 1], not {strength}.")
        if keep_exact and output_type == "latent":
            raise ValueError('`keep_exact` copies the input\'s pixels into the output: pass an `output_type` other '
                             'than "latent".')
        height = height or self.transformer.config.sample_height * self.vae_scale_factor_spatial
        width = width or self.transformer.config.sample_width * self.vae_scale_factor_spatial
        self.check_inputs(prompt, negative_prompt, height, width, video, latents, prompt_embeds, negative_prompt_embeds,
                          callback_on_step_end_tensor_inputs)
        if timesteps is not None:
            num_inference_steps = len(timesteps)
        # Kept on the CPU: a copy beside stock's own on the GPU would hold 370 MiB through the loop at 81 frames of
        # 480 x 832, for keep_exact's composite after it.
        pixels = self.video_processor.preprocess_video(video, height=height, width=width).to(torch.float32)

        # 2. Grid: (frames, rows, columns) of the latents
        frames = pixels.shape[2]
        latent_grid = ((frames - 1) // self.vae_scale_factor_temporal + 1,
                       height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial)

        # 3. Strength map and release steps
        change = video_map_to_tensor(map, complement=not invert_map)  # (videos, frames, H, W), in change polarity
        check_video_map(change, pixels)
        strengths = strength * map_on_latent_frames(change, latent_grid, self.vae_scale_factor_temporal,
                                                    aspect_of=(height, width))
        frozen = FrozenCells(
            release_steps(strengths, num_inference_steps),
            num_inference_steps,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )

        # 4. Stock's call at the strongest cell's strength, which starts on the first released step
        decoded_type = "pt" if keep_exact else output_type
        self._frozen = frozen
        try:
            if frozen.first_step == num_inference_steps:
                batch_size = prompt_embeds.shape[0] if prompt is None else 1 if isinstance(prompt, str) else len(prompt)
                videos = self._unchanged(pixels, batch_size, generator, decoded_type)
            else:
                with cache_contexts(self, frozen):
                    videos = super().__call__(
                        video=video,
                        prompt=prompt,
                        negative_prompt=negative_prompt,
                        height=height,
                        width=width,
                        num_inference_steps=num_inference_steps,
                        timesteps=timesteps,
                        guidance_scale=guidance_scale,
                        strength=strengths.max().item(),
                        num_videos_per_prompt=num_videos_per_prompt,
                        generator=generator,
                        latents=latents,
                        prompt_embeds=prompt_embeds,
                        negative_prompt_embeds=negative_prompt_embeds,
                        output_type=decoded_type,
                        return_dict=True,
                        attention_kwargs=attention_kwargs,
                        callback_on_step_end=frozen,
                        callback_on_step_end_tensor_inputs=frozen.step_end_tensor_inputs,
                        max_sequence_length=max_sequence_length,
                    ).frames
        finally:
            self._frozen = None

        # 5. Keep exact, frame by frame: (B, F, 3, H, W) in [0, 1], as stock's "pt" output
        if keep_exact:
            decoded_frames = videos.shape[1]  # 1 + 4k: frames past the last whole group are not encoded
            original = (pixels / 2 + 0.5).transpose(1, 2)[:, :decoded_frames]
            grid = map_on_frames(change, (height, width), aspect_of=(height, width))
            strengths = strength * grid[:, :decoded_frames, None]  # a frame's map for its 3 channels
            videos = composite_original(videos, original, strengths, num_inference_steps)
            videos = self.video_processor.postprocess_video(videos.transpose(1, 2), output_type,
                                                            do_denormalize=[False] * decoded_frames)
        return WanPipelineOutput(frames=videos) if return_dict else (videos,)

    def prepare_latents(self, *args, **kwargs):
        # Stock draws `noise` here and keeps only the noised latents; frozen cells need x0 and noise again.
        if self._frozen is None:
            return super().prepare_latents(*args, **kwargs)
        with recording_noise(self.scheduler, self._frozen):
            return super().prepare_latents(*args, **kwargs)

    def _unchanged(self, pixels, batch_size, generator, output_type):
        # No cell is released, so no step runs: the result is x0, as at every kept cell of a run.
        device, (height, width) = self._execution_device, pixels.shape[-2:]
        with recording_noise(self.scheduler, self._frozen, noising=False):
            super().prepare_latents(pixels, batch_size, self.transformer.config.in_channels, height, width,
                                    torch.float32, device, generator)
        self._num_timesteps = 0
        latents = tile_to_batch(self._frozen.x0, batch_size)
        if output_type == "latent":
            videos = latents
        else:  # stock's decoding
            latents = latents.to(self.vae.dtype)
            latents_mean = (
                torch.tensor(self.vae.config.latents_mean)
                .view(1, self.vae.config.z_dim, 1, 1, 1)
                .to(latents.device, latents.dtype)
            )
            latents_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, self.vae.config.z_dim, 1, 1, 1).to(
                latents.device, latents.dtype
            )
            decoded = self.vae.decode(latents / latents_std + latents_mean, return_dict=False)[0]
            videos = self.video_processor.postprocess_video(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return videos


# Maps of videos: what the image families' map parsing below needs for a frame axis.


def video_map_to_tensor(map, complement: bool = False) -> torch.Tensor:
    """A map of videos as float64 (videos, frames, H, W) in [0, 1], or `1 - map` with `complement`, read as
    `map_to_tensor` reads images. One video, or 1 for all of them: a still map (a PIL image, (H, W)), a list of
    frame maps, or an array or tensor (F, H, W). A batch: a list whose entries are lists or arrays of 3 dimensions
    (one per video), or an array or tensor (B, F, H, W). Frames 1 stand for every frame."""
    if isinstance(map, (list, tuple)) and map and (isinstance(map[0], (list, tuple)) or np.ndim(map[0]) >= 3):
        videos = [video_map_to_tensor(video_map, complement) for video_map in map]
        if len({tuple(video_map.shape[-2:]) for video_map in videos}) > 1:
            sizes = ", ".join(f"{video_map.shape[-1]}x{video_map.shape[-2]}" for video_map in videos)
            raise ValueError(f"The videos' maps in the `map` list differ in size ({sizes}); give them all one size.")
        frames = max(video_map.shape[1] for video_map in videos)
        return torch.cat([video_map.expand(-1, frames, -1, -1) for video_map in videos])
    if isinstance(map, (np.ndarray, torch.Tensor)) and map.ndim == 4:
        (videos, frames), size = map.shape[:2], map.shape[2:]
        return map_to_tensor(map.reshape(videos * frames, *size), complement).view(videos, frames, *size)
    return map_to_tensor(map, complement)[:, 0][None]


def check_video_map(change: torch.Tensor, pixels: torch.Tensor):
    """The map's videos (1 or one per video) and frames (1 or one per frame) against the video's (B, 3, F, H, W)."""
    check_map_count(change, pixels)
    frames, frame_count = change.shape[1], pixels.shape[2]
    if frames not in (1, frame_count):
        raise ValueError(f"The map has {frames} frames but the video has {frame_count}: pass one map per frame, or "
                         "one still map for all of them.")


def map_on_frames(change: torch.Tensor, size: tuple, aspect_of: tuple) -> torch.Tensor:
    """The map (videos, frames, H, W) on the grid `size`, frame by frame (`map_on_grid`): (videos, frames, *size)."""
    return map_on_grid(change.reshape(-1, 1, *change.shape[-2:]), size, aspect_of).view(*change.shape[:2], *size)


def map_on_latent_frames(change: torch.Tensor, grid: tuple, frames_per_latent: int, aspect_of: tuple) -> torch.Tensor:
    """The map (videos, frames, H, W) on the latent grid (F', H', W'), as (videos, 1, F', H', W'): each frame
    area-averaged onto the latent cells (`map_on_grid`), then the frames of each latent frame averaged, as Wan's VAE
    groups them: frame 0 alone, then `frames_per_latent` at a time. A still map (1 frame) holds for every latent
    frame; a latent frame whose frames are all equal keeps their value exactly."""
    (videos, frames), (latent_frames, *size) = change.shape[:2], grid
    spatial = map_on_frames(change, tuple(size), aspect_of)
    if frames == 1:
        return spatial[:, None].expand(-1, 1, latent_frames, *size)
    groups = [spatial[:, max(0, frames_per_latent * (k - 1) + 1) : frames_per_latent * k + 1]
              for k in range(latent_frames)]
    # The mean of equal values can round off them; clamping it to the group's range keeps them.
    averaged = [group.mean(1).clamp(group.amin(1), group.amax(1)) for group in groups]
    return torch.stack(averaged, 1)[:, None]


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
