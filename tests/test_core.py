"""The differential core on its own: map parsing, strengths and each family's release rule against stock's own."""

import types
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FluxImg2ImgPipeline, StableDiffusionImg2ImgPipeline
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import SD2.diff_pipe as sd_rule
import SD3.diff_pipe as flow_rule
from SD2.diff_pipe import map_on_grid, map_to_tensor


def strength_map(map, size, strength, invert_map=False):
    """Each cell's strength as every pipeline's phase 3 computes it: the map parsed once, in change polarity."""
    return strength * map_on_grid(map_to_tensor(map, complement=not invert_map), size)


RULES = {"sd": (sd_rule.release_steps, StableDiffusionImg2ImgPipeline),
         "flow": (flow_rule.release_steps, FluxImg2ImgPipeline)}


def stock_first_steps(stock, num_inference_steps, strengths):
    """The first step that stock img2img runs at each strength: its own `get_timesteps`, on a bare schedule."""
    pipe = types.SimpleNamespace(scheduler=types.SimpleNamespace(timesteps=range(num_inference_steps), order=1))
    return [num_inference_steps - stock.get_timesteps(pipe, num_inference_steps, s, None)[1] for s in strengths]


@pytest.mark.parametrize("family", RULES)
def test_the_release_rule_is_stock_get_timesteps_at_every_steps_and_strength(family):
    release_steps, stock = RULES[family]
    strengths = [k / 1000 for k in range(1001)]  # 0.29 and 0.56 among them, where stock's product falls off an integer
    for num_inference_steps in range(1, 201):
        expected = stock_first_steps(stock, num_inference_steps, strengths)
        assert release_steps(torch.tensor(strengths, dtype=torch.float64), num_inference_steps).tolist() == expected


@pytest.mark.parametrize("family", RULES)
@pytest.mark.parametrize("invert_map", [False, True])
@pytest.mark.parametrize("global_strength", [1.0, 0.7])
def test_maps_release_where_stock_starts_at_the_strength_their_values_stand_for(family, invert_map, global_strength):
    # An 8-bit value k stands for k/255, a float32 value for its decimal: 0.3 is 0.3, not 0.30000001192092896.
    release_steps, stock = RULES[family]
    # So 1 - 0.8 stands for 0.2, not for float64's 0.19999999999999996.
    maps = {"8-bit": (np.arange(256, dtype=np.uint8), 255), "float32": (np.arange(1001, dtype=np.float32) / 1000, 1000)}
    for values, unit in maps.values():
        strengths = strength_map(values[None], (1, len(values)), global_strength, invert_map)
        meanings = [(k if invert_map else unit - k) / unit for k in range(len(values))]
        stock_strengths = [global_strength * meaning for meaning in meanings]
        for num_inference_steps in (10, 25, 28, 50, 100):
            expected = stock_first_steps(stock, num_inference_steps, stock_strengths)
            assert release_steps(strengths, num_inference_steps).flatten().tolist() == expected


def test_the_rules_differ_where_stock_rounds_differently():
    strengths = torch.tensor([0.29, 0.56, 0.5, 0.01], dtype=torch.float64)
    assert sd_rule.release_steps(strengths, 100).tolist() == [72, 44, 50, 99]  # int(28.999999999999996) = 28
    assert flow_rule.release_steps(strengths[1:2], 25).tolist() == [10]  # int(25 - 14.000000000000002): 15 steps
    assert flow_rule.release_steps(strengths, 100).tolist() == [71, 43, 50, 99]  # 100 - 56.00000000000001


def test_release_step_scales_with_global_strength():
    strengths = strength_map(torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3), (1, 3), 0.6)
    assert sd_rule.release_steps(strengths, 10).flatten().tolist() == [4, 7, 10]
    assert sd_rule.release_steps(strengths * 0, 10).flatten().tolist() == [10, 10, 10]


def test_release_step_of_strength_below_one_step_is_never_under_sd_and_the_last_step_under_flow():
    strengths = strength_map(torch.tensor([0.951, 0.95, 1.0]).view(1, 1, 1, 3), (1, 3), 1.0)
    assert sd_rule.release_steps(strengths, 20).flatten().tolist() == [20, 19, 20]
    assert flow_rule.release_steps(strengths, 20).flatten().tolist() == [19, 19, 20]


