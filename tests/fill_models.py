"""Tiny random-weight FLUX.1 Fill components: flow_models' FLUX.1 pieces, with a transformer that reads the latents,
the masked image's latents and the mask side by side, as FLUX.1 Fill's does."""

import torch
from diffusers import FluxTransformer2DModel

from tests.flow_models import LATENT_CHANNELS, flux_components
from tests.tiny_models import SEED


def flux_fill_components(scheduler=None, layers=1, single_layers=1, heads=2, head_dim=16, vae_widths=(8, 16)):
    """Components for ``FluxFillPipeline``. A token is a 2x2 patch of latents: 4C latent channels, 4C masked-image
    channels, and the mask at pixel resolution, f x f values a latent (f the VAE's factor), so 4 f^2 channels:
    16 + 16 + 16 here, 64 + 64 + 256 for the real model."""
    components = flux_components(scheduler, layers, single_layers, heads, head_dim, vae_widths)
    factor = 2 ** (len(vae_widths) - 1)
    # Without its private keys, which list out_channels among the values left at their default.
    config = {name: value for name, value in components["transformer"].config.items() if not name.startswith("_")}
    config.update(in_channels=4 * LATENT_CHANNELS * 2 + 4 * factor**2, out_channels=4 * LATENT_CHANNELS)
    torch.manual_seed(SEED)
    components["transformer"] = FluxTransformer2DModel.from_config(config).eval()
    return components
