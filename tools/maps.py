"""Map makers for Differential Diffusion.

A map is a float32 array of shape (height, width) with values in [0, 1]. Every maker here returns a **keep map**,
the project's default convention:

- 1 (white) = keep the input pixel (strength 0);
- 0 (black) = change the pixel fully (strength 1);
- a pixel's strength is `1 - map`.

Pipelines read the opposite convention (white = change, as ComfyUI, A1111 soft inpainting and most inpainting masks
do) only with `invert_map=True` / `--invert-map`.

Command line (one maker per call, the result is written as a grayscale PNG), from the repository root with
`python -m tools.maps ...`, or from anywhere with `python path/to/tools/maps.py ...`:

    python -m tools.maps gradient --like assets/input.jpg --angle 0 --output gradient.png
    python -m tools.maps radial --width 512 --height 512 --outer-radius 200 --output radial.png
    python -m tools.maps fan --like assets/input.jpg --sectors 8 --output fan.png
    python -m tools.maps feather --mask mask.png --feather-px 32 --grow-px 4 --output soft.png
    python -m tools.maps regions --labels labels.png --strength 0=1.0 --strength 1=0.3 --output regions.png
    python -m tools.maps depth --image photo.jpg --near keep --output depth.png --bits 16

Two makers draw a map per frame for `Wan/run.py --map FOLDER`, into a new folder of frame_0000.png, frame_0001.png...:

    python -m tools.maps fade --map assets/map_regions.png --frames 81 --fade 20:60 --output fade/
    python -m tools.maps mask-video --mask mask.mp4 --feather-px 32 --output soft/
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # started as a script path (python tools/maps.py): make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import cli, loading, results  # noqa: E402
from tools.feather import feathered_mask  # noqa: E402  (one of the makers, in a module of its own)

DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"

# Depth models whose raw output grows with distance (metric depth). The others listed output relative inverse
# depth (disparity), which grows towards the camera.
_METRIC_DEPTH_MODEL_TYPES = {"glpn", "zoedepth", "depth_pro", "prompt_depth_anything"}
_DISPARITY_MODEL_TYPES = {"dpt", "depth_anything"}


# ----------------------------------------------------------------------------------------------------------------------
# Validation at the boundary
# ----------------------------------------------------------------------------------------------------------------------


def _check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer number of pixels, got {value!r}.")


def _check_unit(name: str, value: float) -> None:
    if not _is_real(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}.")


def _check_non_negative(name: str, value: float) -> None:
    if not _is_real(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0 (pixels), got {value!r}.")


def _is_real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.number)) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------------------------------
# Geometric makers
# ----------------------------------------------------------------------------------------------------------------------


def linear_gradient(
    width: int, height: int, angle_degrees: float = 0.0, start: float = 0.0, end: float = 1.0
) -> np.ndarray:
    """A linear ramp across the image, as a keep map (1 = keep, 0 = change fully).

    Args:
        width (`int`), height (`int`): size of the map in pixels, both > 0.
        angle_degrees (`float`, defaults to 0): direction in which the ramp runs from `start` to `end`, counterclockwise
            as seen on screen: 0 runs left to right, 90 bottom to top, 180 right to left, 270 top to bottom.
        start (`float` in [0, 1], defaults to 0): keep value at the side the ramp starts from.
        end (`float` in [0, 1], defaults to 1): keep value at the side the ramp runs to.

    Returns:
        `np.ndarray` of shape (height, width), float32, values in [0, 1]. With the defaults the left column is 0
        (change fully) and the right column is 1 (keep). The ramp spans the whole image: the pixel centres that lie
        furthest back along the direction get `start` exactly, the furthest ahead get `end` exactly. A map that is
        one pixel long in that direction takes the midpoint.
    """
    _check_size(width, height)
    _check_unit("start", start)
    _check_unit("end", end)
    if not _is_real(angle_degrees):
        raise ValueError(f"`angle_degrees` must be a finite number, got {angle_degrees!r}.")

    theta = math.radians(angle_degrees)
    # Image rows grow downwards, so "counterclockwise on screen" flips the sign of y.
    direction_x, direction_y = _snap_to_zero(math.cos(theta)), _snap_to_zero(-math.sin(theta))
    x = np.arange(width, dtype=np.float64)[None, :]
    y = np.arange(height, dtype=np.float64)[:, None]
    projection = x * direction_x + y * direction_y

    low, high = projection.min(), projection.max()
    if high > low:
        position = np.clip((projection - low) / (high - low), 0.0, 1.0)
    else:
        position = np.full((height, width), 0.5)
    keep_map = start + (end - start) * position
    return keep_map.astype(np.float32)


def _snap_to_zero(value: float) -> float:
    # cos(90°) is 6e-17, not 0; without this a vertical ramp would vary, very slightly, along each row.
    return 0.0 if abs(value) < 1e-12 else value


def radial(
    width: int,
    height: int,
    center: tuple[float, float] | None = None,
    inner_radius: float = 0.0,
    outer_radius: float | None = None,
    inside: float = 0.0,
    outside: float = 1.0,
) -> np.ndarray:
    """A keep map (1 = keep, 0 = change fully) that depends only on the distance from a centre.

    Args:
        width (`int`), height (`int`): size of the map in pixels, both > 0.
        center (`tuple[float, float]`, *optional*): `(x, y)` of the centre in pixel coordinates, where pixel `(0, 0)`
            is the centre of the top-left pixel. Defaults to the image centre `((width - 1) / 2, (height - 1) / 2)`,
            which makes the map symmetric under left-right and top-bottom flips.
        inner_radius (`float` >= 0, defaults to 0): pixels at this distance or closer get `inside`.
        outer_radius (`float` >= `inner_radius`, *optional*): pixels at this distance or further get `outside`.
            Defaults to half the shorter side. Between the two radii the value changes linearly with distance;
            equal radii give a hard edge.
        inside (`float` in [0, 1], defaults to 0): keep value near the centre; the default changes the centre fully.
        outside (`float` in [0, 1], defaults to 1): keep value far from the centre; the default keeps it.

    Returns:
        `np.ndarray` of shape (height, width), float32, values in [0, 1].
    """
    _check_size(width, height)
    _check_unit("inside", inside)
    _check_unit("outside", outside)
    _check_non_negative("inner_radius", inner_radius)
    if outer_radius is None:
        outer_radius = max(min(width, height) / 2, inner_radius)
    _check_non_negative("outer_radius", outer_radius)
    if outer_radius < inner_radius:
        raise ValueError(f"`outer_radius` ({outer_radius}) must be >= `inner_radius` ({inner_radius}).")
    if center is None:
        center = ((width - 1) / 2, (height - 1) / 2)
    if len(center) != 2 or not all(_is_real(c) for c in center):
        raise ValueError(f"`center` must be a pair of finite numbers (x, y), got {center!r}.")

    x = np.arange(width, dtype=np.float64)[None, :] - center[0]
    y = np.arange(height, dtype=np.float64)[:, None] - center[1]
    distance = np.hypot(x, y)
    if outer_radius > inner_radius:
        position = np.clip((distance - inner_radius) / (outer_radius - inner_radius), 0.0, 1.0)
    else:
        position = (distance > inner_radius).astype(np.float64)
    keep_map = inside + (outside - inside) * position
    return keep_map.astype(np.float32)


# The Strength Fan: strength by angle around the centre, in equal sectors, one strength each.
MAX_FAN_SECTORS = 100  # labels of two decimals tell at most 101 strengths apart


def fan_strengths(sectors: int) -> list[float]:
    """The strength of each sector of `strength_fan`, from 0 (sector 0) to 1 (the last sector).

    Sector k gets `k / (sectors - 1)` rounded to two decimals, so a label printed as `f"{s:.2f}"` states the
    sector's strength exactly: 8 sectors give 0, 0.14, 0.29, 0.43, 0.57, 0.71, 0.86, 1.

    Args:
        sectors (`int`, 2 to 100): the number of sectors.

    Returns:
        `list[float]` of length `sectors`, strictly increasing.
    """
    if isinstance(sectors, bool) or not isinstance(sectors, (int, np.integer)) or not 2 <= sectors <= MAX_FAN_SECTORS:
        raise ValueError(f"`sectors` must be a whole number from 2 to {MAX_FAN_SECTORS}, got {sectors!r}.")
    return [round(k / (sectors - 1), 2) for k in range(sectors)]


def fan_sector_bounds(sectors: int) -> list[tuple[float, float]]:
    """`(start, end)` of each sector of `strength_fan`, in degrees clockwise from 12 o'clock; end is excluded."""
    fan_strengths(sectors)  # validates `sectors`
    width = 360.0 / sectors
    return [(k * width, (k + 1) * width) for k in range(sectors)]


