"""FLUX.1 Kontext's own resize (#23): the map follows the image to the preferred resolution nearest its aspect ratio.
The contract (tests/test_contract.py) runs Kontext at the image's own size; here stock's list of resolutions is
shrunk to tiny ones, for stock and ours alike, so that the resize runs on the tiny model."""

import numpy as np
import PIL.Image
import torch
from conftest import build_pipeline, seeded_generator, test_image
from diffusers import FluxKontextInpaintPipeline
from diffusers.pipelines.flux import pipeline_flux_kontext_inpaint
from flow_models import flux_components

from Flux import diff_pipe_kontext
from Flux.diff_pipe_kontext import FluxKontextDiffInpaintPipeline

TINY_RESOLUTIONS = [(32, 64), (48, 48), (64, 32)]  # (width, height), as stock lists them


def test_the_map_follows_the_image_to_the_kontext_resolution_as_stocks_mask_does(monkeypatch):
    for module in (pipeline_flux_kontext_inpaint, diff_pipe_kontext):
        monkeypatch.setattr(module, "PREFERRED_KONTEXT_RESOLUTIONS", TINY_RESOLUTIONS)
    components = flux_components()
    stock, ours = (build_pipeline(cls, components) for cls in (FluxKontextInpaintPipeline,
                                                               FluxKontextDiffInpaintPipeline))
    image = test_image(80).resize((40, 80))  # 1:2, so edited at 32 x 64 px
    keep_map = np.ones((80, 40), np.float32)
    keep_map[40:] = 0  # the lower half changes: whole 2x2 patches of latents at 32 x 64 px
    mask = PIL.Image.fromarray(((1 - keep_map) * 255).astype(np.uint8))
    run = dict(prompt="a red apple", image=image, strength=0.5, num_inference_steps=4, max_sequence_length=32,
               output_type="latent")
    expected = stock(**run, mask_image=mask, generator=seeded_generator()).images
    result = ours(**run, map=keep_map, generator=seeded_generator()).images
    assert result.shape == expected.shape == (1, 16 * 8, 16) and torch.equal(result, expected)
    assert ours(**{**run, "output_type": "pil"}, map=keep_map, generator=seeded_generator()).images[0].size == (32, 64)
