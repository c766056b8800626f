"""Crop to change: edit only the box around the pixels that a map releases, and paste the edit into the input.

    from tools.crop import edit_on_crop

    images, box = edit_on_crop(pipe, margin=32, prompt="a brick wall", image=photo, map=keep_map, keep_exact=True)

A small change then costs a small crop. The rule, and what equals what: docs/crop.md. Every pipeline class of this
project declares what the crop needs of it:

- `working_grid(**arguments)`: the image on the pixel grid that the pipeline edits, with any argument cut alike
  (a ControlNet's control image), in [0, 1] and the image first; the map on that grid in change polarity
  (1 = change fully); and the pixels per cell of the map's grid (the latent grid; 1 for IF, which denoises pixels).
  A video comes as (B, F, 3, H, W) with its map as (B, F, H, W), F 1 for a still map: the box then holds every
  pixel released in any frame;
- `crop_unit`: the multiple of pixels that its sizes must be;
- `native_size`: the side of its native resolution, in pixels, for `upscale`;
- `copies_adjacent`: whether it puts the `num_images_per_prompt` copies of an image next to each other
  (a, a, b, b) rather than repeating the whole batch (a, b, a, b);
- `pixel_range` (IF alone): the range of the image tensors that it takes and returns, where that is not [0, 1].

The released pixels come from the pipeline file's own `release_steps`, so the crop holds exactly the pixels that
the pipeline releases.
"""

import inspect
import numbers
import sys

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

# Arguments that carry whole-frame latents or a part of the schedule between calls: a crop cannot cut them.
WHOLE_FRAME = ("latents", "noise", "denoising_start", "denoising_end")