def strength_fan(width: int, height: int, sectors: int = 8) -> np.ndarray:
    """The Strength Fan: a keep map (1 = keep, 0 = change fully) whose strength grows with the angle around the centre.

    The image is cut into `sectors` equal angular sectors around its centre `((width - 1) / 2, (height - 1) / 2)`.
    Sector k spans the angles `[k * 360 / sectors, (k + 1) * 360 / sectors)` degrees, measured clockwise as seen on
    screen from 12 o'clock (straight up), and every pixel in it has strength `fan_strengths(sectors)[k]`: sector 0,
    to the right of 12 o'clock, is kept (strength 0); the last sector, to its left, changes fully (strength 1).
    A pixel belongs to the sector that holds the direction from the centre to its centre; the centre pixel of an
    odd-sized map belongs to sector 0. One edit with this map shows every strength at once.

    Args:
        width (`int`), height (`int`): size of the map in pixels, both > 0.
        sectors (`int`, 2 to 100, defaults to 8): the number of sectors.

    Returns:
        `np.ndarray` of shape (height, width), float32: each pixel is `1 - fan_strengths(sectors)[k]` for its sector k.
    """
    _check_size(width, height)
    strengths = np.array(fan_strengths(sectors), dtype=np.float64)
    x = np.arange(width, dtype=np.float64)[None, :] - (width - 1) / 2
    y = np.arange(height, dtype=np.float64)[:, None] - (height - 1) / 2
    # atan2(x, -y) is the clockwise angle from straight up, since image rows grow downwards.
    clockwise_degrees = np.degrees(np.arctan2(x, -y)) % 360.0
    sector = np.minimum((clockwise_degrees * sectors / 360.0).astype(np.int64), sectors - 1)
    return (1.0 - strengths[sector]).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------------------------------------------------


