"""What FLUX.1 Fill's transformer reads beside the latents at every step, the mask and the masked image's latents, on
the tiny Fill model; tests/test_contract.py checks the rest."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import build_pipeline, count_unet_calls, seeded_generator, test_image
from families import FAMILIES, FOUR_EDGES, SIZE, band_columns, band_map

ENTRY = FAMILIES["flux_fill"]
# Channels of a token: a 2x2 patch of 4-channel latents; as many for the masked image; the mask's 4 x 2 x 2 values.
LATENT_CHANNELS = 16
STEPS = 8


@pytest.fixture(scope="module")
def components():
    return ENTRY.components()


def pipelines(components):
    return build_pipeline(ENTRY.stock, components), build_pipeline(ENTRY.ours, components)


def edit(pipe, item=0, seed=0, **changes):
    return pipe(**{**ENTRY.inputs(item), "generator": seeded_generator(seed), "output_type": "latent",
                   "num_inference_steps": STEPS, **changes}).images


class TransformerInputs(list):
    """What the transformer reads at every call, packed: (latents, masked image latents, mask), seen by a pre-hook on
    its first projection, so that nothing between the loop and the model is left out."""

    def __init__(self, pipe):
        super().__init__()
        self.hook = pipe.transformer.x_embedder.register_forward_pre_hook(self.record)

    def record(self, module, args):
        self.append(tuple(part.clone() for part in args[0].split(LATENT_CHANNELS, dim=-1)))

    def conditioning(self):
        return [torch.cat(inputs[1:], dim=-1) for inputs in self]


def unpacked(pipe, tokens):
    """Packed tokens back on the latent grid: (B, 4, 16, 16), mask values of each latent's 2x2 pixels as channels."""
    return pipe._unpack_latents(tokens, SIZE, SIZE, pipe.vae_scale_factor)


def mask_of(keep_map):
    return PIL.Image.fromarray(((1 - keep_map) * 255).astype(np.uint8))


@pytest.mark.parametrize("strength, steps", [(1.0, 3), (0.5, 3)])  # from pure noise; T * s not whole
def test_a_binary_map_reads_stocks_mask_and_masked_image_with_its_complement_as_the_mask(components, strength, steps):
    # Stock lets the pixels outside its mask evolve, where ours holds them on the noised original, so only the latents
    # differ: the conditioning must be stock's at every step.
    stock, ours = pipelines(components)
    keep_map = band_map(1.0, 0.0)  # halves: whole 2x2 patches of latents
    run = dict(strength=strength, num_inference_steps=steps)
    read = []
    for pipe, changes in [(stock, dict(mask_image=mask_of(keep_map))), (ours, dict(map=keep_map))]:
        inputs = TransformerInputs(pipe)
        edit(pipe, **run, **changes)
        inputs.hook.remove()
        read.append(inputs)
    assert len(read[1]) == len(read[0]) == steps - int(steps - steps * strength)
    assert all(torch.equal(a, b) for a, b in zip(read[1].conditioning(), read[0].conditioning()))
    assert torch.equal(read[1][0][0], read[0][0][0])  # the same start


