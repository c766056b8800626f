"""What is particular to Kandinsky 2.2's pipeline: the stock prior's embeddings, the grid `height` and `width` make,
callbacks that change the image embeddings; tests/test_contract.py checks the rest."""

import numpy as np
import pytest
import torch
from conftest import (
    build_pipeline, kandinsky_decoder_components, kandinsky_prior_components, seeded_generator, test_image,
)
from diffusers import KandinskyV22Img2ImgPipeline, KandinskyV22PriorPipeline
from diffusers.callbacks import PipelineCallback
from families import FAMILIES, movq_x0_and_noise

from Kandinsky.diff_pipe import KandinskyV22DiffImg2ImgPipeline

SIZE = 64
LATENT = 32  # 64 px on a MoVQ with scale factor 2
HALF = np.full((SIZE, SIZE), 0.5, np.float32)


@pytest.fixture(scope="module")
def components():
    return kandinsky_decoder_components()


def pipelines(components):
    return (build_pipeline(KandinskyV22Img2ImgPipeline, components),
            build_pipeline(KandinskyV22DiffImg2ImgPipeline, components))


def conditioning():
    return {name: value for name, value in FAMILIES["kandinsky"].inputs(0).items() if name != "image"}


@pytest.mark.parametrize("height, width, grid", [(48, 64, (24, 32)), (49, 65, (24, 32)), (None, None, (32, 32))])
def test_the_map_lands_on_the_grid_stock_makes_from_height_and_width(components, height, width, grid):
    # The image is resized to height x width, rounded down to the MoVQ factor (None keeps the image's size).
    _, ours = pipelines(components)
    keep_map = np.zeros((SIZE, SIZE), np.float32)
    keep_map[: SIZE // 2] = 1.0  # the top half is kept
    x0, _ = movq_x0_and_noise(ours, {"image": test_image(), "height": height, "width": width})
    final = ours(image=test_image(), map=keep_map, num_inference_steps=4, generator=seeded_generator(),
                 output_type="latent", **{**conditioning(), "height": height, "width": width}).images
    assert final.shape[-2:] == x0.shape[-2:] == grid
    top = slice(0, grid[0] // 2)
    assert torch.equal(final[..., top, :], x0[..., top, :])
    assert not torch.allclose(final[..., grid[0] // 2 + 1 :, :], x0[..., grid[0] // 2 + 1 :, :], atol=1e-2)


def test_a_size_that_is_not_square_comes_out_as_asked_and_otherwise_as_stock(components):
    stock, ours = pipelines(components)
    run = dict(image=test_image(), num_inference_steps=6, output_type="np", **conditioning())
    expected = stock(strength=0.5, generator=seeded_generator(), **{**run, "height": 48, "width": 64}).images
    if expected.shape[1:3] != (48, 64):  # diffusers 0.42 hands height and width to its image processor swapped
        expected = stock(strength=0.5, generator=seeded_generator(), **{**run, "height": 64, "width": 48}).images
    result = ours(map=HALF, generator=seeded_generator(), **{**run, "height": 48, "width": 64}).images
    assert result.shape == (1, 48, 64, 3)
    assert np.array_equal(result, expected)


def test_a_map_drawn_on_a_wide_image_is_stretched_with_it(components):
    _, ours = pipelines(components)
    wide = test_image(size=128).resize((128, 64))  # squeezed to 64 x 64, as stock does
    # Bands whose edges fall on latent cells at both sizes (3/8 and 3/4 of the width), so both give one grid map.
    drawn_on_the_image, on_the_grid = np.ones((64, 128), np.float32), np.ones((LATENT, LATENT), np.float32)
    for keep_map, width in [(drawn_on_the_image, 128), (on_the_grid, LATENT)]:
        keep_map[:, 3 * width // 8 : 3 * width // 4] = 0.5
        keep_map[:, 3 * width // 4 :] = 0.0
    run = dict(image=wide, num_inference_steps=6, output_type="np", **conditioning())
    stretched = ours(map=drawn_on_the_image, generator=seeded_generator(), **run).images
    direct = ours(map=on_the_grid, generator=seeded_generator(), **run).images
    assert np.array_equal(stretched, direct)
    with pytest.raises(ValueError, match="aspect ratios differ"):
        ours(map=np.ones((64, 200), np.float32), generator=seeded_generator(), **run)


class SwapEmbeddingsAtHalfway(PipelineCallback):
    """From the middle step on, guide towards other image embeddings: stock reads `image_embeds` back each step."""

    tensor_inputs = ["image_embeds"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == pipeline.num_timesteps // 2:
            negative, _ = callback_kwargs["image_embeds"].chunk(2)  # stock passes them stacked for guidance
            other = torch.randn(1, 32, generator=seeded_generator(7))  # a stand-in for the prior's embeddings
            return {"image_embeds": torch.cat([negative, other])}
        return {}


def test_callbacks_that_change_image_embeds_act_as_in_stock(components):
    stock, ours = pipelines(components)
    run = dict(image=test_image(), num_inference_steps=6, output_type="np", **conditioning())
    # Stock Kandinsky ignores a PipelineCallback's own tensor_inputs, so they are passed to it by hand; ours reads them.
    expected = stock(strength=1.0, generator=seeded_generator(), callback_on_step_end=SwapEmbeddingsAtHalfway(),
                     callback_on_step_end_tensor_inputs=["image_embeds"], **run).images
    result = ours(map=np.zeros((SIZE, SIZE), np.float32), generator=seeded_generator(),
                  callback_on_step_end=SwapEmbeddingsAtHalfway(), **run).images
    assert np.array_equal(result, expected)
    unswapped = ours(map=np.zeros((SIZE, SIZE), np.float32), generator=seeded_generator(), **run).images
    assert np.abs(result - unswapped).max() > 1e-3


def test_takes_the_embeddings_of_the_stock_prior(components):
    prior = build_pipeline(KandinskyV22PriorPipeline, kandinsky_prior_components())
    image_embeds, negative_image_embeds = prior("a red apple", negative_prompt="blurry", num_inference_steps=2,
                                                generator=seeded_generator()).to_tuple()
    stock, ours = pipelines(components)
    run = dict(image_embeds=image_embeds, negative_image_embeds=negative_image_embeds, image=test_image(),
               height=SIZE, width=SIZE, num_inference_steps=6, output_type="np")
    expected = stock(strength=0.5, generator=seeded_generator(), **run).images
    result = ours(map=HALF, generator=seeded_generator(), **run).images
    assert np.array_equal(result, expected)
