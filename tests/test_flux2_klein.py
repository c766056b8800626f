"""What is particular to FLUX.2 [klein] inpainting with a map (the contract is tests/test_contract.py's): stock's own
sizes for large images, and a map that acts per latent where stock's mask acts per token of 2x2 latents."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import build_pipeline, seeded_generator
from diffusers import Flux2KleinInpaintPipeline
from families import FAMILIES, band_map

from Flux2.diff_pipe import Flux2KleinDiffInpaintPipeline
from tests.edit_models import flux2_klein_components

ENTRY = FAMILIES["flux2_klein"]


class Stop(Exception):
    """Ends a stock call once it has shown the size it preprocesses the image at."""


@pytest.mark.parametrize("size", [(1100, 1000), (1025, 1024), (3000, 350), (700, 500), (1024, 1024)])
def test_the_working_size_is_stocks_for_images_over_a_megapixel_too(size):
    stock = build_pipeline(Flux2KleinInpaintPipeline, flux2_klein_components())
    ours = Flux2KleinDiffInpaintPipeline.from_pipe(stock)
    seen = []

    def preprocess(image, height, width, **options):
        seen.append(((image.height, image.width), (height, width)))
        raise Stop

    stock.image_processor.preprocess = preprocess  # the size stock shrinks the image to, then edits it at
    image = PIL.Image.new("RGB", size)
    with pytest.raises(Stop):
        stock(prompt="a pear", image=image, mask_image=PIL.Image.new("L", size, 255))
    assert ours.working_size(image) == ((size[1], size[0]), *seen[0])


def test_the_map_holds_each_latent_and_a_map_that_releases_nothing_gives_stocks_kept_latents():
    """A keep map whose edge falls inside a token (latent column 7 of 32) keeps latent column 6 exactly, beside a
    released column 7; what a white map returns is those kept latents as stock de-normalises them, here with a VAE
    whose batch-norm mean is not 0."""
    components = flux2_klein_components()
    components["vae"].bn.running_mean.copy_(torch.linspace(-0.7, 0.9, 16))
    ours = build_pipeline(Flux2KleinDiffInpaintPipeline, components)
    inputs = {**ENTRY.inputs(0), "output_type": "latent"}
    kept = ours(**inputs, map=np.ones((64, 64), np.float32), generator=seeded_generator()).images
    edited = ours(**inputs, map=band_map(1.0, 0.0, edges=[0, 14, 64]), num_inference_steps=4,
                  generator=seeded_generator()).images
    assert torch.equal(edited[..., :7], kept[..., :7])
    assert not torch.allclose(edited[..., 7], kept[..., 7], atol=1e-2)