def region_map(labels, strengths: Mapping[int, float]) -> np.ndarray:
    """A keep map from a label image and one strength per label.

    Args:
        labels (`np.ndarray` of integers or bools, shape (height, width), or a single-channel `PIL.Image.Image` such as
            mode `L`, `P` or `I;16`): which region each pixel belongs to. For mode `P` the labels are palette indices.
        strengths (`Mapping[int, float]`): label → **strength** in [0, 1] (0 = keep, 1 = change fully). Note that
            this is the strength, not the keep value. Labels in the mapping but absent from the image are ignored.

    Returns:
        `np.ndarray` of shape (height, width), float32: each pixel is `1 - strengths[label]` (1 = keep).

    Raises:
        `ValueError`: if a label in the image has no strength, or a strength lies outside [0, 1].
    """
    labels = _label_array(labels)
    for label, strength in strengths.items():
        _check_unit(f"strengths[{label!r}]", strength)

    present, pixel_index = np.unique(labels, return_inverse=True)
    missing = [int(label) for label in present if int(label) not in strengths]
    if missing:
        raise ValueError(
            f"Labels {missing} appear in the label image but have no strength; "
            f"`strengths` covers {sorted(strengths)}. Add a strength for every label."
        )
    keep_per_label = np.array([1.0 - strengths[int(label)] for label in present], dtype=np.float64)
    return keep_per_label[pixel_index].reshape(labels.shape).astype(np.float32)


def _label_array(labels) -> np.ndarray:
    if isinstance(labels, Image.Image):
        if len(labels.getbands()) != 1:
            raise ValueError(f"`labels` must be a single-channel image (L, P, I, I;16), got mode {labels.mode}.")
        labels = np.asarray(labels)
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size == 0:
        raise ValueError(f"`labels` must be a non-empty 2-D array (height, width), got shape {labels.shape}.")
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"`labels` must hold integers, got dtype {labels.dtype}.")
    return labels


# ----------------------------------------------------------------------------------------------------------------------
# Depth
# ----------------------------------------------------------------------------------------------------------------------


