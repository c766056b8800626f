"""KandinskyV22DiffImg2ImgPipeline against stock diffusers, on a tiny random Kandinsky 2.2 prior and decoder."""

import copy

import numpy as np
import pytest
import torch
from conftest import (
    KANDINSKY_SCHEDULE,
    build_pipeline,
    count_unet_calls,
    kandinsky_decoder_components,
    kandinsky_prior_components,
    make_scheduler,
    seeded_generator,
    test_image,
)
from diffusers import DiffusionPipeline, KandinskyV22Img2ImgPipeline, KandinskyV22PriorPipeline
from diffusers.callbacks import PipelineCallback

from Kandinsky.diff_pipe import KandinskyV22DiffImg2ImgPipeline

SIZE = 64
LATENT = 32  # 64 px on a MoVQ with scale factor 2


@pytest.fixture(scope="module")
def components():
    return kandinsky_decoder_components()


def pipelines(components, scheduler="ddim"):
    components = {**components, "scheduler": make_scheduler(scheduler, KANDINSKY_SCHEDULE)}
    return build_pipeline(KandinskyV22Img2ImgPipeline, components), build_pipeline(
        KandinskyV22DiffImg2ImgPipeline, components
    )


def embeds(seed, batch=1):
    """Stand-ins for the prior's image embeddings (size 32), one row per prompt."""
    return torch.randn(batch, 32, generator=seeded_generator(seed))


def conditioning(seed=1, batch=1):
    return dict(image_embeds=embeds(seed, batch), negative_image_embeds=embeds(seed + 100, batch),
                height=SIZE, width=SIZE)


