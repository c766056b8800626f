"""The tiny models in conftest.py are real diffusers pipelines: they run, save, reload and chain like the real ones."""

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline, IFImg2ImgPipeline, IFImg2ImgSuperResolutionPipeline, KandinskyV22Img2ImgPipeline,
    KandinskyV22PriorPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline,
)

from conftest import (
    IF_STAGE1_SIZE, IF_STAGE2_SIZE, IMAGE_SIZE, SCHEDULERS, TEXT_HIDDEN_SIZE, build_pipeline, clip_tokenizer,
    if_stage1_components, if_stage2_components, kandinsky_decoder_components, kandinsky_prior_components,
    load_pipeline, saved_as_none, sd_components, sdxl_components, sdxl_refiner_components, seeded_generator,
    t5_tokenizer, test_image,
)

PROMPT = "a photo of a cat"
STEPS = 4


def latent_inputs(**overrides):
    inputs = dict(prompt=PROMPT, image=test_image(), strength=0.75, num_inference_steps=STEPS, guidance_scale=5.0,
                  output_type="np", generator=seeded_generator())
    return {**inputs, **overrides}


def kandinsky_decoder_inputs():
    embeds, negative = (torch.randn(1, TEXT_HIDDEN_SIZE, generator=seeded_generator(seed)) for seed in (1, 2))
    inputs = latent_inputs(image_embeds=embeds, negative_image_embeds=negative, height=IMAGE_SIZE, width=IMAGE_SIZE)
    del inputs["prompt"]
    return inputs


def if_stage1_inputs():
    # Caption cleaning needs beautifulsoup4 and ftfy, which the project does not depend on.
    return latent_inputs(clean_caption=False)


def if_stage2_inputs():
    low_res, original = test_image(IF_STAGE1_SIZE), test_image(IF_STAGE2_SIZE)
    return latent_inputs(image=low_res, original_image=original, clean_caption=False)


RGB_64 = (1, 64, 64, 3)

# (saved folder fixture, pipeline class, component builder, inputs, expected image shape)
FAMILIES = {
    "sd": ("sd_dir", StableDiffusionImg2ImgPipeline, sd_components, latent_inputs, RGB_64),
    "sdxl_base": ("sdxl_base_dir", StableDiffusionXLImg2ImgPipeline, sdxl_components, latent_inputs, RGB_64),
    "sdxl_refiner": ("sdxl_refiner_dir", StableDiffusionXLImg2ImgPipeline, sdxl_refiner_components, latent_inputs,
                     RGB_64),
    "kandinsky_decoder": ("kandinsky_decoder_dir", KandinskyV22Img2ImgPipeline, kandinsky_decoder_components,
                          kandinsky_decoder_inputs, RGB_64),
    "if_stage1": ("if_stage1_dir", IFImg2ImgPipeline, if_stage1_components, if_stage1_inputs, (1, 32, 32, 3)),
    "if_stage2": ("if_stage2_dir", IFImg2ImgSuperResolutionPipeline, if_stage2_components, if_stage2_inputs, RGB_64),
}


def plain_reload(folder):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_pipeline_runs_and_reloads_identically(family, request):
    dir_fixture, pipeline_class, components, inputs, shape = FAMILIES[family]
    in_memory = build_pipeline(pipeline_class, components())
    expected = in_memory(**inputs()).images
    assert expected.shape == shape and np.isfinite(expected).all()
    assert expected.std() > 0, "a constant image means the models are not wired together"
    if family in ("sd", "sdxl_base", "kandinsky_decoder"):  # the latent grid is half the image
        latents = in_memory(**{**inputs(), "output_type": "latent"}).images
        assert latents.shape == (1, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)

    folder = request.getfixturevalue(dir_fixture)
    if family == "if_stage2":
        # diffusers 0.42 does not count stage II's watermarker as optional, so a plain from_pretrained of this folder
        # fails; load_pipeline passes watermarker=None because the folder records it as absent.
        assert "watermarker" in saved_as_none(folder)
        reloaded = load_pipeline(folder)
    else:
        reloaded = plain_reload(folder)
    assert type(reloaded) is pipeline_class
    # Same seed, same weights: the saved folder must reproduce the in-memory pipeline bit for bit.
    np.testing.assert_array_equal(reloaded(**inputs()).images, expected)


def prior_inputs():
    return dict(prompt=PROMPT, num_inference_steps=2, output_type="pt", generator=seeded_generator())