def depth_map(
    image,
    model=DEFAULT_DEPTH_MODEL,
    near: str = "keep",
    prediction: str = "auto",
    device: str | int | None = None,
) -> np.ndarray:
    """A keep map from a monocular depth estimate: keep the near pixels and change the far ones, or the reverse.

    Runs a transformers `depth-estimation` pipeline, resizes its raw prediction to the image's size (bicubic), and
    rescales it linearly so that the nearest pixel gets 1 and the farthest 0 ("nearness").

    Args:
        image (`PIL.Image.Image` or `np.ndarray` of shape (height, width, 3), uint8): the photo.
        model (`str`, `os.PathLike` or a transformers depth-estimation `Pipeline`, defaults to
            `"depth-anything/Depth-Anything-V2-Small-hf"`): a Hub id, a local folder holding the model and its image
            processor, or a pipeline already built (saves reloading it for many images).
        near (`"keep"` or `"change"`, defaults to `"keep"`): `"keep"` returns the nearness itself (near = 1 = keep,
            far = 0 = change fully); `"change"` returns `1 - nearness` (near pixels change fully).
        prediction (`"auto"`, `"disparity"` or `"depth"`, defaults to `"auto"`): what the model outputs. Disparity
            (relative inverse depth: Depth Anything relative, DPT/MiDaS) grows towards the camera; metric depth
            (ZoeDepth, Depth Pro, GLPN, Depth Anything metric) grows away from it. `"auto"` reads it from the model's
            config and raises for model types it does not know.
        device (`str` or `int`, *optional*): passed to `transformers.pipeline`, e.g. `"cuda"`. Defaults to the CPU.

    Returns:
        `np.ndarray` of shape (height, width), float32, values in [0, 1] (1 = keep). A prediction with no variation
        carries no depth information; it gives a uniform 0.5 with a warning.
    """
    if near not in ("keep", "change"):
        raise ValueError(f'`near` must be "keep" or "change", got {near!r}.')
    if prediction not in ("auto", "disparity", "depth"):
        raise ValueError(f'`prediction` must be "auto", "disparity" or "depth", got {prediction!r}.')
    image = _rgb_image(image)
    estimator = depth_estimator(model, device)
    if prediction == "auto":
        prediction = _prediction_kind(estimator.model.config)

    raw = estimator(image)["predicted_depth"].detach().float().cpu().numpy().squeeze()
    nearness = _normalise(raw if prediction == "disparity" else -raw)
    keep_map = nearness if near == "keep" else np.float32(1.0) - nearness
    return keep_map.astype(np.float32)


def _rgb_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"`image` must be a PIL image or a uint8 array (height, width, 3), got {array.dtype} {array.shape}."
        )
    return Image.fromarray(array)


