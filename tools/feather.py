"""Soft inpainting's keep map: an inpainting mask, grown and feathered (``feathered_mask``).

A module of its own, below both of its users: the map makers (``tools.maps``, whose ``feather`` maker it is) and the
inputs of every run.py (``tools.cli``, for ``--mask``). The map makers' command line uses ``tools.cli``, so
``tools.cli`` cannot import them.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# The soft band is a Gaussian with sigma = feather_px / 3, rescaled to reach 1 exactly at feather_px.
_FEATHER_SIGMAS = 3.0


def feathered_mask(mask, feather_px: float, grow_px: float = 0.0) -> np.ndarray:
    """Turn a binary inpainting mask into a soft keep map (1 = keep, 0 = change fully).

    The map is 0 on the region to fill (grown by `grow_px`), rises with distance from it through a band
    `feather_px` pixels wide, and is exactly 1 beyond the band. Let `d` be the exact Euclidean distance from a
    pixel's centre to the nearest pixel centre of the mask, and `u = (d - grow_px) / feather_px`:

        keep = 0                                          if d <= grow_px  (inside the grown region)
        keep = (1 - exp(-9 u² / 2)) / (1 - exp(-9 / 2))   if 0 < u < 1     (Gaussian, sigma = feather_px / 3)
        keep = 1                                          if u >= 1        (beyond grow_px + feather_px)

    So the strength `1 - keep` is 1 at the region's edge and falls off as a Gaussian of the distance from it, with
    sigma = `feather_px / 3`, lowered by the Gaussian's value at `feather_px` (1.1%) and rescaled so that it reaches
    0 exactly there. The profile is monotone non-decreasing in `d`. The fill itself changes fully, and the change
    fades out around it, so the filled region blends into its surroundings.

    Args:
        mask (`PIL.Image.Image` or `np.ndarray` of shape (height, width)): the region to fill, white/True = fill
            (the usual inpainting convention, the opposite of a keep map). Images are converted to grayscale.
            Thresholds: bool arrays as they are; float arrays at 0.5 (values must lie in [0, 1]); uint8 at 128;
            uint16 at 32768; other integer arrays must hold only 0 and 1.
        feather_px (`float` >= 0): width in pixels of the soft band outside the region, measured from the grown
            region's edge to where the map reaches exactly 1. 0 gives a hard mask.
        grow_px (`float` >= 0, defaults to 0): the region first grows to every pixel whose centre lies within
            `grow_px` pixels of the mask, so that the fill covers a seam around it.

    Returns:
        `np.ndarray` of shape (height, width), float32, values in [0, 1]. An empty mask gives all ones.
    """
    for name, value in (("feather_px", feather_px), ("grow_px", grow_px)):
        real = not isinstance(value, bool) and isinstance(value, (int, float, np.number)) and math.isfinite(value)
        if not real or value < 0:
            raise ValueError(f"`{name}` must be a finite number >= 0 (pixels), got {value!r}.")
    region = _binary_mask(mask)

    reach = grow_px + feather_px
    distance = _distance_to_region(region, max_distance=reach)
    if feather_px == 0:
        keep_map = (distance > grow_px).astype(np.float64)
    else:
        # A tiny feather_px overflows to inf, which the clip turns into 1, as it should.
        with np.errstate(over="ignore"):
            band_position = np.clip((distance - grow_px) / feather_px, 0.0, 1.0)
        keep_map = -np.expm1(-0.5 * (_FEATHER_SIGMAS * band_position) ** 2) / -np.expm1(-0.5 * _FEATHER_SIGMAS**2)
        keep_map = np.clip(keep_map, 0.0, 1.0)
    return keep_map.astype(np.float32)


def _binary_mask(mask) -> np.ndarray:
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"`mask` must be a non-empty 2-D array (height, width), got shape {mask.shape}.")
    if mask.dtype == bool:
        return mask
    if mask.dtype == np.uint8:
        return mask >= 128
    if mask.dtype == np.uint16:
        return mask >= 32768
    if np.issubdtype(mask.dtype, np.integer):
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("An integer `mask` other than uint8/uint16 must hold only 0 and 1.")
        return mask == 1
    if np.issubdtype(mask.dtype, np.floating):
        if not (np.isfinite(mask).all() and mask.min() >= 0 and mask.max() <= 1):
            raise ValueError("A float `mask` must have finite values in [0, 1].")
        return mask >= 0.5
    raise ValueError(f"`mask` has unsupported dtype {mask.dtype}.")


def _distance_to_region(region: np.ndarray, max_distance: float) -> np.ndarray:
    """Exact Euclidean distance (float64, pixels) from each pixel centre to the nearest `True` pixel centre.

    Distances up to `max_distance` are exact; larger ones are returned as `inf` (as is everything when `region` is
    empty). Two separable passes: the distance within each row, then, down each column, the lower envelope of one
    parabola `row_distance[k]² + (i - k)²` per row k (Felzenszwalb & Huttenlocher, "Distance Transforms of Sampled
    Functions", 2012), built for all columns at once. The cost is O(height × width), whatever `max_distance`.
    """
    squared = _distance_within_rows(region) ** 2
    rows = np.flatnonzero(np.isfinite(squared[:, 0]))  # a row holds a region pixel in every column, or in none
    if rows.size == 0:
        return np.full(region.shape, np.inf)
    columns = np.arange(region.shape[1])
    apex = np.empty((rows.size, region.shape[1]), np.int64)  # per column, the rows of the envelope's parabolas...
    begins = np.empty((rows.size, region.shape[1]))  # ...and where each becomes the lowest
    top = np.zeros(region.shape[1], np.int64)  # the last parabola of each column's envelope
    apex[0], begins[0] = rows[0], -np.inf

    def crossing(k):  # where row k's parabola drops below the envelope's last one
        last = apex[top, columns]
        return (squared[k] - squared[last, columns] + k * k - last.astype(np.float64) ** 2) / (2.0 * (k - last))

    for k in rows[1:]:
        start = crossing(k)
        while (hidden := start <= begins[top, columns]).any():  # parabolas that k's lies below from their start on
            top -= hidden
            start = crossing(k)
        top += 1
        apex[top, columns], begins[top, columns] = k, start
    best, lowest = np.empty(region.shape), np.zeros(region.shape[1], np.int64)
    for i in range(region.shape[0]):
        while (later := (lowest < top) & (begins[np.minimum(lowest + 1, top), columns] < i)).any():
            lowest += later
        nearest = apex[lowest, columns]
        best[i] = squared[nearest, columns] + (i - nearest.astype(np.float64)) ** 2
    distance = np.sqrt(best)
    distance[distance > max_distance] = np.inf
    return distance


def _distance_within_rows(region: np.ndarray) -> np.ndarray:
    columns = np.arange(region.shape[1], dtype=np.float64)
    previous = np.maximum.accumulate(np.where(region, columns, -np.inf), axis=1)
    following = np.minimum.accumulate(np.where(region, columns, np.inf)[:, ::-1], axis=1)[:, ::-1]
    return np.minimum(columns - previous, following - columns)