def test_a_uniform_region_keeps_its_exact_value_through_averaging_and_interpolation():
    # 0.3 averaged over 64 cells in floating point is not 0.3; a cell of equal values must keep it, or a uniform map
    # lands one step off stock.
    for map_size, grid in (((64, 64), (8, 8)), ((57, 57), (7, 7)), ((5, 5), (16, 16)), ((7, 7), (8, 8))):
        assert torch.all(map_on_grid(np.full(map_size, 0.3, np.float32), grid) == 0.3)
        assert torch.all(map_on_grid(np.full(map_size, 77, np.uint8), grid) == 77 / 255)


@pytest.mark.parametrize("mode, value, expected", [
    ("L", 255, 1.0), ("L", 0, 0.0), ("I;16", 65535, 1.0), ("I", 32768, 32768 / 65535), ("F", 0.25, 0.25),
    ("RGB", (255, 255, 255), 1.0), ("1", 1, 1.0),
])
def test_pil_maps_of_every_mode(mode, value, expected):
    tensor = map_to_tensor(PIL.Image.new(mode, (4, 2), value))
    assert tensor.shape == (1, 1, 2, 4) and tensor.dtype == torch.float64
    assert torch.all(tensor == expected)


def test_sixteen_bit_maps_keep_their_precision():
    values = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)
    tensor = map_to_tensor(PIL.Image.fromarray(values))
    assert torch.equal(tensor[0, 0], torch.from_numpy(values.astype(np.float64) / 65535))


@pytest.mark.parametrize(
    "shape, expected",
    [((6, 8), (1, 1, 6, 8)), ((3, 6, 8), (3, 1, 6, 8)), ((6, 8, 1), (1, 1, 6, 8)), ((2, 6, 8, 1), (2, 1, 6, 8)),
     ((2, 1, 6, 8), (2, 1, 6, 8))],
)
def test_numpy_layouts(shape, expected):
    assert map_to_tensor(np.zeros(shape, np.float32)).shape == expected
    read_only = np.zeros(shape, np.float32)
    read_only.flags.writeable = False  # as np.asarray(image) hands out: torch warned that writing to it is undefined
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert map_to_tensor(read_only).shape == expected


def test_list_of_maps_is_a_batch():
    maps = [np.zeros((6, 8), np.uint8), torch.ones(6, 8), PIL.Image.new("L", (8, 6), 255)]
    assert map_to_tensor(maps)[:, 0, 0, 0].tolist() == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("bad, message", [
    (np.full((4, 4), np.nan, np.float32), "NaN"), (np.full((4, 4), 1.5, np.float32), r"\[0, 1\]"),
    (np.zeros((4, 4, 3), np.uint8), "colour image"), (torch.zeros(1, 3, 4, 4), "one channel"),
    (np.zeros((4, 4), np.int64), "dtype"), (np.zeros((0, 4), np.float32), "empty"),
    ([np.zeros((4, 4)), np.zeros((4, 6))], "differ in size"), ([], "empty list"),
])
def test_bad_maps_are_refused_with_the_reason(bad, message):
    with pytest.raises(ValueError, match=message):
        map_to_tensor(bad)


def test_aspect_ratio_is_checked_against_the_image_when_the_grid_is_stretched():
    # Pixel-space stages stretch every image to a square; the map must match the image, not the square.
    assert map_on_grid(np.zeros((384, 512), np.float32), (64, 64), aspect_of=(384, 512)).shape == (1, 1, 64, 64)
    assert map_on_grid(np.zeros((383, 512), np.float32), (64, 64), aspect_of=(386, 512)).shape == (1, 1, 64, 64)
    with pytest.raises(ValueError, match="512x384"):
        map_on_grid(np.zeros((512, 512), np.float32), (64, 64), aspect_of=(384, 512))


def test_invert_map_mirrors_the_strengths():
    ramp = np.linspace(0, 1, 64, dtype=np.float32)[None].repeat(64, 0)
    assert torch.equal(strength_map(ramp, (8, 8), 0.5, invert_map=True), 0.5 * map_on_grid(ramp, (8, 8)))
    complement = map_on_grid(map_to_tensor(ramp, complement=True), (8, 8))
    assert torch.equal(strength_map(ramp, (8, 8), 0.5), 0.5 * complement)
    assert torch.allclose(complement, 1 - map_on_grid(ramp, (8, 8)), rtol=0, atol=1e-15)


