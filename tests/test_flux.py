"""FluxDiffImg2ImgPipeline against stock diffusers, on a tiny random FLUX.1 model.

Flux packs latents into 2x2 patches; the tests unpack them with stock's own `_unpack_latents` and check every pixel
on the latent grid, with maps whose edges fall inside patches.
"""

import copy
import inspect

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, build_pipeline, seeded_generator, test_image
from diffusers import DiffusionPipeline, FlowMatchLCMScheduler, FluxImg2ImgPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from flow_models import bands, count_transformer_calls, flux_components, save_flux, x0_and_noise

from Flux.diff_pipe import FluxDiffImg2ImgPipeline

PROMPT = "a red apple on a table"
STEPS = 6
SIZE = dict(height=64, width=64)  # stock Flux resizes to 1024 px unless told
RUN = dict(**SIZE, max_sequence_length=32)
# Latent columns 0-6 kept; 7-14 strength 0.3 (T*s = 1.8: released at 4); 15-22 strength 0.5 (at 3); 23-31 strength
# 1. Edges at odd columns fall inside 2x2 patches, so a map packed in another order than the latents shows.
BAND_COLUMNS = [slice(0, 7), slice(7, 15), slice(15, 23), slice(23, 32)]
RELEASE = [STEPS, 4, 3, 0]
# At global strength 0.5 the bands' T*s are 0, 0.9, 1.5 and 3, and the run starts at step 3.
HALF_STRENGTH_RELEASE = [STEPS, 5, 4, 3]
FOUR_BANDS = np.concatenate(
    [np.full((64, 2 * (c.stop - c.start)), keep, np.float32) for c, keep in zip(BAND_COLUMNS, [1.0, 0.7, 0.5, 0.0])],
    axis=1,
)


@pytest.fixture(scope="module")
def components():
    return flux_components()


def pipelines(components, scheduler=None):
    """(stock, ours), each with its own copy of `scheduler` (default: the components' flow-matching Euler)."""
    scheduler = scheduler or components["scheduler"]
    return tuple(
        build_pipeline(cls, {**components, "scheduler": copy.deepcopy(scheduler)})
        for cls in (FluxImg2ImgPipeline, FluxDiffImg2ImgPipeline)
    )


def unpack(pipe, latents):
    return pipe._unpack_latents(latents, SIZE["height"], SIZE["width"], pipe.vae_scale_factor)


# FlowMatchHeunDiscreteScheduler does not run here: stock Flux img2img passes `sigmas`, which it does not take.
# FlowMatchLCMScheduler draws fresh noise at every step from torch's global generator, so runs reseed it.
SCHEDULERS = {"euler": None, "lcm": FlowMatchLCMScheduler.from_config(flux_components()["scheduler"].config)}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
# T*s = 3, 2.5 (stock runs 3 steps) and 5; at T = 10, a map of 0.7 holds float32's 0.69999999: T*s = 3.0000001.
@pytest.mark.parametrize("strength, steps", [(0.6, 5), (0.5, 5), (1.0, 5), (0.3, 10)])
def test_uniform_map_is_stock_img2img(components, scheduler, strength, steps):
    stock, ours = pipelines(components, SCHEDULERS[scheduler])
    run = dict(image=test_image(), num_inference_steps=steps, output_type="np", **RUN)
    torch.manual_seed(0)
    expected = stock(PROMPT, strength=strength, generator=seeded_generator(), **run).images
    # A black map at global strength s, and a gray map 1 - s at strength 1: both are s everywhere.
    for keep, global_strength in [(0.0, strength), (1 - strength, 1.0)]:
        torch.manual_seed(0)
        keep_map = np.full((64, 64), keep, np.float32)
        result = ours(PROMPT, map=keep_map, strength=global_strength, generator=seeded_generator(), **run).images
        assert np.array_equal(result, expected)
        assert ours.num_timesteps == stock.num_timesteps


def test_a_strength_whose_product_with_t_falls_just_above_whole_steps_runs_as_many_as_stock(components):
    # Stock starts at int(25 - 25 * 0.56) = int(10.999999999999998) = 10, so it runs 15 steps; so must a black map.
    stock, ours = pipelines(components)
    run = dict(image=test_image(), strength=0.56, num_inference_steps=25, output_type="np", **RUN)
    expected = stock(PROMPT, generator=seeded_generator(), **run).images
    calls = count_transformer_calls(ours)
    result = ours(PROMPT, map=np.zeros((64, 64), np.uint8), generator=seeded_generator(), **run).images
    assert len(calls) == ours.num_timesteps == stock.num_timesteps == 15
    assert np.array_equal(result, expected)