# Released by the flow rule at steps 8 (never), 4, 1 and 0; or 8, 4, 4 and 3: each run's second step releases pixels.
@pytest.mark.parametrize("keeps", [(1.0, 0.5, 0.125, 0.0), (1.0, 0.5, 0.5, 0.375)], ids=["from step 0", "from step 3"])
def test_the_mask_follows_the_release_steps_and_the_masked_image_is_encoded_again_only_when_it_changes(components,
                                                                                                       keeps):
    _, ours = pipelines(components)
    release = [int(STEPS - STEPS * (1 - keep)) for keep in keeps]
    first = min(release)
    inputs, encoder_calls = TransformerInputs(ours), count_unet_calls(ours.vae.encoder)
    edit(ours, map=band_map(*keeps, edges=FOUR_EDGES))
    inputs.hook.remove(), encoder_calls.stop()
    release_steps = sorted(set(release) - {STEPS, first})
    # x0, the first masked image, then one encoding at each later step that releases some pixel.
    assert len(encoder_calls) == 2 + len(release_steps)
    assert len(inputs) == STEPS - first

    # Stock's draws, in stock's order: x0, the noise, then the first masked image; later ones take the VAE's mean.
    generator, vae, config = seeded_generator(), ours.vae, ours.vae.config
    pixels = ours.image_processor.preprocess(ENTRY.inputs(0)["image"], height=SIZE, width=SIZE)
    x0 = vae.encode(pixels).latent_dist.sample(generator)
    torch.randn(x0.shape, generator=generator)  # the noise
    columns = band_columns(FOUR_EDGES, SIZE // 2)
    for step, (_, masked_image_latents, mask) in enumerate(inputs, start=first):
        released = torch.zeros(1, 1, SIZE // 2, SIZE // 2)
        for band, release_step in zip(columns, release):
            released[..., band] = float(step >= release_step)
        assert torch.equal(unpacked(ours, mask), released.expand(1, 4, -1, -1)), step
        if step == first or step in release_steps:
            masked_pixels = pixels * (1 - released.repeat_interleave(2, -1).repeat_interleave(2, -2))
            distribution = vae.encode(masked_pixels).latent_dist
            encoded = distribution.sample(generator) if step == first else distribution.mode()
            expected = (encoded - config.shift_factor) * config.scaling_factor
        assert torch.equal(unpacked(ours, masked_image_latents), expected), step


def test_the_user_callback_sees_the_conditioning_of_the_next_step(components):
    _, ours = pipelines(components)
    inputs, seen = TransformerInputs(ours), []

    def record(pipe, i, t, kwargs):
        seen.append(kwargs["masked_image_latents"].clone())
        return {}

    edit(ours, map=band_map(1.0, 0.75, 0.5, 0.0, edges=FOUR_EDGES), callback_on_step_end=record,
         callback_on_step_end_tensor_inputs=["masked_image_latents"])
    inputs.hook.remove()
    assert len(seen) == STEPS
    assert all(torch.equal(after, before) for after, before in zip(seen, inputs.conditioning()[1:]))


def test_masks_follow_their_images_through_num_images_per_prompt(components):
    # Stock repeats images and masks as a whole batch: a, b, a, b.
    _, ours = pipelines(components)
    inputs = TransformerInputs(ours)
    keep_map = band_map(1.0, 0.75, 0.5, 0.0, edges=FOUR_EDGES)
    maps = [keep_map, np.ascontiguousarray(keep_map[:, ::-1])]
    ours(prompt=["a red apple", "a blue pear"], image=[test_image(SIZE, seed=1), test_image(SIZE, seed=2)],
         height=SIZE, width=SIZE, max_sequence_length=32, map=maps, num_images_per_prompt=2, num_inference_steps=STEPS,
         generator=seeded_generator(), output_type="latent")
    inputs.hook.remove()
    assert len(inputs) == STEPS
    for step, (_, masked_image_latents, mask) in enumerate(inputs):
        mask = unpacked(ours, mask)
        assert torch.equal(mask[:2], mask[2:]) and torch.equal(mask[1], mask[0].flip(-1)), step
        assert torch.equal(masked_image_latents[:2], masked_image_latents[2:]), step
    final_mask = unpacked(ours, inputs[-1][2])
    assert not torch.equal(final_mask[0], final_mask[1])


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_without_a_map_it_is_stock(components, strength):
    stock, ours = pipelines(components)
    mask = mask_of(band_map(1.0, 0.0))
    for output_type in ("latent", "np"):
        run = dict(mask_image=mask, strength=strength, output_type=output_type)
        expected = edit(stock, **run)
        assert (torch.equal if output_type == "latent" else np.array_equal)(edit(ours, **run), expected)
    with pytest.raises(ValueError, match="act on a `map`"):
        edit(ours, mask_image=mask, keep_exact=True)
