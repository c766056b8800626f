"""What is particular to the ControlNet img2img pipelines (#15): the control image, several ControlNets and user
latents; tests/test_contract.py checks the rest."""

import numpy as np
import pytest
import torch
from conftest import build_pipeline, count_unet_calls, seeded_generator, test_image
from families import FAMILIES, band_map

from tests.tiny_models import sd_controlnet_components, sdxl_controlnet_components

PROMPT = "a red apple on a table"
SIZE = 32  # the test images: 16 x 16 latents on a VAE with scale factor 2 (maps are drawn at 64 px)
LATENT = SIZE // 2
HALF = np.full((64, 64), 0.5, np.float32)
THREE_BANDS = band_map(1.0, 0.5, 0.0)
BUILDERS = {"sd_controlnet": sd_controlnet_components, "sdxl_controlnet": sdxl_controlnet_components}


@pytest.fixture(scope="module", params=BUILDERS)
def family(request):
    return request.param


def pipelines(family, controlnets=1):
    components = BUILDERS[family](controlnets=controlnets)
    return tuple(build_pipeline(cls, components) for cls in (FAMILIES[family].stock, FAMILIES[family].ours))


@pytest.fixture(scope="module")
def ours(family):
    return pipelines(family)[1]


def control_image(seed=7):
    return test_image(SIZE, seed=seed).transpose(0)  # a condition unlike the image itself


def test_the_control_image_steers_the_result(ours):
    run = dict(image=test_image(SIZE), map=THREE_BANDS, num_inference_steps=4, output_type="np")
    first = ours(PROMPT, control_image=control_image(7), generator=seeded_generator(), **run).images
    second = ours(PROMPT, control_image=control_image(8), generator=seeded_generator(), **run).images
    assert np.abs(first - second).max() > 1e-3


def test_multi_controlnet_acts_as_in_stock(family):
    stock, ours = pipelines(family, controlnets=2)
    run = dict(image=test_image(SIZE), control_image=[control_image(7), control_image(8)], num_inference_steps=6,
               controlnet_conditioning_scale=[0.8, 0.5], output_type="np")
    expected = stock(PROMPT, strength=0.5, generator=seeded_generator(), **run).images
    result = ours(PROMPT, map=HALF, generator=seeded_generator(), **run).images
    assert np.array_equal(result, expected)
    calls = [count_unet_calls(net) for net in ours.controlnet.nets]
    swapped = ours(PROMPT, map=THREE_BANDS, generator=seeded_generator(),
                   **{**run, "control_image": [control_image(8), control_image(7)]}).images
    assert [len(c) for c in calls] == [6, 6]
    plain = ours(PROMPT, map=THREE_BANDS, generator=seeded_generator(), **run).images
    assert np.abs(swapped - plain).max() > 1e-3  # each ControlNet reads its own condition


def test_given_latents_start_the_first_step_as_in_stock(family):
    stock, ours = pipelines(family)
    latents = torch.randn(1, 4, LATENT, LATENT, generator=seeded_generator(9))
    run = dict(image=test_image(SIZE), control_image=control_image(), num_inference_steps=6, output_type="latent")
    expected = stock(PROMPT, strength=0.5, latents=latents, **run).images
    result = ours(PROMPT, map=HALF, latents=latents, generator=seeded_generator(), **run).images
    assert torch.equal(result, expected)