def test_num_images_per_prompt_with_a_uniform_map_is_stock(components):
    stock, ours = pipelines(components)
    run = dict(image=test_image(), num_inference_steps=5, num_images_per_prompt=2, output_type="latent", **RUN)
    expected = stock(PROMPT, strength=0.5, generator=seeded_generator(), **run).images
    result = ours(PROMPT, map=np.full((64, 64), 0.5, np.float32), generator=seeded_generator(), **run).images
    assert torch.equal(result, expected)


def reference_sigmas(scheduler, steps):
    """The sigmas that stock Flux img2img sets for 64 px images, computed here independently of the pipeline."""
    reference = copy.deepcopy(scheduler)
    config = reference.config
    mu = calculate_shift(16 * 16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return reference.sigmas


@pytest.mark.parametrize("strength, release", [(1.0, RELEASE), (0.5, HALF_STRENGTH_RELEASE)])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_frozen_pixels_follow_the_noised_original_and_kept_pixels_end_as_x0(components, scheduler, strength, release):
    _, ours = pipelines(components, SCHEDULERS[scheduler])
    image = test_image()
    x0, noise = x0_and_noise(ours, ours.image_processor.preprocess(image, **SIZE))
    sigmas, first_step = reference_sigmas(ours.scheduler, STEPS), min(release)
    seen = []

    def record(pipe, i, t, kwargs):
        seen.append(unpack(pipe, kwargs["latents"]))
        return kwargs

    torch.manual_seed(0)
    packed = ours(PROMPT, image=image, map=FOUR_BANDS, strength=strength, num_inference_steps=STEPS,
                  generator=seeded_generator(), output_type="latent", callback_on_step_end=record, **RUN).images
    assert packed.shape == (1, 16 * 16, 4 * 4)

    assert len(seen) == STEPS - first_step
    for i, latents in enumerate(seen[:-1]):
        next_step = first_step + i + 1
        noised = sigmas[next_step] * noise + (1 - sigmas[next_step]) * x0
        for columns, band_release in zip(BAND_COLUMNS, release):
            if band_release >= next_step:
                assert torch.equal(latents[..., columns], noised[..., columns]), (i, band_release)
            else:
                assert not torch.allclose(latents[..., columns], noised[..., columns], atol=1e-3), (i, band_release)
    final = unpack(ours, packed)
    kept, *released = BAND_COLUMNS
    assert torch.equal(final[..., kept], x0[..., kept])
    for columns in released:
        assert not torch.allclose(final[..., columns], x0[..., columns], atol=1e-2)


@pytest.mark.parametrize("max_strength, steps_run", [(1.0, 6), (0.5, 3), (0.4, 3), (0.3, 2), (0.05, 1)])
def test_a_map_runs_exactly_the_steps_of_its_strongest_pixel(components, max_strength, steps_run):
    _, ours = pipelines(components)
    calls = count_transformer_calls(ours)
    ours(PROMPT, image=test_image(), map=bands(1.0, 1 - max_strength), num_inference_steps=STEPS,
         generator=seeded_generator(), output_type="latent", **RUN)
    assert len(calls) == steps_run == ours.num_timesteps


def test_a_map_with_nothing_to_release_runs_no_step_and_returns_the_original(components):
    _, ours = pipelines(components)
    calls = count_transformer_calls(ours)
    image = test_image()
    x0, _ = x0_and_noise(ours, ours.image_processor.preprocess(image, **SIZE))
    for keep_map, strength in [(np.ones((64, 64), np.float32), 1.0), (FOUR_BANDS, 0.0)]:
        result = ours(PROMPT, image=image, map=keep_map, strength=strength, generator=seeded_generator(),
                      output_type="latent", **RUN).images
        assert result.shape == (1, 16 * 16, 4 * 4)  # packed, as stock returns latents
        assert torch.equal(unpack(ours, result), x0)
    assert calls == [] and ours.num_timesteps == 0
    pixels = ours(PROMPT, image=image, map=np.ones((64, 64), np.float32), generator=seeded_generator(),
                  output_type="pt", **RUN).images
    config = ours.vae.config
    # The pipeline decodes unpacked, contiguous latents; the VAE's convolutions round differently on other layouts.
    decoded = ours.vae.decode(x0.contiguous() / config.scaling_factor + config.shift_factor).sample
    assert torch.equal(pixels, (decoded / 2 + 0.5).clamp(0, 1))


def test_invert_map_is_the_exact_mirror(components):
    _, ours = pipelines(components)
    run = dict(image=test_image(), num_inference_steps=STEPS, output_type="np", **RUN)
    inverted = ours(PROMPT, map=1 - FOUR_BANDS, invert_map=True, generator=seeded_generator(), **run).images
    plain = ours(PROMPT, map=FOUR_BANDS, generator=seeded_generator(), **run).images
    assert np.array_equal(inverted, plain)
    flipped = ours(PROMPT, map=FOUR_BANDS, invert_map=True, generator=seeded_generator(), **run).images
    assert not np.allclose(flipped, plain, atol=1e-3)


def assert_close_as_batched(batched, alone):
    # Batched and single runs sum in a different order: float32 rounding, relative to the values' scale.
    assert torch.abs(batched - alone).max() <= 1e-4 * alone.abs().max()


def test_batch_of_images_with_their_own_maps_equals_each_run_alone(components):
    _, ours = pipelines(components)
    images, maps = [test_image(seed=1), test_image(seed=2)], [FOUR_BANDS, FOUR_BANDS[:, ::-1].copy()]
    prompts, seeds = ["a red apple", "a blue pear"], [3, 4]
    run = dict(num_inference_steps=STEPS, output_type="latent", **RUN)
    batch = ours(prompts, image=images, map=maps, generator=[seeded_generator(s) for s in seeds], **run).images
    for i in range(2):
        alone = ours(prompts[i], image=images[i], map=maps[i], generator=seeded_generator(seeds[i]), **run).images
        assert_close_as_batched(batch[i], alone[0])
    assert torch.abs(batch[0] - batch[1]).max() > 1e-2


def test_num_images_per_prompt_items_equal_each_run_alone(components):
    # Stock Flux img2img encodes one image with the first generator only, so the second item's x0 is not what its
    # own seed gives alone; given as latents, the image is not encoded, and each item's noise is its own generator's.
    _, ours = pipelines(components)
    x0, _ = x0_and_noise(ours, ours.image_processor.preprocess(test_image(), **SIZE))
    run = dict(image=x0, map=FOUR_BANDS, num_inference_steps=STEPS, output_type="latent", **RUN)
    batch = ours(PROMPT, num_images_per_prompt=2, generator=[seeded_generator(1), seeded_generator(2)], **run).images
    for item, seed in zip(batch, [1, 2]):
        alone = ours(PROMPT, generator=seeded_generator(seed), **run).images
        assert_close_as_batched(item, alone[0])
    assert torch.abs(batch[0] - batch[1]).max() > 1e-2


def test_maps_follow_their_images_through_num_images_per_prompt(components):
    # Stock repeats the whole image batch (a, b, a, b) for num_images_per_prompt; each item keeps its own map's pixels.
    _, ours = pipelines(components)
    images, maps = [test_image(seed=1), test_image(seed=2)], [bands(1.0, 0.0), bands(0.0, 1.0)]
    x0, _ = x0_and_noise(ours, ours.image_processor.preprocess(images, **SIZE))
    packed = ours(["a red apple", "a blue pear"], image=images, map=maps, num_images_per_prompt=2,
                  num_inference_steps=4, generator=seeded_generator(), output_type="latent", **RUN).images
    left, right = slice(0, 16), slice(16, 32)
    for k, item in enumerate(unpack(ours, packed)):
        kept, changed = (left, right) if k % 2 == 0 else (right, left)
        assert torch.equal(item[..., kept], x0[k % 2][..., kept]), k
        assert not torch.allclose(item[..., changed], x0[k % 2][..., changed], atol=1e-2), k


def test_user_step_end_callback_sees_every_step_and_can_change_the_latents(components):
    _, ours = pipelines(components)
    steps_seen = []

    def zero_latents_at_the_end(pipe, i, t, kwargs):
        steps_seen.append(i)
        if i == pipe.num_timesteps - 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return kwargs

    result = ours(PROMPT, image=test_image(), map=FOUR_BANDS, num_inference_steps=STEPS, output_type="latent",
                  generator=seeded_generator(), callback_on_step_end=zero_latents_at_the_end, **RUN).images
    assert steps_seen == list(range(STEPS))
    assert torch.equal(result, torch.zeros_like(result))


def test_signature_is_stock_then_ours():
    stock = inspect.signature(FluxImg2ImgPipeline.__call__).parameters
    ours = inspect.signature(FluxDiffImg2ImgPipeline.__call__).parameters
    ours_only = ["map", "invert_map", "keep_exact", "crop_to_change", "crop_margin", "crop_upscale"]
    assert list(ours) == list(stock) + ours_only
    for name, parameter in stock.items():
        assert ours[name].kind == parameter.kind, name
        assert ours[name].default == (1.0 if name == "strength" else parameter.default), name
    assert [ours[name].kind for name in ours_only] == [inspect.Parameter.KEYWORD_ONLY] * 6
    assert [ours[name].default for name in ours_only] == [None, False, False, False, 32, False]


def test_every_stock_argument_is_passed_through(components, monkeypatch):
    _, ours = pipelines(components)
    received = {}
    stock_call = FluxImg2ImgPipeline.__call__

    def spy(self, **kwargs):
        received.update(kwargs)
        return stock_call(self, **kwargs)

    monkeypatch.setattr(FluxImg2ImgPipeline, "__call__", spy)
    given = dict(prompt_2="a pear", negative_prompt="blurry", true_cfg_scale=1.5, guidance_scale=3.5,
                 joint_attention_kwargs={}, **RUN)
    ours(PROMPT, image=test_image(), map=FOUR_BANDS, num_inference_steps=2, output_type="latent", **given)
    stock_names = set(inspect.signature(stock_call).parameters) - {"self"}
    assert set(received) == stock_names
    assert {name: received[name] for name in given} == given


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_flux(tmp_path_factory.mktemp("flux"))


def test_loading_from_a_folder_as_class_as_custom_pipeline_and_from_pipe(flux_dir):
    by_class = FluxDiffImg2ImgPipeline.from_pretrained(flux_dir)
    by_custom = DiffusionPipeline.from_pretrained(
        flux_dir, custom_pipeline=str(REPO_ROOT / "Flux" / "diff_pipe.py"), trust_remote_code=True
    )
    assert type(by_custom).__name__ == "FluxDiffImg2ImgPipeline"
    from_pipe = FluxDiffImg2ImgPipeline.from_pipe(FluxImg2ImgPipeline.from_pretrained(flux_dir))
    assert type(from_pipe) is FluxDiffImg2ImgPipeline
    run = dict(image=test_image(), map=FOUR_BANDS, num_inference_steps=4, output_type="np", **RUN)
    results = []
    for pipe in (by_class, by_custom, from_pipe):
        pipe.set_progress_bar_config(disable=True)
        results.append(pipe(PROMPT, generator=seeded_generator(), **run).images)
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])