def edit_on_crop(pipe, margin: int = 32, upscale: bool = False, edit=None, **call):
    """Runs `pipe(**call)` on the smallest crop that holds every pixel the map releases, plus `margin` pixels of
    context, and pastes the result into the input. Returns `(images, box)`.

    `images` are of `call`'s `output_type` ("pil", "np" or "pt", pixels in [0, 1]), one per output of the call, in
    the pipeline's order. `box` is `(top, left, bottom, right)` in pixels of the working grid, or None when no pixel
    is released: then no step runs and every image is the input itself. Pixels outside the box are the input's own;
    inside, they are `edit` (default `pipe`) called with `call`, the cropped image and map, and `output_type="pt"`.
    `upscale` edits the crop at about the pipeline's native resolution and scales the result back down. `edit` runs
    several calls on one crop, such as SDXL's base then refiner (see SDXL/run.py): it takes `pipe`'s arguments and
    returns its output.
    """
    arguments = inspect.signature(pipe.__call__).bind_partial(**call)
    arguments.apply_defaults()
    arguments = {**arguments.arguments.pop("kwargs", {}), **arguments.arguments}
    check_crop_arguments(margin, arguments)
    inputs, change, cell = pipe.working_grid(**arguments)
    original = next(iter(inputs.values()))
    if original.shape[-3] != 3:
        raise ValueError("The crop cuts the image's pixels: pass `image` as pixels, not latents.")
    rule = pipeline_file(pipe)
    steps = len(arguments.get("timesteps") or arguments.get("sigmas") or []) or arguments["num_inference_steps"]
    latent_grid = tuple(side // cell for side in original.shape[-2:])
    # None is 1 with a map, in the classes whose call without a map is stock with a strength default other than 1.
    strength = 1.0 if arguments["strength"] is None else arguments["strength"]
    if original.ndim == 5:  # a video's frames share latent frames, as its VAE groups them
        per_latent = pipe.vae_scale_factor_temporal
        latent_grid = ((original.shape[1] - 1) // per_latent + 1, *latent_grid)
        on_grid = rule.map_on_latent_frames(change, latent_grid, per_latent, aspect_of=tuple(original.shape[-2:]))
    else:
        on_grid = rule.map_on_grid(change, latent_grid)
    release_step = rule.release_steps(strength * on_grid, steps)
    low, high = getattr(pipe, "pixel_range", (0, 1))
    edit = edit or pipe
    call = dict(call, output_type="pt", return_dict=True)

    def in_unit_range(output):
        images = output.images if hasattr(output, "images") else output[0]
        return ((images - low) / (high - low)).clamp(0, 1)

    box = change_box(release_step, steps, -(-margin // cell), max(1, pipe.crop_unit // cell))
    if box is None:  # under keep_exact a call that runs no step returns the input's own pixels
        return to_output_type(in_unit_range(edit(**dict(call, keep_exact=True))), arguments["output_type"]), None
    top, left, bottom, right = (side * cell for side in box)
    size = (bottom - top, right - left)
    edit_size = upscaled_size(*size, pipe.native_size, pipe.crop_unit) if upscale else size

    def cut(tensor, mode="bicubic"):
        if isinstance(tensor, (list, tuple)):  # several ControlNets' images
            return [cut(item, mode) for item in tensor]
        tensor = tensor[..., top:bottom, left:right]
        return tensor if edit_size == size else resized(tensor, edit_size, mode)

    def for_pipe(tensor):
        return [for_pipe(item) for item in tensor] if isinstance(tensor, list) else tensor * (high - low) + low

    call.update({name: for_pipe(cut(tensor)) for name, tensor in inputs.items()})
    call.update(map=cut(change, "bilinear"), invert_map=True, keep_exact=arguments["keep_exact"] and edit_size == size)
    if "height" in arguments:
        call.update(height=edit_size[0], width=edit_size[1])
    edited = in_unit_range(edit(**call))
    if edit_size != size:
        edited = resized(edited, size, "bicubic")
        if arguments["keep_exact"]:
            strengths = strength * change[..., top:bottom, left:right]
            strengths = strengths.unsqueeze(-3) if original.ndim == 5 else strengths  # a frame's map for its pixels
            edited = rule.composite_original(edited, original[..., top:bottom, left:right], strengths, steps)
    copies = edited.shape[0] // original.shape[0]
    tiles = (copies, *[1] * (original.ndim - 1))
    images = original.repeat_interleave(copies, 0) if pipe.copies_adjacent else original.repeat(tiles)
    images = images.to(edited.device, edited.dtype)  # a copy, to paste into
    images[..., top:bottom, left:right] = edited
    return to_output_type(images, arguments["output_type"]), (top, left, bottom, right)


def check_crop_arguments(margin, arguments: dict):
    if isinstance(margin, bool) or not isinstance(margin, numbers.Integral) or margin < 0:
        raise ValueError(f"`margin` must be a whole number of pixels, 0 or more, not {margin!r}.")
    given = [f"`{name}`" for name in WHOLE_FRAME if arguments.get(name) is not None]
    if given:
        raise ValueError(
            f"The crop runs the whole schedule on the crop's pixels, so it takes no {', '.join(given)}: these carry "
            "the whole frame's latents. To run several stages on one crop, pass a function that runs them all as "
            "`edit`, as SDXL/run.py does for base and refiner."
        )
    if arguments["output_type"] not in ("pil", "np", "pt"):
        raise ValueError(f'The crop is pasted into the input\'s pixels: pass an `output_type` of "pil", "np" or "pt", '
                         f"not {arguments['output_type']!r}.")


def pipeline_file(pipe):
    """The module of the pipeline file that `pipe`'s class, or the class it extends, comes from: its release rule
    and map parsing are the ones the pipeline runs."""
    for cls in type(pipe).__mro__:
        module = sys.modules.get(cls.__module__)
        if hasattr(module, "release_steps") and hasattr(module, "map_on_grid"):
            return module
    raise TypeError(f"{type(pipe).__name__} is not a pipeline of this project: it has no release rule to crop by.")


def change_box(release_step: torch.Tensor, num_inference_steps: int, margin: int, unit: int):
    """The crop that holds every pixel released in any item, as (top, left, bottom, right) in grid cells.

    The bounding box of the released pixels grows by `margin` cells on each side, then evenly to whole `unit`s of
    cells, and moves inside the grid where it would leave it; a side that reaches the grid's takes the grid's
    (which the pipeline accepts as it is). None when no pixel is released.
    """
    released = (release_step < num_inference_steps).reshape(-1, *release_step.shape[-2:]).any(0)
    if not released.any():
        return None
    box = []
    for lines, size in ((released.any(1), released.shape[0]), (released.any(0), released.shape[1])):
        indices = lines.nonzero()[:, 0]
        start, stop = max(0, int(indices[0]) - margin), min(size, int(indices[-1]) + 1 + margin)
        length = min(size, -(-(stop - start) // unit) * unit)
        start = min(max(0, start - (length - (stop - start)) // 2), size - length)
        box.append((start, start + length))
    (top, bottom), (left, right) = box
    return top, left, bottom, right


def upscaled_size(height: int, width: int, native_size: int, unit: int) -> tuple:
    """The size a crop is edited at by `upscale`: its aspect ratio, about `native_size`**2 pixels in area, in whole
    `unit`s of pixels, and never smaller than the crop. A crop of at least the native area keeps its size."""
    factor = native_size / (height * width) ** 0.5
    if factor <= 1:
        return height, width
    return tuple(max(-(-side // unit) * unit, round(side * factor / unit) * unit) for side in (height, width))


def resized(tensor: torch.Tensor, size: tuple, mode: str) -> torch.Tensor:
    """`tensor` (..., C, H, W) in [0, 1] resized to `size` (antialiased), every axis before C kept."""
    flat = tensor.reshape(-1, *tensor.shape[-3:])
    return F.interpolate(flat, size, mode=mode, antialias=True).clamp(0, 1).view(*tensor.shape[:-2], *size)


def to_output_type(images: torch.Tensor, output_type: str):
    """Pixels in [0, 1], (B, 3, H, W) or videos (B, F, 3, H, W), as stock's image or video processor hands them
    out: "np" (B, [F,] H, W, 3), "pil" a list of images, or of lists of frames."""
    if output_type == "pt":
        return images
    images = images.movedim(-3, -1).float().cpu().numpy()
    if output_type == "np":
        return images

    def to_pil(pixels):
        return PIL.Image.fromarray((pixels * 255).round().astype(np.uint8))
    return [[to_pil(frame) for frame in item] if item.ndim == 4 else to_pil(item) for item in images]
