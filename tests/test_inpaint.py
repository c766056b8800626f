"""The inpainting-checkpoint pipelines against stock inpainting, on tiny random SD and SDXL models with 9-channel UNets
(#15)."""

import copy

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import (
    build_pipeline,
    count_unet_calls,
    make_scheduler,
    sd_components,
    sdxl_components,
    seeded_generator,
    test_image,
)
from diffusers import DiffusionPipeline, StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

from SD2.diff_pipe_inpaint import StableDiffusionDiffInpaintPipeline
from SDXL.diff_pipe_inpaint import StableDiffusionXLDiffInpaintPipeline
from tests.tiny_models import sd_inpaint_components, sdxl_inpaint_components

PROMPT = "a red apple on a table"
LATENT = 32  # 64 px test images on a VAE with scale factor 2
STEPS = 6
BATCH_RTOL = 1e-4  # batched vs single runs: float32 sums in another order (see tests/test_sd2.py)
WHITE_MASK = PIL.Image.new("L", (64, 64), 255)  # stock's mask: repaint everything

# Latent columns 0-9 kept (released at step 6 = never), 10-20 at strength 0.5 (step 3), 21-31 changed (step 0).
# The band edges fall on even pixels, so that every latent cell has one strength.
KEPT, HALF, CHANGED = slice(0, 10), slice(10, 21), slice(21, 32)
RELEASE = [(KEPT, STEPS), (HALF, STEPS // 2), (CHANGED, 0)]


def band_map():
    keep_map = np.ones((64, 64), np.float32)
    keep_map[:, 2 * HALF.start :] = 0.5
    keep_map[:, 2 * CHANGED.start :] = 0.0
    return keep_map


FAMILIES = {  # (stock, ours, components with a 9-channel UNet, components with a 4-channel one)
    "sd": (StableDiffusionInpaintPipeline, StableDiffusionDiffInpaintPipeline, sd_inpaint_components, sd_components),
    "sdxl": (StableDiffusionXLInpaintPipeline, StableDiffusionXLDiffInpaintPipeline, sdxl_inpaint_components,
             sdxl_components),
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def components(family):
    return FAMILIES[family][2]()


def pipelines(family, components, scheduler="ddim"):
    stock_class, ours_class, _, _ = FAMILIES[family]
    components = {**components, "scheduler": make_scheduler(scheduler)}
    stock = build_pipeline(stock_class, components)
    ours = ours_class.from_pipe(stock)
    ours.set_progress_bar_config(disable=True)
    return stock, ours


def released_on_the_latent_grid(step):
    mask = torch.zeros(1, 1, LATENT, LATENT)
    for band, release_step in RELEASE:
        mask[..., band] = float(step >= release_step)
    return mask


def encode(vae, pixels, generator=None):
    """The VAE's encoding as stock makes it (a sample from `generator`), or its mean without a generator."""
    distribution = vae.encode(pixels).latent_dist
    latents = distribution.sample(generator) if generator is not None else distribution.mode()
    return latents * vae.config.scaling_factor


class UNetInputs(list):
    """What the 9-channel UNet reads at every call: (latents, mask, masked image latents), the CFG copies checked
    equal and dropped."""

    def __init__(self, unet):
        super().__init__()
        self.hook = unet.register_forward_pre_hook(self.record)

    def record(self, module, args):
        sample = args[0]
        unconditional, conditional = sample.chunk(2)
        assert torch.equal(unconditional, conditional)
        self.append((conditional[:, :4].clone(), conditional[:, 4:5].clone(), conditional[:, 5:].clone()))


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
def test_a_map_releasing_everything_at_step_0_is_stock_inpainting_at_strength_1(family, components, scheduler):
    stock, ours = pipelines(family, components, scheduler)
    run = dict(image=test_image(), num_inference_steps=STEPS, output_type="np")
    expected = stock(PROMPT, mask_image=WHITE_MASK, strength=1.0, generator=seeded_generator(), **run).images
    result = ours(PROMPT, map=np.zeros((64, 64), np.float32), generator=seeded_generator(), **run).images
    assert np.array_equal(result, expected) and ours.num_timesteps == STEPS


@pytest.mark.parametrize("strength", [0.5, 0.35])
def test_a_uniform_map_is_stock_inpainting_with_a_white_mask(family, components, strength):
    # T * s = 3 and 2.1: an integer and a non-integer product.
    stock, ours = pipelines(family, components, "euler")
    run = dict(image=test_image(), num_inference_steps=STEPS, output_type="np")
    expected = stock(PROMPT, mask_image=WHITE_MASK, strength=strength, generator=seeded_generator(), **run).images
    result = ours(PROMPT, map=np.full((64, 64), 1 - strength, np.float32), generator=seeded_generator(), **run).images
    assert np.array_equal(result, expected) and ours.num_timesteps == int(STEPS * strength)


def test_a_black_map_where_stock_product_falls_just_off_an_integer_runs_stock_steps(family, components):
    # Stock runs int(100 * 0.29) = int(28.999999999999996) = 28 steps; so must a black map at strength 0.29.
    stock, ours = pipelines(family, components, "euler")
    run = dict(image=test_image(), strength=0.29, num_inference_steps=100, output_type="np")
    expected = stock(PROMPT, mask_image=WHITE_MASK, generator=seeded_generator(), **run).images
    calls = count_unet_calls(ours)
    result = ours(PROMPT, map=np.zeros((64, 64), np.uint8), generator=seeded_generator(), **run).images
    calls.stop()
    assert len(calls) == ours.num_timesteps == stock.num_timesteps == 28
    assert np.array_equal(result, expected)


def test_the_unet_reads_the_released_mask_frozen_latents_and_the_masked_image_at_every_step(family, components):
    _, ours = pipelines(family, components)
    inputs, encoder_calls = UNetInputs(ours.unet), count_unet_calls(ours.vae.encoder)
    image = test_image()
    final = ours(PROMPT, image=image, map=band_map(), num_inference_steps=STEPS, generator=seeded_generator(),
                 output_type="latent").images
    inputs.hook.remove(), encoder_calls.stop()
    # x0, the first masked image, and one re-encoding when the half band is released at step 3.
    assert len(encoder_calls) == 3

    # Stock's draws, in stock's order: x0, the noise, then the first masked image; later ones take the VAE's mean.
    vae, generator = ours.vae, seeded_generator()
    pixels = ours.image_processor.preprocess(image)
    x0 = encode(vae, pixels, generator)
    noise = torch.randn(x0.shape, generator=generator)
    schedule = copy.deepcopy(ours.scheduler)
    schedule.set_timesteps(STEPS)
    assert len(inputs) == STEPS
    for step, (latents, mask, masked_image_latents) in enumerate(inputs):
        released = released_on_the_latent_grid(step)
        assert torch.equal(mask, released), step
        if step == 0 or not torch.equal(released, released_on_the_latent_grid(step - 1)):
            masked_pixels = pixels * (1 - released.repeat_interleave(2, -1).repeat_interleave(2, -2))
            expected = encode(vae, masked_pixels, generator if step == 0 else None)
        assert torch.equal(masked_image_latents, expected), step
        noised = schedule.add_noise(x0, noise, schedule.timesteps[step : step + 1])
        for band, release_step in RELEASE:
            if 0 < release_step and step <= release_step:  # frozen, or starting at its release
                assert torch.equal(latents[..., band], noised[..., band]), (step, release_step)
    # Pixels released at step 0 start on pure noise, as stock inpainting at strength 1 starts.
    assert torch.equal(inputs[0][0][..., CHANGED], noise[..., CHANGED] * schedule.init_noise_sigma)
    assert torch.equal(final[..., KEPT], x0[..., KEPT])
    assert not torch.allclose(final[..., CHANGED], x0[..., CHANGED], atol=1e-2)


def test_steps_before_the_first_release_never_run_and_the_mask_starts_there(family, components):
    _, ours = pipelines(family, components)
    inputs = UNetInputs(ours.unet)
    keep_map = band_map()
    keep_map[:, 2 * CHANGED.start :] = 0.5  # now the first release is step 3
    ours(PROMPT, image=test_image(), map=keep_map, num_inference_steps=STEPS, generator=seeded_generator(),
         output_type="latent")
    inputs.hook.remove()
    assert len(inputs) == ours.num_timesteps == STEPS // 2
    for step, (_, mask, _) in enumerate(inputs, start=STEPS // 2):
        assert torch.equal(mask, released_on_the_latent_grid(step)), step


def test_a_white_map_runs_no_step_and_returns_x0(family, components):
    _, ours = pipelines(family, components)
    calls = count_unet_calls(ours)
    x0 = encode(ours.vae, ours.image_processor.preprocess(test_image()), seeded_generator())
    result = ours(PROMPT, image=test_image(), map=np.ones((64, 64), np.float32), generator=seeded_generator(),
                  output_type="latent").images
    assert torch.equal(result, x0) and calls == [] and ours.num_timesteps == 0
    calls.stop()


def test_the_user_callback_sees_the_mask_of_the_next_step(family, components):
    _, ours = pipelines(family, components)
    seen = []

    def record(pipe, i, t, kwargs):
        seen.append(kwargs["mask"].chunk(2)[1].clone())
        return {}

    ours(PROMPT, image=test_image(), map=band_map(), num_inference_steps=STEPS, generator=seeded_generator(),
         output_type="latent", callback_on_step_end=record, callback_on_step_end_tensor_inputs=["mask"])
    for i, mask in enumerate(seen[:-1]):
        assert torch.equal(mask, released_on_the_latent_grid(i + 1)), i


def test_batch_of_images_with_their_own_maps_equals_each_run_alone(family, components):
    _, ours = pipelines(family, components)
    images, maps = [test_image(seed=1), test_image(seed=2)], [band_map(), band_map()[:, ::-1].copy()]
    prompts, seeds = ["a red apple", "a blue pear"], [3, 4]
    run = dict(num_inference_steps=STEPS, output_type="np")
    batch = ours(prompts, image=images, map=maps, generator=[seeded_generator(s) for s in seeds], **run).images
    for i in range(2):
        alone = ours(prompts[i], image=images[i], map=maps[i], generator=seeded_generator(seeds[i]), **run).images[0]
        np.testing.assert_allclose(batch[i], alone, rtol=BATCH_RTOL, atol=BATCH_RTOL)
    assert np.abs(batch[0] - batch[1]).max() > 1e-2


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(mask_image=WHITE_MASK), "map=mask, invert_map=True"),
        (dict(latents=torch.zeros(1, 4, LATENT, LATENT)), "`latents` is not taken"),
        (dict(map=[np.zeros((64, 64))] * 3), "3 maps for 1 images"),
        (dict(strength=1.5), "strength"),
        (dict(map=None), "`map`"),
    ],
)
def test_bad_arguments_are_refused_clearly(family, components, change, message):
    _, ours = pipelines(family, components)
    run = {**dict(image=test_image(), map=np.zeros((64, 64), np.float32), num_inference_steps=4), **change}
    with pytest.raises(ValueError, match=message):
        ours(PROMPT, **run)


def test_a_four_channel_unet_is_refused_clearly(family):
    _, ours_class, _, four_channel_components = FAMILIES[family]
    ours = build_pipeline(ours_class, four_channel_components())
    with pytest.raises(ValueError, match="9 channels; this one reads 4"):
        ours(PROMPT, image=test_image(), map=np.zeros((64, 64), np.float32), num_inference_steps=4)


def test_sdxl_refuses_the_base_refiner_split_clearly():
    _, ours = pipelines("sdxl", sdxl_inpaint_components())
    with pytest.raises(ValueError, match="`denoising_start` and `denoising_end`"):
        ours(PROMPT, image=test_image(), map=np.zeros((64, 64), np.float32), num_inference_steps=4, denoising_end=0.5)


def test_masks_follow_their_images_through_num_images_per_prompt(family, components):
    # Stock repeats images and masks as a whole batch (a, b, a, b) and each prompt in place (p0, p0, p1, p1). (With
    # a list of generators stock encodes only the first two, so the batch is not the same as four images written
    # out: the masks the UNet reads are checked instead.)
    _, ours = pipelines(family, components)
    inputs = UNetInputs(ours.unet)
    images, maps = [test_image(seed=1), test_image(seed=2)], [band_map(), band_map()[:, ::-1].copy()]
    ours(["a red apple", "a blue pear"], image=images, map=maps, num_images_per_prompt=2, num_inference_steps=STEPS,
         generator=seeded_generator(), output_type="latent")
    inputs.hook.remove()
    assert len(inputs) == STEPS
    for step, (_, mask, masked_image_latents) in enumerate(inputs):
        released = released_on_the_latent_grid(step)
        assert torch.equal(mask, torch.cat([released, released.flip(-1)] * 2)), step
        assert torch.equal(masked_image_latents[:2], masked_image_latents[2:]), step
    assert not torch.equal(inputs[3][2][0], inputs[3][2][1])


def test_the_file_loads_as_a_community_pipeline(family, components, tmp_path):
    stock, ours = pipelines(family, components)
    stock.save_pretrained(tmp_path)
    file = {"sd": "SD2/diff_pipe_inpaint.py", "sdxl": "SDXL/diff_pipe_inpaint.py"}[family]
    loaded = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=file, trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == FAMILIES[family][1].__name__
    run = dict(image=test_image(), map=band_map(), num_inference_steps=4, output_type="np")
    expected = ours(PROMPT, generator=seeded_generator(), **run).images
    assert np.array_equal(loaded(PROMPT, generator=seeded_generator(), **run).images, expected)