def test_keep_exact_returns_the_input_bytes_where_strength_is_zero(components):
    _, ours = pipelines(components)
    image, keep_map = test_image(), FOUR_BANDS
    run = dict(image=image, map=keep_map, num_inference_steps=STEPS, **RUN)
    exact = np.asarray(ours(PROMPT, keep_exact=True, generator=seeded_generator(), **run).images[0])
    kept = keep_map == 1.0
    assert np.array_equal(exact[kept], np.asarray(image)[kept])
    assert not np.array_equal(exact[~kept], np.asarray(image)[~kept])
    plain = ours(PROMPT, output_type="np", generator=seeded_generator(), **run).images[0]
    exact_np = ours(PROMPT, output_type="np", keep_exact=True, generator=seeded_generator(), **run).images[0]
    assert np.array_equal(exact_np[~kept], plain[~kept])  # strength >= 1/T: the model's output, untouched


def test_keep_exact_blends_strengths_below_one_step_linearly(components):
    # T * s = 0.5: stock flow img2img runs the last step on such a pixel, and keep_exact shows it at half weight.
    _, ours = pipelines(components)
    run = dict(image=test_image(), map=bands(0.9, 0.0), num_inference_steps=5, output_type="pt", **RUN)
    exact = ours(PROMPT, keep_exact=True, generator=seeded_generator(), **run).images
    plain = ours(PROMPT, generator=seeded_generator(), **run).images
    original = ours.image_processor.preprocess(test_image(), **SIZE) / 2 + 0.5
    assert torch.allclose(exact[..., :32], 0.5 * plain[..., :32] + 0.5 * original[..., :32], atol=1e-6)
    assert torch.equal(exact[..., 32:], plain[..., 32:])


def test_keep_exact_with_nothing_to_change_is_the_input_itself(components):
    _, ours = pipelines(components)
    calls = count_transformer_calls(ours)
    image = test_image()
    result = ours(PROMPT, image=image, map=np.ones((64, 64), np.float32), keep_exact=True, **RUN).images[0]
    assert np.array_equal(np.asarray(result), np.asarray(image)) and calls == []


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(map=[np.zeros((64, 64))] * 3), "3 maps for 1 images"),
        (dict(map=np.zeros((64, 32))), "aspect ratio"),
        (dict(map=None), "`map`"),
        (dict(strength=1.5), "strength"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(latents=torch.zeros(1, 256, 16)), "`latents` is not supported"),
        (dict(keep_exact=True, output_type="latent"), "keep_exact"),
        (dict(image=torch.zeros(1, 4, 16, 16)), "height=32 and width=32"),
    ],
)
def test_bad_arguments_are_refused_clearly(components, change, message):
    _, ours = pipelines(components)
    run = {**dict(image=test_image(), map=np.zeros((64, 64), np.float32), num_inference_steps=4, **RUN), **change}
    with pytest.raises(ValueError, match=message):
        ours(PROMPT, **run)
