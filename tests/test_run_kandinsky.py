"""What only Kandinsky/run.py does: its prior's flags and embeddings, and a batch through prior and decoder, in this
process on tiny saved models. tests/test_run_contract.py checks what every run.py does, Kandinsky's among them."""

import numpy as np
import pytest
import torch
from conftest import test_image

from Kandinsky import run as kandinsky_run
from tools import cli


def models(prior_dir, decoder_dir):
    return ["--prior", prior_dir, "--model", decoder_dir, "--device", "cpu", "--height", "64", "--width", "64"]


def parse(*argv):
    return cli.parse_args(kandinsky_run.build_parser(), [str(arg) for arg in argv])


@pytest.fixture(scope="module")
def pipelines(kandinsky_prior_dir, kandinsky_decoder_dir):
    args = parse(*models(kandinsky_prior_dir, kandinsky_decoder_dir))
    loaded = kandinsky_run.load_pipelines(args)
    for pipe in loaded:
        pipe.set_progress_bar_config(disable=True)
    return loaded


@pytest.mark.parametrize("argv, message", [
    (["--height", "100"], "--height: must be a multiple of 64"), (["--width", "0"], "--width"),
    (["--image-weight", "1.5"], "--image-weight"), (["--prior-guidance-scale", "-1"], "--prior-guidance-scale"),
    (["--prior-steps", "1"], "--prior-steps: must be a whole number from 2"),  # UnCLIP divides by steps - 1
])
def test_flags_of_kandinsky_are_checked_before_loading(argv, message):
    with pytest.raises(cli.CliError, match=message):
        parse("--device", "cpu", *argv)


def test_image_weight_mixes_the_clip_embedding_of_the_image(pipelines, kandinsky_prior_dir, kandinsky_decoder_dir):
    prior, image = pipelines.prior, test_image()
    settings = lambda weight: parse(*models(kandinsky_prior_dir, kandinsky_decoder_dir),  # noqa: E731
                                    "--prior-steps", "2", "--image-weight", weight)
    embeddings = lambda weight, prompt: kandinsky_run.image_embeddings(  # noqa: E731
        prior, settings(weight), image, prompt, "blurry", seed=3)
    text_only, negative = embeddings(0, "a red apple")
    image_only = kandinsky_run.clip_image_embedding(prior, image)
    mixed, mixed_negative = embeddings(0.3, "a red apple")
    assert torch.equal(mixed, 0.3 * image_only + 0.7 * text_only)
    assert torch.equal(mixed_negative, negative)  # the negative prompt's embedding is the prior's alone
    assert torch.equal(embeddings(1, "a red apple")[0], embeddings(1, "a blue pear")[0])
    assert not torch.allclose(text_only, image_only, atol=1e-3)
    # Without a negative prompt the negative embedding is the prior's empty-image embedding, diffusers' default.
    _, no_negative = kandinsky_run.image_embeddings(prior, settings(0), image, "a red apple", "", seed=3)
    assert torch.equal(no_negative, prior.get_zero_embed())


def test_edit_of_a_batch_gives_each_item_as_alone(pipelines, kandinsky_prior_dir, kandinsky_decoder_dir):
    args = parse(*models(kandinsky_prior_dir, kandinsky_decoder_dir), "--steps", "6", "--prior-steps", "2")
    keep_map = np.ones((64, 64), np.float32)
    keep_map[:, :32] = 0.0
    items = dict(images=[test_image(seed=1), test_image(seed=2)], maps=[keep_map, 1 - keep_map],
                 prompts=["a red apple", "a blue pear"], negative_prompts=["blurry", ""], seeds=[4, 5])
    batch, steps_run = kandinsky_run.edit(pipelines, args, **items)
    assert steps_run == 6 and [image.size for image in batch] == [(64, 64)] * 2
    for i in range(2):
        (alone,), _ = kandinsky_run.edit(pipelines, args, **{key: value[i : i + 1] for key, value in items.items()})
        # Batched kernels add in another order: a few levels of 255 at most (test_kandinsky checks maps exactly).
        difference = np.abs(np.asarray(batch[i], np.int16) - np.asarray(alone, np.int16))
        assert difference.max() <= 3
    assert np.abs(np.asarray(batch[0], np.int16) - np.asarray(batch[1], np.int16)).max() > 50