def test_kandinsky_prior_gives_nonzero_embeddings_reloads_and_feeds_the_decoder(kandinsky_prior_dir):
    prior = build_pipeline(KandinskyV22PriorPipeline, kandinsky_prior_components())
    out = prior(**prior_inputs())
    assert out.image_embeds.shape == out.negative_image_embeds.shape == (1, TEXT_HIDDEN_SIZE)
    assert out.image_embeds.abs().sum() > 0, "a zero clip_std turns every embedding into zeros"
    reloaded = plain_reload(kandinsky_prior_dir)
    assert type(reloaded) is KandinskyV22PriorPipeline
    assert torch.equal(reloaded(**prior_inputs()).image_embeds, out.image_embeds)
    decoder = build_pipeline(KandinskyV22Img2ImgPipeline, kandinsky_decoder_components())
    inputs = kandinsky_decoder_inputs()
    inputs.update(image_embeds=out.image_embeds, negative_image_embeds=out.negative_image_embeds)
    assert decoder(**inputs).images.shape == RGB_64


def test_sdxl_base_latents_feed_the_refiner_and_if_stage1_output_feeds_stage2():
    base_components = sdxl_components()
    base = build_pipeline(StableDiffusionXLImg2ImgPipeline, base_components)
    refiner = build_pipeline(StableDiffusionXLImg2ImgPipeline, sdxl_refiner_components(base_components))
    latents = base(**latent_inputs(output_type="latent")).images
    refined = refiner(**latent_inputs(image=latents, strength=0.5)).images
    assert refined.shape == RGB_64
    # IF stage I's output feeds stage II.
    stage1 = build_pipeline(IFImg2ImgPipeline, if_stage1_components())
    low_res = stage1(**{**if_stage1_inputs(), "output_type": "pt"}).images
    assert low_res.shape == (1, 3, IF_STAGE1_SIZE, IF_STAGE1_SIZE)
    stage2 = build_pipeline(IFImg2ImgSuperResolutionPipeline, if_stage2_components())
    assert stage2(**{**if_stage2_inputs(), "image": low_res}).images.shape == RGB_64


def test_builders_are_deterministic():
    first, second = sdxl_components(refiner=True), sdxl_components()
    # The standalone refiner's VAE is built the same way as the base's, so its weights match too.
    for name, weight in first["vae"].state_dict().items():
        assert torch.equal(weight, second["vae"].state_dict()[name]), name
    first_unet, second_unet = sd_components()["unet"].state_dict(), sd_components()["unet"].state_dict()
    assert all(torch.equal(first_unet[name], second_unet[name]) for name in first_unet)


def test_clip_tokenizer_has_a_real_vocabulary_and_t5s_its_layout(tmp_path):
    tokenizer = clip_tokenizer(tmp_path)
    assert len(tokenizer) > 2
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").exists()
    ids = tokenizer("the").input_ids
    assert ids == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("the</w>"), tokenizer.eos_token_id]
    assert tokenizer.model_max_length == 77
    tokenizer = t5_tokenizer()  # T5's layout
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer(PROMPT).input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids


def test_test_image_is_deterministic_and_structured():
    image = np.asarray(test_image())
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.array_equal(image, np.asarray(test_image()))
    assert not np.array_equal(image, np.asarray(test_image(seed=1)))
    assert np.asarray(test_image(IF_STAGE1_SIZE)).shape == (IF_STAGE1_SIZE, IF_STAGE1_SIZE, 3)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_named_scheduler_runs_sd(name):
    pipe = build_pipeline(StableDiffusionImg2ImgPipeline, sd_components(scheduler=name))
    assert type(pipe.scheduler) is SCHEDULERS[name]
    assert pipe(**latent_inputs(num_inference_steps=2, strength=1.0)).images.shape == RGB_64


def test_fixtures_give_the_builders_results(sdxl_components, sdxl_refiner_components, generator, image):
    # The refiner shares the base's VAE and second text encoder, and has no first one.
    assert sdxl_refiner_components["vae"] is sdxl_components["vae"]
    assert sdxl_refiner_components["text_encoder_2"] is sdxl_components["text_encoder_2"]
    assert sdxl_refiner_components["text_encoder"] is None and sdxl_refiner_components["tokenizer"] is None
    assert sdxl_components["unet"].config.projection_class_embeddings_input_dim == 80
    assert sdxl_refiner_components["unet"].config.projection_class_embeddings_input_dim == 72
    assert torch.equal(torch.randn(3, generator=generator), torch.randn(3, generator=seeded_generator()))
    assert np.array_equal(np.asarray(image), np.asarray(test_image()))