def three_band_map(height=SIZE, width=SIZE):
    """Left third kept, middle third at strength 0.5, right third changed fully."""
    keep_map = np.ones((height, width), np.float32)
    keep_map[:, width // 3 : 2 * width // 3] = 0.5
    keep_map[:, 2 * width // 3 :] = 0.0
    return keep_map


def independent_x0_and_noise(pipe, image, height=SIZE, width=SIZE, seed=0):
    """x0 and noise as stock Kandinsky img2img makes them: the MoVQ's unquantised latents, then one noise draw."""
    pixels = pipe.image_processor.preprocess(image, height, width)
    with torch.no_grad():
        # Stock copies the latents with torch.cat; the MoVQ decodes the encoder's strided layout a few ulps apart.
        x0 = pipe.movq.encode(pixels).latents.contiguous()
    return x0, torch.randn(x0.shape, generator=seeded_generator(seed))


def decoded(pipe, latents):
    """Latents decoded and postprocessed as stock does it."""
    with torch.no_grad():
        return pipe.image_processor.postprocess(pipe.movq.decode(latents, force_not_quantize=True).sample, "np")


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
@pytest.mark.parametrize("strength", [0.25, 0.5, 1.0])
def test_uniform_map_is_stock_img2img(components, scheduler, strength):
    stock, ours = pipelines(components, scheduler)
    image, steps = test_image(), 8
    expected = stock(image=image, strength=strength, num_inference_steps=steps, generator=seeded_generator(),
                     output_type="np", **conditioning()).images
    # A black map at global strength s, and a gray map 1 - s at strength 1: both are s everywhere.
    for keep, global_strength in [(0.0, strength), (1 - strength, 1.0)]:
        ours.scheduler = copy.deepcopy(stock.scheduler)
        keep_map = np.full((SIZE, SIZE), keep, np.float32)
        result = ours(image=image, map=keep_map, strength=global_strength, num_inference_steps=steps,
                      generator=seeded_generator(), output_type="np", **conditioning()).images
        assert np.array_equal(result, expected)
        assert ours.num_timesteps == int(steps * strength)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_frozen_pixels_follow_the_noised_original_and_kept_pixels_end_as_x0(components, scheduler):
    _, ours = pipelines(components, scheduler)
    image, keep_map, steps = test_image(), three_band_map(), 10
    x0, noise = independent_x0_and_noise(ours, image)
    reference_scheduler = copy.deepcopy(ours.scheduler)
    reference_scheduler.set_timesteps(steps)
    seen = []

    def record(pipe, i, t, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs

    final = ours(image=image, map=keep_map, num_inference_steps=steps, generator=seeded_generator(),
                 output_type="latent", callback_on_step_end=record, **conditioning()).images

    # Columns of the latent grid: kept (release step 10), half (release step 5), changed (release step 0).
    kept, half, changed = slice(0, LATENT // 3), slice(LATENT // 3 + 1, 2 * LATENT // 3 - 1), slice(-8, None)
    assert len(seen) == steps  # the changed band releases at step 0, so every step runs
    for i, latents in enumerate(seen[:-1]):
        next_step = i + 1
        timestep = reference_scheduler.timesteps[next_step : next_step + 1]
        noised = reference_scheduler.add_noise(x0, noise, timestep)
        assert torch.equal(latents[..., kept], noised[..., kept])
        if next_step <= 5:
            assert torch.equal(latents[..., half], noised[..., half])
        else:
            assert not torch.allclose(latents[..., half], noised[..., half], atol=1e-3)
        assert not torch.allclose(latents[..., changed], noised[..., changed], atol=1e-3)
    assert torch.equal(final[..., kept], x0[..., kept])
    assert not torch.allclose(final[..., changed], x0[..., changed], atol=1e-2)


@pytest.mark.parametrize("height, width, grid", [(48, 64, (24, 32)), (49, 65, (24, 32)), (None, None, (32, 32))])
def test_the_map_lands_on_the_grid_stock_makes_from_height_and_width(components, height, width, grid):
    # The image is resized to height x width, rounded down to the MoVQ factor (None keeps the image's size).
    _, ours = pipelines(components)
    image = test_image()
    keep_map = np.zeros((SIZE, SIZE), np.float32)
    keep_map[: SIZE // 2] = 1.0  # the top half is kept
    x0, _ = independent_x0_and_noise(ours, image, height, width)
    final = ours(image=image, map=keep_map, num_inference_steps=4, generator=seeded_generator(),
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
    result = ours(map=np.full((SIZE, SIZE), 0.5, np.float32), generator=seeded_generator(),
                  **{**run, "height": 48, "width": 64}).images
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
        ours(map=three_band_map(64, 200), generator=seeded_generator(), **run)


@pytest.mark.parametrize("max_strength, unet_calls", [(0.5, 10), (0.3, 6), (0.05, 1)])
def test_steps_before_the_first_release_never_run(components, max_strength, unet_calls):
    _, ours = pipelines(components)
    calls = count_unet_calls(ours)
    keep_map = np.ones((SIZE, SIZE), np.float32)
    keep_map[:, 32:] = 1 - max_strength
    ours(image=test_image(), map=keep_map, num_inference_steps=20, generator=seeded_generator(),
         output_type="latent", **conditioning())
    assert len(calls) == unet_calls == ours.num_timesteps


def test_a_white_map_runs_no_step_and_returns_the_original(components):
    _, ours = pipelines(components)
    calls = count_unet_calls(ours)
    image = test_image()
    x0, _ = independent_x0_and_noise(ours, image)
    for keep_map, strength in [(np.ones((SIZE, SIZE), np.float32), 1.0), (three_band_map(), 0.0)]:
        result = ours(image=image, map=keep_map, strength=strength, generator=seeded_generator(),
                      output_type="latent", **conditioning()).images
        assert torch.equal(result, x0)
    assert calls == [] and ours.num_timesteps == 0
    white = np.ones((SIZE, SIZE), np.float32)
    pixels = ours(image=image, map=white, generator=seeded_generator(), output_type="pt", **conditioning()).images
    with torch.no_grad():
        expected = (ours.movq.decode(x0, force_not_quantize=True).sample / 2 + 0.5).clamp(0, 1)
    assert torch.equal(pixels, expected)
    # Batches too: one x0 per output image, in stock's order (a, a, b, b).
    images = [test_image(seed=1), test_image(seed=2)]
    batch = ours(image=images, map=white, num_images_per_prompt=2, output_type="latent",
                 **conditioning(batch=2)).images
    x0_batch = torch.cat([independent_x0_and_noise(ours, images)[0]])
    assert torch.equal(batch, x0_batch.repeat_interleave(2, dim=0))
    assert calls == []


def test_invert_map_is_the_exact_mirror(components):
    _, ours = pipelines(components)
    keep_map = three_band_map()
    run = dict(image=test_image(), num_inference_steps=10, output_type="np", **conditioning())
    inverted = ours(map=1 - keep_map, invert_map=True, generator=seeded_generator(), **run).images
    plain = ours(map=keep_map, generator=seeded_generator(), **run).images
    assert np.array_equal(inverted, plain)
    flipped = ours(map=keep_map, invert_map=True, generator=seeded_generator(), **run).images
    assert not np.allclose(flipped, plain, atol=1e-3)


# Stock's own batches differ from single runs by up to 2e-3 on this tiny random model (batched kernels add in
# another order, and random weights amplify it); a map on the wrong image differs by more than 0.5. Kept pixels and
# uniform maps are checked exactly.
BATCH_TOLERANCE = 1e-2


def test_num_images_per_prompt_items_equal_each_run_alone(components):
    _, ours = pipelines(components, "ddpm")  # DDPM draws from the generators at every step as well
    run = dict(image=test_image(), map=three_band_map(), num_inference_steps=6, output_type="np", **conditioning())
    batch = ours(num_images_per_prompt=2, generator=[seeded_generator(1), seeded_generator(2)], **run).images
    for item, seed in zip(batch, [1, 2]):
        alone = ours(generator=seeded_generator(seed), **run).images[0]
        assert np.abs(item - alone).max() <= BATCH_TOLERANCE
    assert np.abs(batch[0] - batch[1]).max() > 0.5


def test_batch_of_images_with_their_own_maps_equals_each_run_alone(components):
    # With num_images_per_prompt = 2 stock orders the outputs a, a, b, b: each map must follow its image there.
    _, ours = pipelines(components)
    images, maps = [test_image(seed=1), test_image(seed=2)], [three_band_map(), 1 - three_band_map()]
    image_embeds, negative_image_embeds = embeds(1, batch=2), embeds(2, batch=2)
    seeds = [3, 4, 5, 6]
    run = dict(num_inference_steps=6, height=SIZE, width=SIZE)
    batch = ours(image_embeds=image_embeds, negative_image_embeds=negative_image_embeds, image=images, map=maps,
                 num_images_per_prompt=2, generator=[seeded_generator(s) for s in seeds], output_type="latent",
                 **run).images
    x0 = independent_x0_and_noise(ours, images)[0].repeat_interleave(2, dim=0)
    kept = [slice(0, LATENT // 3), slice(-8, None)]  # where each image's own map keeps it
    for item, seed, i in zip(range(4), seeds, [0, 0, 1, 1]):
        assert torch.equal(batch[item, ..., kept[i]], x0[item, ..., kept[i]])
        alone = ours(image_embeds=image_embeds[i : i + 1], negative_image_embeds=negative_image_embeds[i : i + 1],
                     image=images[i], map=maps[i], generator=seeded_generator(seed), output_type="np", **run).images
        assert np.abs(decoded(ours, batch[item : item + 1]) - alone).max() <= BATCH_TOLERANCE


def test_a_batch_under_a_uniform_map_is_stock_img2img(components):
    stock, ours = pipelines(components, "ddpm")
    run = dict(image=[test_image(seed=1), test_image(seed=2)], num_images_per_prompt=2, num_inference_steps=6,
               output_type="np", **conditioning(batch=2))
    generators = lambda: [seeded_generator(s) for s in range(4)]  # noqa: E731
    expected = stock(strength=0.5, generator=generators(), **run).images
    result = ours(map=np.full((SIZE, SIZE), 0.5, np.float32), generator=generators(), **run).images
    assert np.array_equal(result, expected)


def test_one_map_is_shared_by_a_batch(components):
    _, ours = pipelines(components)
    generators = lambda: [seeded_generator(5), seeded_generator(6)]  # noqa: E731
    run = dict(image=[test_image(seed=1), test_image(seed=2)], num_inference_steps=6, output_type="np",
               **conditioning(batch=2))
    shared = ours(map=three_band_map(), generator=generators(), **run).images
    repeated = ours(map=[three_band_map()] * 2, generator=generators(), **run).images
    assert np.array_equal(shared, repeated)


def test_user_step_end_callback_sees_blended_latents_and_can_change_them(components):
    _, ours = pipelines(components)
    steps_seen = []

    def zero_latents_at_the_end(pipe, i, t, kwargs):
        steps_seen.append(i)
        if i == pipe.num_timesteps - 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return kwargs

    result = ours(image=test_image(), map=three_band_map(), num_inference_steps=10, output_type="latent",
                  generator=seeded_generator(), callback_on_step_end=zero_latents_at_the_end,
                  **conditioning()).images
    assert steps_seen == list(range(10))
    assert torch.equal(result, torch.zeros_like(result))


class SwapEmbeddingsAtHalfway(PipelineCallback):
    """From the middle step on, guide towards other image embeddings: stock reads `image_embeds` back each step."""

    tensor_inputs = ["image_embeds"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == pipeline.num_timesteps // 2:
            negative, _ = callback_kwargs["image_embeds"].chunk(2)  # stock passes them stacked for guidance
            return {"image_embeds": torch.cat([negative, embeds(7)])}
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


def test_takes_the_embeddings_of_the_stock_prior():
    prior = build_pipeline(KandinskyV22PriorPipeline, kandinsky_prior_components())
    image_embeds, negative_image_embeds = prior("a red apple", negative_prompt="blurry", num_inference_steps=2,
                                                generator=seeded_generator()).to_tuple()
    stock, ours = pipelines(kandinsky_decoder_components())
    run = dict(image_embeds=image_embeds, negative_image_embeds=negative_image_embeds, image=test_image(),
               height=SIZE, width=SIZE, num_inference_steps=6, output_type="np")
    expected = stock(strength=0.5, generator=seeded_generator(), **run).images
    result = ours(map=np.full((SIZE, SIZE), 0.5, np.float32), generator=seeded_generator(), **run).images
    assert np.array_equal(result, expected)


def test_loading_from_a_folder_as_class_and_as_custom_pipeline(kandinsky_decoder_dir):
    by_class = KandinskyV22DiffImg2ImgPipeline.from_pretrained(kandinsky_decoder_dir)
    by_custom = DiffusionPipeline.from_pretrained(
        kandinsky_decoder_dir, custom_pipeline="Kandinsky/diff_pipe.py", trust_remote_code=True
    )
    assert type(by_custom).__name__ == "KandinskyV22DiffImg2ImgPipeline"
    from_pipe = KandinskyV22DiffImg2ImgPipeline.from_pipe(
        KandinskyV22Img2ImgPipeline.from_pretrained(kandinsky_decoder_dir)
    )
    run = dict(image=test_image(), map=three_band_map(), num_inference_steps=4, output_type="np", **conditioning())
    results = []
    for pipe in (by_class, by_custom, from_pipe):
        pipe.set_progress_bar_config(disable=True)
        results.append(pipe(generator=seeded_generator(), **run).images)
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(map=[np.zeros((SIZE, SIZE))] * 3), ValueError, "3 maps for 1 images"),
        (dict(map=np.zeros((SIZE, 32))), ValueError, "aspect ratio"),
        (dict(map=None), ValueError, "`map`"),
        (dict(image_embeds=None), ValueError, "KandinskyV22PriorPipeline"),
        (dict(strength=1.5), ValueError, "strength"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(image=np.zeros((SIZE, SIZE, 3), np.uint8)), ValueError, "PIL image, a torch tensor"),
        (dict(prompt="a red apple"), TypeError, "KandinskyV22PriorPipeline"),
        (dict(height=50), ValueError, "multiples of 4"),
        (dict(num_images_per_prompt=2, guidance_scale=1.0), ValueError, "guidance_scale"),
    ],
)
def test_bad_arguments_are_refused_clearly(components, change, error, message):
    _, ours = pipelines(components)
    run = {**dict(image=test_image(), map=np.zeros((SIZE, SIZE), np.float32), num_inference_steps=4),
           **conditioning(), **change}
    with pytest.raises(error, match=message):
        ours(**run)


def test_keep_exact_returns_the_input_bytes_where_strength_is_zero(components):
    _, ours = pipelines(components)
    image, keep_map = test_image(), three_band_map()
    run = dict(image=image, map=keep_map, num_inference_steps=10, **conditioning())
    exact = np.asarray(ours(keep_exact=True, generator=seeded_generator(), **run).images[0])
    kept = keep_map == 1.0
    assert np.array_equal(exact[kept], np.asarray(image)[kept])
    assert not np.array_equal(exact[~kept], np.asarray(image)[~kept])
    plain = ours(output_type="np", generator=seeded_generator(), **run).images[0]
    exact_np = ours(output_type="np", keep_exact=True, generator=seeded_generator(), **run).images[0]
    assert np.array_equal(exact_np[~kept], plain[~kept])  # strength >= 1/T: the model's output, untouched


def test_keep_exact_follows_each_image_through_a_batch(components):
    _, ours = pipelines(components)
    images, maps = [test_image(seed=1), test_image(seed=2)], [three_band_map(), three_band_map()[:, ::-1]]
    batch = ours(image=images, map=maps, num_images_per_prompt=2, keep_exact=True, num_inference_steps=6,
                 generator=[seeded_generator(s) for s in range(4)], **conditioning(batch=2)).images
    for result, i in zip(batch, [0, 0, 1, 1]):
        kept = maps[i] == 1.0
        assert np.array_equal(np.asarray(result)[kept], np.asarray(images[i])[kept])


def test_keep_exact_with_nothing_to_change_is_the_input_itself(components):
    _, ours = pipelines(components)
    calls = count_unet_calls(ours)
    image = test_image()
    result = ours(image=image, map=np.ones((SIZE, SIZE), np.float32), keep_exact=True, **conditioning()).images[0]
    assert np.array_equal(np.asarray(result), np.asarray(image)) and calls == []


def test_keep_exact_blends_strengths_below_one_step_linearly(components):
    _, ours = pipelines(components)
    steps, strength = 10, 0.05  # T * s = 0.5: never released, shown at half weight
    keep_map = np.full((SIZE, SIZE), 1 - strength, np.float32)
    keep_map[:, 32:] = 0.0
    run = dict(image=test_image(), map=keep_map, num_inference_steps=steps, output_type="pt", **conditioning())
    exact = ours(keep_exact=True, generator=seeded_generator(), **run).images
    plain = ours(generator=seeded_generator(), **run).images
    original = ours.image_processor.preprocess(test_image()) / 2 + 0.5
    expected = 0.5 * plain[..., :32] + 0.5 * original[..., :32]
    # The weight is T * (1 - float32(0.95)), one float32 rounding away from 0.5.
    assert torch.allclose(exact[..., :32], expected, rtol=0, atol=1e-6)


def test_keep_exact_refuses_latent_output(components):
    _, ours = pipelines(components)
    with pytest.raises(ValueError, match="keep_exact"):
        ours(image=test_image(), map=three_band_map(), keep_exact=True, output_type="latent", **conditioning())


def test_keep_exact_with_a_global_strength_below_one_blends_half_and_half(components):
    # The weight is clamp(T * strength * (1 - map), 0, 1): keep 0.9 at strength 0.5 over 10 steps gives 0.5.
    _, ours = pipelines(components)
    keep_map = np.full((SIZE, SIZE), 0.9, np.float32)
    keep_map[:, 32:] = 0.0  # strength 0.5 here: released at step 5, so steps run
    run = dict(image=test_image(), map=keep_map, strength=0.5, num_inference_steps=10, output_type="pt",
               **conditioning())
    exact = ours(keep_exact=True, generator=seeded_generator(), **run).images
    plain = ours(generator=seeded_generator(), **run).images
    original = ours.image_processor.preprocess(test_image()) / 2 + 0.5
    assert (plain[..., :32] - original[..., :32]).abs().max() > 0.1  # the MoVQ round trip is far from the input
    # float32 keeps 1 - 0.9 as 0.10000002: the weight is 0.5000001.
    assert torch.allclose(exact[..., :32], 0.5 * plain[..., :32] + 0.5 * original[..., :32], atol=1e-6)
    assert torch.equal(exact[..., 32:], plain[..., 32:])