def depth_estimator(model=DEFAULT_DEPTH_MODEL, device: str | int | None = None):
    """A transformers depth-estimation pipeline for `model` (a Hub id or folder), or `model` itself if it is one
    already; an `OSError` that names the model if it cannot be loaded."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    from transformers import pipeline  # imported here: only depth maps need transformers

    try:
        return pipeline("depth-estimation", model=str(model), device=device)
    except (OSError, ValueError) as error:  # ValueError: a folder of another kind of model
        fix = "Give a folder that holds a depth-estimation model and its image processor." if Path(model).is_dir() \
            else "Download it once with network access, or pass the path of a local folder that holds the model and " \
            "its image processor."
        raise OSError(f"Cannot load the depth model {str(model)!r}: {str(error).replace('`', '')}\n{fix}") from error


def _prediction_kind(config) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type == "depth_anything" and getattr(config, "depth_estimation_type", "relative") == "metric":
        return "depth"
    if model_type in _METRIC_DEPTH_MODEL_TYPES:
        return "depth"
    if model_type in _DISPARITY_MODEL_TYPES:
        return "disparity"
    raise ValueError(
        f'Cannot tell whether a "{model_type}" model outputs depth or disparity; pass prediction="depth" '
        f'(larger = farther) or prediction="disparity" (larger = nearer).'
    )


def _normalise(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    low, high = values.min(), values.max()
    if not high > low:
        warnings.warn("The depth prediction is constant; returning a uniform map of 0.5.", stacklevel=3)
        return np.full(values.shape, 0.5, dtype=np.float32)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------------


def save_map(array, path: str | os.PathLike, bits: int = 8, overwrite: bool = False) -> Path:
    """Write a map as a grayscale PNG, value for value (no change of convention), atomically.

    Args:
        array (`np.ndarray` or `torch.Tensor` of shape (height, width), values in [0, 1]): the map.
        path (`str` or `os.PathLike`): where to write; must end in `.png`.
        bits (`int`, 8 or 16, defaults to 8): 8 writes mode `L` (values rounded to multiples of 1/255),
            16 writes mode `I;16` (multiples of 1/65535).
        overwrite (`bool`, defaults to `False`): replace an existing file. Without it an existing file is left alone.

    Returns:
        `pathlib.Path`: the path written.

    Raises:
        `FileExistsError`: if `path` exists and `overwrite` is `False`.
        `ValueError`: for a map that is not 2-D, has NaNs or values outside [0, 1], or an unsupported `bits`.
    """
    if bits not in (8, 16):
        raise ValueError(f"`bits` must be 8 or 16, got {bits!r}.")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"Maps are saved as PNG; `path` must end in .png, got {str(path)!r}.")
    image = _map_image(array, bits)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it.")
    return results.write_png(image, path, overwrite=overwrite)


def _map_image(array, bits: int) -> Image.Image:
    if hasattr(array, "detach"):  # a torch tensor; torch itself is not needed to save numpy maps
        array = array.detach().float().cpu().numpy()
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"A map must be a non-empty 2-D array (height, width), got shape {array.shape}.")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError("A map must have finite values in [0, 1].")
    scale, dtype = (255, np.uint8) if bits == 8 else (65535, np.uint16)
    return Image.fromarray(np.rint(array * scale).astype(dtype))


# ----------------------------------------------------------------------------------------------------------------------
# Video: a map per frame, for Wan/run.py --map FOLDER
# ----------------------------------------------------------------------------------------------------------------------


def fade_maps(keep_map, frames: int, fade: tuple[int, int]) -> np.ndarray:
    """A still keep map faded in over a range of frames: every pixel's strength grows linearly from 0 to its own.

    With `(first, last) = fade`, frame k (counted from 0) gets the weight

        w(k) = 0                                  if k <= first   (every pixel kept: the map is 1)
        w(k) = (k - first) / (last - first)       if first < k < last
        w(k) = 1                                  if k >= last    (the still map itself)

    and the keep map `1 - w(k) * (1 - keep_map)`: the strength `1 - map` of each pixel is `w(k)` times its strength
    in the still map. "Linearly" is in strength, and in the frame number: halfway through the range, at
    `k = (first + last) / 2`, every pixel has half its strength. `first == last` is a cut: the still map from that
    frame on. Wan's VAE averages the maps of the frames that share a latent frame (frame 0 alone, then groups of 4),
    so the model sees the fade in steps of 4 frames.

    Args:
        keep_map (`np.ndarray` of shape (height, width), values in [0, 1], 1 = keep): the still map to fade in.
        frames (`int` >= 1): the number of frames, as many as the video `Wan/run.py --frames` edits.
        fade (`tuple[int, int]`): `(first, last)` frame of the fade, with `0 <= first <= last <= frames - 1`.

    Returns:
        `np.ndarray` of shape (frames, height, width), float32, values in [0, 1]: the keep map of each frame.
    """
    keep_map = np.asarray(keep_map, dtype=np.float64)
    if keep_map.ndim != 2 or keep_map.size == 0 or not np.isfinite(keep_map).all() or not (
            0 <= keep_map.min() and keep_map.max() <= 1):
        raise ValueError(f"`keep_map` must be a non-empty 2-D array with values in [0, 1], got shape {keep_map.shape}.")
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
        raise ValueError(f"`frames` must be a whole number >= 1, got {frames!r}.")
    first, last = fade
    if not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in fade) or not 0 <= first <= last:
        raise ValueError(f"`fade` must be two frame numbers FIRST:LAST with 0 <= FIRST <= LAST, got {fade!r}.")
    if last > frames - 1:
        raise ValueError(f"`fade` {first}:{last} ends past the last frame: {frames} frames are frames 0 to "
                         f"{frames - 1}.")
    k = np.arange(frames, dtype=np.float64)
    weight = (k >= last).astype(np.float64) if last == first else np.clip((k - first) / (last - first), 0.0, 1.0)
    return (1.0 - weight[:, None, None] * (1.0 - keep_map)).astype(np.float32)


def mask_video_maps(masks, feather_px: float, grow_px: float = 0.0) -> np.ndarray:
    """Soft inpainting frame by frame: frame k's keep map is `feathered_mask(masks[k], feather_px, grow_px)`.

    Each frame is feathered on its own, at the mask's own size (so `feather_px` and `grow_px` count the mask's
    pixels), exactly as the still `feather` maker feathers one mask.

    Args:
        masks (a sequence of `PIL.Image.Image` or `np.ndarray` (height, width), all of one size): the region to fill
            in each frame, white = fill, thresholded as `feathered_mask` does (uint8 at 128, so a lossy video's
            near-white and near-black read as they were painted).
        feather_px (`float` >= 0), grow_px (`float` >= 0, defaults to 0): as for `feathered_mask`.

    Returns:
        `np.ndarray` of shape (frames, height, width), float32, values in [0, 1] (1 = keep).
    """
    masks = list(masks)
    if not masks:
        raise ValueError("`masks` must hold at least one frame.")
    keep_maps = [feathered_mask(mask, feather_px=feather_px, grow_px=grow_px) for mask in masks]
    for index, keep_map in enumerate(keep_maps):
        if keep_map.shape != keep_maps[0].shape:
            raise ValueError(f"`masks` frame {index} is {keep_map.shape[1]}x{keep_map.shape[0]} pixels, frame 0 is "
                             f"{keep_maps[0].shape[1]}x{keep_maps[0].shape[0]}; give frames of one size.")
    return np.stack(keep_maps)


def save_map_frames(maps, folder: str | os.PathLike, bits: int = 8) -> Path:
    """Write one keep map per frame as `folder/frame_0000.png`, `frame_0001.png`, ..., the folder `Wan/run.py --map`
    reads (sorted by name, one map per frame).

    The frames are written into a hidden sibling folder, which is renamed to `folder` once every frame is there, so
    an interrupted run leaves no `folder` that would read as a complete, shorter video of maps.

    Args:
        maps (`np.ndarray` of shape (frames, height, width), or a sequence of 2-D maps, values in [0, 1]): the maps.
        folder (`str` or `os.PathLike`): a new folder, or an empty one, in an existing folder. Never overwritten.
        bits (`int`, 8 or 16, defaults to 8): as for `save_map`.

    Returns:
        `pathlib.Path`: the folder written.

    Raises:
        `FileExistsError`: if `folder` exists and is a file or a folder that is not empty.
    """
    folder = Path(folder)
    if len(maps) == 0:
        raise ValueError("`maps` must hold at least one frame.")
    _check_free_folder(folder)
    digits = max(4, len(str(len(maps) - 1)))  # names sort as numbers do
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        for index, keep_map in enumerate(maps):
            save_map(keep_map, partial / f"frame_{index:0{digits}d}.png", bits=bits)
        _check_free_folder(folder)  # taken while the frames were written: keep it
        if folder.is_dir():
            folder.rmdir()  # empty: a folder renames only onto nothing
        partial.rename(folder)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return folder


def _check_free_folder(folder: Path) -> None:
    if folder.is_dir() and any(folder.iterdir()) or folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not an empty folder; map frames are written only into a new "
                              "or empty folder, never over other files.")


def read_video_frames(path: Path, flag: str, count: int | None = None) -> list[Image.Image]:
    """The first `count` frames (all without it) of a video or a folder of images, gray, as `Wan/run.py` reads
    `--map`; a one-line `cli.CliError` where it cannot."""
    from Wan.run import MAX_FRAMES, read_frames  # Wan/run.py's reader itself; it loads torch, which maps rarely need

    try:
        frames, _ = read_frames(Path(path), flag, MAX_FRAMES if count is None else count, gray=True)
    except cli.CliError as error:  # ffmpeg's reader appends its whole log to the reason: keep the reason
        raise cli.CliError(str(error).split(" === stderr ===")[0], error.exit_code) from None
    if count is not None and len(frames) < count:
        raise cli.CliError(f"{flag} {cli.display(path)} has {len(frames)} frames, fewer than --frames {count}")
    return frames


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------

MAX_SIDE = 8192  # the largest side any model here works at; a map of 8192 x 8192 takes about 2 GB to draw


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m tools.maps",
        description="Draw a keep map (1 = white = keep, 0 = black = change fully) and save it as a grayscale PNG; fade "
        "and mask-video draw one per frame, into a new folder.",
        epilog="Exit status: 0 done, 1 the run failed, 2 bad arguments or input files. "
        "'python -m tools.maps MAKER --help' lists a maker's flags.",
    )
    makers = parser.add_subparsers(dest="maker", required=True, metavar="MAKER")
    unit, side = cli.real_number(0, 1), cli.whole_number(1, MAX_SIDE)
    pixels, anywhere = cli.real_number(0, cli.MAX_FEATHER_PX), cli.real_number(-math.inf)

    def maker(name, help, *, sized=True):
        add = makers.add_parser(name, help=help, description=help).add_argument
        if sized:
            add("--width", type=side, help=f"map width in pixels, 1 to {MAX_SIDE} (or --like)")
            add("--height", type=side, help=f"map height in pixels, 1 to {MAX_SIDE} (or --like)")
            add("--like", type=Path, metavar="IMAGE", help="take width and height from this image")
        return add

    add = maker("gradient", "linear ramp at any angle")
    add("--angle", type=anywhere, default=0.0, help="direction in degrees, counterclockwise; 0 runs left to right, "
        "90 bottom to top (default: 0)")
    add("--start", type=unit, default=0.0, help="keep value where the ramp starts, 0 to 1 (default: 0)")
    add("--end", type=unit, default=1.0, help="keep value where the ramp ends, 0 to 1 (default: 1)")
    add = maker("radial", "function of the distance from a centre")
    add("--center", type=anywhere, nargs=2, metavar=("X", "Y"), help="centre in pixels (default: the image centre)")
    add("--inner-radius", type=pixels, default=0.0, help="pixels this close get --inside (default: 0)")
    add("--outer-radius", type=pixels, help="pixels this far get --outside (default: half the shorter side)")
    add("--inside", type=unit, default=0.0, help="keep value at the centre, 0 to 1 (default: 0)")
    add("--outside", type=unit, default=1.0, help="keep value far away, 0 to 1 (default: 1)")
    add = maker("fan", "Strength Fan: strength 0 to 1 by angle around the centre")
    add("--sectors", type=cli.whole_number(2, MAX_FAN_SECTORS), default=8, help=f"number of sectors, 2 to "
        f"{MAX_FAN_SECTORS} (default: 8)")
    add = maker("feather", "soft inpainting map from a mask (white = fill)", sized=False)
    add("--mask", type=Path, required=True, help="inpainting mask, white (half its range and up) = region to fill")
    add("--feather-px", type=pixels, required=True, help="width of the soft band around the region, in pixels")
    add("--grow-px", type=pixels, default=0.0, help="grow the region first, in pixels (default: 0)")
    add = maker("regions", "one strength per label of a label image", sized=False)
    add("--labels", type=Path, required=True, help="single-channel label image (L, P or I;16)")
    add("--strength", type=_label_strength, action="append", required=True, metavar="LABEL=S",
        help="strength of a label, 0 = keep, 1 = change fully; repeat for every label")
    add = maker("depth", "keep or change by estimated depth", sized=False)
    add("--image", type=Path, required=True, help="the photo")
    add("--model", default=DEFAULT_DEPTH_MODEL, help=f"Hub id or local folder (default: {DEFAULT_DEPTH_MODEL})")
    add("--near", choices=("keep", "change"), default="keep", help="what near pixels do (default: keep)")
    add("--prediction", choices=("auto", "disparity", "depth"), default="auto", help="what the model outputs: "
        "disparity grows towards the camera, depth away from it; auto reads the model's config (default: auto)")
    for subparser in makers.choices.values():
        add = subparser.add_argument
        add("--output", type=Path, required=True, metavar="PATH.png", help="PNG to write; never one of the inputs")
        add("--bits", type=int, choices=(8, 16), default=8, help="bits per pixel of the PNG: 8 (255 levels) or 16 "
            "(65535 levels) (default: 8)")
        add("--overwrite", action="store_true", help="replace an existing --output (default: off, refuse)")

    frames = cli.whole_number(1, MAX_VIDEO_FRAMES)
    add = maker("fade", "a still map faded in over a range of frames: one map per frame", sized=False)
    add("--map", type=Path, required=True, metavar="IMAGE", help="the still keep map to fade in (white = keep)")
    add("--frames", type=frames, required=True, metavar="N", help="number of frames, as Wan/run.py --frames")
    add("--fade", type=_frame_range, required=True, metavar="FIRST:LAST", help="frames (from 0) over which every "
        "pixel's strength grows linearly from 0 to the map's: kept up to FIRST, the map itself from LAST on")
    add = maker("mask-video", "soft inpainting per frame: a mask video feathered frame by frame", sized=False)
    add("--mask", type=Path, required=True, metavar="VIDEO", help="mask video (.mp4, .gif, ...) or a folder of mask "
        "images sorted by name; white (half its range and up) = region to fill")
    add("--feather-px", type=pixels, required=True, help="width of the soft band around the region, in pixels")
    add("--grow-px", type=pixels, default=0.0, help="grow the region first, in pixels (default: 0)")
    add("--frames", type=frames, metavar="N", help="use the first N frames (default: every frame)")
    for name in VIDEO_MAKERS:
        add = makers.choices[name].add_argument
        add("--output", type=Path, required=True, metavar="FOLDER", help="new (or empty) folder to write "
            "frame_0000.png, frame_0001.png, ... into, for Wan/run.py --map FOLDER; never overwritten")
        add("--bits", type=int, choices=(8, 16), default=8, help="bits per pixel of each PNG: 8 (255 levels) or 16 "
            "(65535 levels) (default: 8)")
    return parser


VIDEO_MAKERS = ("fade", "mask-video")  # a folder of maps, one per frame
MAX_VIDEO_FRAMES = 100_000  # only guards against typos


def _frame_range(text: str) -> tuple[int, int]:
    first, _, last = text.partition(":")
    if first.strip().isdigit() and last.strip().isdigit() and int(first) <= int(last):
        return int(first), int(last)
    raise argparse.ArgumentTypeError(f"must be FIRST:LAST, two frame numbers from 0 with FIRST <= LAST, such as 8:40, "
                                     f"got {text!r}")


def _label_strength(text: str) -> tuple[int, float]:
    label, _, strength = text.partition("=")
    try:
        return int(label), cli.real_number(0, 1)(strength)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"must be LABEL=STRENGTH with a strength from 0 to 1, such as 2=0.5, got "
                                         f"{text!r}") from None


def _read(path: Path, flag: str) -> Image.Image:
    with warnings.catch_warnings():  # Pillow warns of any image past 89M pixels; such an image is refused just below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = cli.read_image(path, flag)
    if max(image.size) > MAX_SIDE:
        raise cli.CliError(f"{flag} {cli.display(path)}: is {image.width}x{image.height} pixels, more than {MAX_SIDE} "
                           "on a side; scale it down first")
    return image


def _make(args) -> np.ndarray:
    if args.maker in ("gradient", "radial", "fan"):
        if (args.like is None) == (args.width is None or args.height is None):
            raise cli.CliError("give either --like IMAGE or both --width and --height")
        size = _read(args.like, "--like").size if args.like else (args.width, args.height)
    if args.maker == "gradient":
        return linear_gradient(*size, angle_degrees=args.angle, start=args.start, end=args.end)
    if args.maker == "radial":
        return radial(*size, center=args.center, inner_radius=args.inner_radius, outer_radius=args.outer_radius,
                      inside=args.inside, outside=args.outside)
    if args.maker == "fan":
        return strength_fan(*size, sectors=args.sectors)
    if args.maker == "feather":
        return feathered_mask(_read(args.mask, "--mask"), feather_px=args.feather_px, grow_px=args.grow_px)
    if args.maker == "regions":
        return region_map(_read(args.labels, "--labels"), dict(args.strength))
    if pipeline := loading.pipeline_folder(args.model):
        raise cli.CliError(f"--model {args.model}: {pipeline}; here --model takes a transformers depth-estimation "
                           f"model, such as {DEFAULT_DEPTH_MODEL}")
    try:
        return depth_map(_read(args.image, "--image"), model=args.model, near=args.near, prediction=args.prediction)
    except OSError as error:
        raise cli.CliError(str(error), cli.EXIT_RUN_FAILED) from None


def _make_frames(args) -> np.ndarray:
    if args.maker == "fade":
        keep_map = cli.map_values(_read_map(args.map), f"--map {cli.display(args.map)}")
        return fade_maps(keep_map, args.frames, args.fade)
    masks = read_video_frames(args.mask, "--mask", args.frames)
    if max(masks[0].size) > MAX_SIDE:
        raise cli.CliError(f"--mask {cli.display(args.mask)}: its frames are {masks[0].width}x{masks[0].height} "
                           f"pixels, more than {MAX_SIDE} on a side; scale it down first")
    return mask_video_maps(masks, feather_px=args.feather_px, grow_px=args.grow_px)


def _read_map(path: Path) -> Image.Image:
    _read(path, "--map")  # the size limit, with its one line
    return cli.load_map(path, "--map")


def run_video(args) -> None:
    """A video maker's command line: checks the folder, draws a map per frame and writes the folder."""
    output = args.output
    if not output.parent.is_dir():
        raise cli.CliError(f"--output {cli.display(output)}: its parent folder does not exist; create it first")
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise cli.CliError(f"--output {cli.display(output)}: exists and is not an empty folder; give a new folder "
                           "(map frames never overwrite files)")
    try:
        keep_maps = _make_frames(args)
    except ValueError as error:
        raise cli.CliError(_flags_named(error)) from None
    save_map_frames(keep_maps, output, bits=args.bits)
    print(f"{cli.display(output)} ({len(keep_maps)} frames)")