map_dtypes = st.sampled_from([np.uint8, np.uint16, np.int32, np.float16, np.float32, np.float64, np.bool_])


@settings(max_examples=200, deadline=None)
@given(
    map=map_dtypes.flatmap(lambda dtype: hnp.arrays(
        dtype, hnp.array_shapes(min_dims=1, max_dims=5, min_side=0, max_side=12),
        elements=None if dtype in (np.uint8, np.uint16, np.int32, np.bool_) else st.floats(-2, 3, width=16),
    )),
    grid=st.tuples(st.integers(1, 8), st.integers(1, 8)),
)
def test_prepared_maps_are_in_range_or_refused(map, grid):
    try:
        keep_map = map_on_grid(map, grid)
    except ValueError as error:
        assert str(error)
        return
    assert keep_map.dtype == torch.float64 and keep_map.shape[1:] == (1, *grid)
    assert 0 <= keep_map.min() and keep_map.max() <= 1


@given(nan_at=st.integers(0, 15))
def test_nan_anywhere_is_refused(nan_at):
    map = np.full(16, 0.5, np.float32)
    map[nan_at] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        map_to_tensor(map.reshape(4, 4))


def test_shrinking_averages_every_block_of_the_map():
    checkerboard = np.indices((64, 64)).sum(0) % 2  # which point sampling would alias to all 0 or all 1
    assert torch.all(map_on_grid(checkerboard.astype(np.float32), (8, 8)) == 0.5)
    # At a 2x shrink bilinear interpolation and area averaging agree; at 8x only averaging sees every pixel.
    fine = torch.rand(1, 1, 256, 192, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.avg_pool2d(fine.double(), 8)
    assert torch.allclose(map_on_grid(fine.double(), (32, 24)), expected, rtol=0, atol=1e-12)


def interpolated_between_centres(map: torch.Tensor, size: tuple) -> torch.Tensor:
    """Linear interpolation between pixel centres, one axis after the other, edges held (no averaging)."""
    for axis, new_length in zip((-2, -1), size):
        old_length = map.shape[axis]
        position = ((torch.arange(new_length, dtype=torch.float64) + 0.5) * old_length / new_length - 0.5).clamp(0)
        before = position.floor().long().clamp(max=old_length - 1)
        after = (before + 1).clamp(max=old_length - 1)
        weight = (position - before).view(-1, *(1,) * (-1 - axis))
        map = map.index_select(axis, before) * (1 - weight) + map.index_select(axis, after) * weight
    return map


@pytest.mark.parametrize("map_size, grid", [((199, 200), (200, 200)), ((401, 399), (400, 400))])
def test_a_map_not_larger_than_the_grid_on_both_axes_is_interpolated_not_averaged(map_size, grid):
    # Nothing to average along an axis that grows: area averaging there would shift the map by half a pixel.
    map = torch.rand(1, 1, *map_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = interpolated_between_centres(map, grid)
    # torch places the source positions in float32 (spacing 3e-5 near 400, so weights can be that far off, on
    # each axis); averaging would be off by up to 0.5.
    assert torch.allclose(map_on_grid(map, grid), expected, atol=1e-4)


@pytest.mark.parametrize("height, width", [(63, 64), (64, 63), (65, 64), (62, 64)])
def test_a_map_up_to_one_grid_cell_off_the_aspect_ratio_is_accepted(height, width):
    # A 64 px map for a 32x32 latent grid: 62 rows are exactly one grid cell short, still within the tolerance.
    keep_map = map_on_grid(np.ones((height, width), np.float32), (32, 32))
    assert keep_map.shape == (1, 1, 32, 32) and torch.all(keep_map == 1)


@pytest.mark.parametrize("height, width", [(48, 64), (64, 48), (61, 64), (32, 64)])
def test_a_map_of_another_shape_is_refused_with_both_sizes(height, width):
    message = (f"`map` is {width}x{height} but the image is 32x32: their aspect ratios differ. "
               "Give the map the image's aspect ratio.")
    with pytest.raises(ValueError) as refused:
        map_on_grid(np.ones((height, width), np.float32), (32, 32))
    assert str(refused.value) == message
