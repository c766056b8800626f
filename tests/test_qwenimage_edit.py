"""Qwen-Image-Edit's own: stock's working size from the image's aspect ratio, stock's `padding_mask_crop` with a map,
and the crop tool's refusal. The contract (tests/test_contract.py) covers the rest."""

import numpy as np
import PIL.Image
import pytest
from conftest import build_pipeline, seeded_generator, test_image
from diffusers import QwenImageEditInpaintPipeline

from QwenImage.diff_pipe_edit import QwenImageEditDiffInpaintPipeline
from tests.qwen_edit_models import qwenimage_edit_components, small_working_area
from tools.crop import edit_on_crop

SIZE = 64  # px: images of 64 x 64 are edited at their own size at this area
RUN = dict(prompt="a red apple", num_inference_steps=4)


@pytest.fixture(scope="module")
def pipes():
    """Stock and ours on the same components, both at an area of SIZE x SIZE px for the whole module."""
    components = qwenimage_edit_components()
    with small_working_area(SIZE * SIZE):
        yield tuple(build_pipeline(cls, components)
                    for cls in (QwenImageEditInpaintPipeline, QwenImageEditDiffInpaintPipeline))


def pixels(images):
    return np.asarray(images[0]).astype(int)


def test_the_working_size_is_stocks_for_the_images_aspect_ratio_and_the_map_has_the_images(pipes):
    stock, ours = pipes
    image = test_image(SIZE).resize((50, 20))  # 2.5 : 1, which stock edits at 96 x 32 px (3 : 1) at this area
    expected = stock(**RUN, image=image, mask_image=PIL.Image.new("L", (96, 32), 255), strength=0.5,
                     generator=seeded_generator()).images
    result = ours(**RUN, image=image, map=np.full((20, 50), 0.5), generator=seeded_generator()).images
    assert result[0].size == expected[0].size == (96, 32) and np.array_equal(pixels(result), pixels(expected))
    with pytest.raises(ValueError, match="`map` is 96x32 but the image is 50x20"):
        ours(**RUN, image=image, map=np.full((32, 96), 0.5))


def test_padding_mask_crop_edits_the_box_of_the_released_pixels_and_keeps_the_others(pipes):
    stock, ours = pipes
    image, run = test_image(SIZE), dict(RUN, padding_mask_crop=4)
    # The released box grown by 4 px is 32 px square, edited at 64: patches of the crop stay whole, and a binary map
    # is stock with its complement as the mask, crop and paste included.
    keep_map = np.ones((SIZE, SIZE), np.float32)
    keep_map[8:32, 36:60] = 0
    mask = PIL.Image.fromarray(((1 - keep_map) * 255).astype(np.uint8))
    for strength in (1.0, 0.5):
        expected = stock(**run, image=image, mask_image=mask, strength=strength, generator=seeded_generator()).images
        result = ours(**run, image=image, map=keep_map, strength=strength, generator=seeded_generator()).images
        assert np.array_equal(pixels(result), pixels(expected)), strength
    # A soft map: the pixels that it keeps are the input's own, the others the edit's.
    soft = np.ones((SIZE, SIZE), np.float32)
    soft[10:20, 30:50] = np.linspace(0, 0.9, 20)
    result, kept = pixels(ours(**run, image=image, map=soft, generator=seeded_generator()).images), soft == 1
    assert np.array_equal(result[kept], np.asarray(image)[kept])
    assert np.abs(result[~kept] - np.asarray(image)[~kept]).mean() > 10
    # A map that releases nothing: the input itself, without a step.
    result = ours(**run, image=image, map=np.ones((SIZE, SIZE)), generator=seeded_generator()).images
    assert np.array_equal(pixels(result), np.asarray(image)) and ours.num_timesteps == 0


def test_the_crop_tool_is_refused_in_one_line_that_names_padding_mask_crop(pipes):
    _, ours = pipes
    with pytest.raises(ValueError, match="pass `padding_mask_crop=<pixels>` to the pipeline instead"):
        edit_on_crop(ours, **RUN, image=test_image(SIZE), map=np.zeros((SIZE, SIZE)))
