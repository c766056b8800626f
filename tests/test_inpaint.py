"""What the inpainting-checkpoint pipelines' 9-channel UNets read at every step (#15): the mask and the masked image,
on tiny SD and SDXL models; tests/test_contract.py checks the rest."""

import copy

import numpy as np
import pytest
import torch
from conftest import (
    build_pipeline, count_unet_calls, make_scheduler, sd_components, sdxl_components, seeded_generator, test_image,
)
from families import FAMILIES, band_map

PROMPT = "a red apple on a table"
LATENT = 32  # 64 px test images on a VAE with scale factor 2
STEPS = 6

# Latent columns 0-9 kept (released at step 6 = never), 10-20 at strength 0.5 (step 3), 21-31 changed (step 0).
# The band edges fall on even pixels, so that every latent cell has one strength.
KEPT, HALF, CHANGED = slice(0, 10), slice(10, 21), slice(21, 32)
RELEASE = [(KEPT, STEPS), (HALF, STEPS // 2), (CHANGED, 0)]


def bands():
    return band_map(1.0, 0.5, 0.0, edges=[0, 2 * HALF.start, 2 * CHANGED.start, 64])


FOUR_CHANNELS = {"sd_inpaint": sd_components, "sdxl_inpaint": sdxl_components}  # the base models' UNets


@pytest.fixture(scope="module", params=FOUR_CHANNELS)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def components(family):
    return FAMILIES[family].components()


def pipelines(family, components, scheduler="ddim"):
    stock = build_pipeline(FAMILIES[family].stock, {**components, "scheduler": make_scheduler(scheduler)})
    ours = FAMILIES[family].ours.from_pipe(stock)
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


def test_the_unet_reads_the_released_mask_frozen_latents_and_the_masked_image_at_every_step(family, components):
    _, ours = pipelines(family, components)
    inputs, encoder_calls = UNetInputs(ours.unet), count_unet_calls(ours.vae.encoder)
    image = test_image()
    final = ours(PROMPT, image=image, map=bands(), num_inference_steps=STEPS, generator=seeded_generator(),
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
    keep_map = bands()
    keep_map[:, 2 * CHANGED.start :] = 0.5  # now the first release is step 3
    ours(PROMPT, image=test_image(), map=keep_map, num_inference_steps=STEPS, generator=seeded_generator(),
         output_type="latent")
    inputs.hook.remove()
    assert len(inputs) == ours.num_timesteps == STEPS // 2
    for step, (_, mask, _) in enumerate(inputs, start=STEPS // 2):
        assert torch.equal(mask, released_on_the_latent_grid(step)), step


def test_the_user_callback_sees_the_mask_of_the_next_step(family, components):
    _, ours = pipelines(family, components)
    seen = []

    def record(pipe, i, t, kwargs):
        seen.append(kwargs["mask"].chunk(2)[1].clone())
        return {}

    ours(PROMPT, image=test_image(), map=bands(), num_inference_steps=STEPS, generator=seeded_generator(),
         output_type="latent", callback_on_step_end=record, callback_on_step_end_tensor_inputs=["mask"])
    for i, mask in enumerate(seen[:-1]):
        assert torch.equal(mask, released_on_the_latent_grid(i + 1)), i


def test_a_four_channel_unet_is_refused_clearly(family):
    ours = build_pipeline(FAMILIES[family].ours, FOUR_CHANNELS[family]())
    with pytest.raises(ValueError, match="9 channels; this one reads 4"):
        ours(PROMPT, image=test_image(), map=np.zeros((64, 64), np.float32), num_inference_steps=4)


def test_masks_follow_their_images_through_num_images_per_prompt(family, components):
    # Stock repeats images and masks as a whole batch (a, b, a, b) and each prompt in place (p0, p0, p1, p1). (With
    # a list of generators stock encodes only the first two, so the batch is not the same as four images written
    # out: the masks the UNet reads are checked instead.)
    _, ours = pipelines(family, components)
    inputs = UNetInputs(ours.unet)
    images, maps = [test_image(seed=1), test_image(seed=2)], [bands(), bands()[:, ::-1].copy()]
    ours(["a red apple", "a blue pear"], image=images, map=maps, num_images_per_prompt=2, num_inference_steps=STEPS,
         generator=seeded_generator(), output_type="latent")
    inputs.hook.remove()
    assert len(inputs) == STEPS
    for step, (_, mask, masked_image_latents) in enumerate(inputs):
        released = released_on_the_latent_grid(step)
        assert torch.equal(mask, torch.cat([released, released.flip(-1)] * 2)), step
        assert torch.equal(masked_image_latents[:2], masked_image_latents[2:]), step
    assert not torch.equal(inputs[3][2][0], inputs[3][2][1])