def _flags_named(error: Exception) -> str:
    # The makers name their Python parameters (`inner_radius`): say the flags instead.
    flag = lambda match: "--" + {"angle_degrees": "angle", "strengths": "strength", "masks": "mask"}.get(  # noqa: E731
        match[1], match[1]).replace("_", "-")
    return re.sub(r"`(\w+)[^`]*`", flag, str(error))


def run(argv: list[str] | None = None) -> None:
    """The command line: draws one map and writes it; errors raise ``cli.CliError``."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.maker in VIDEO_MAKERS:
        return run_video(args)
    if args.output.suffix.lower() != ".png" or not args.output.parent.is_dir():
        raise cli.CliError(f"--output {args.output}: give a .png file in an existing folder")
    inputs = {flag: getattr(args, flag[2:], None) for flag in ("--like", "--mask", "--labels", "--image")}
    cli.check_output(args.output, inputs, overwrite=args.overwrite)
    try:
        keep_map = _make(args)
    except ValueError as error:
        raise cli.CliError(_flags_named(error)) from None
    print(cli.display(save_map(keep_map, args.output, bits=args.bits, overwrite=args.overwrite)))


def main(argv: list[str] | None = None) -> None:
    cli.main(lambda: run(argv))


if __name__ == "__main__":
    main()
