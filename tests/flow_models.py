"""Tiny random-weight SD3 and Flux.1 models, so the flow-matching pipelines are tested offline in seconds.

A 2-level VAE (scale factor 2, 4 latent channels): 64 px images give 4 x 32 x 32 latents, which Flux packs into 256
tokens of 16 channels. The size parameters (``layers``, ``heads``, ``head_dim``, ``vae_widths``) build the same blocks
larger for the benchmarks. Tests import this module as ``flow_models``; benchmarks as ``tests.flow_models``.
"""

from functools import partial

import torch
from diffusers import (
    AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
)

from benchmarks.harness import count_unet_calls
from tests.tiny_models import (
    SEED, TEXT_HIDDEN_SIZE, clip_text_model, clip_tokenizer, save_stock, seeded_generator, t5_encoder, t5_tokenizer,
)

FLOW_IMAGE_SIZE = 64
LATENT_CHANNELS = 4


def flow_vae(widths=(8, 16)):
    """A VAE with the shift and scale that SD3 and Flux decode with (they subtract `shift_factor`); its factor is
    2 ** (len(widths) - 1), 2 by default. Widths must be multiples of 4 (the group norm's groups)."""
    torch.manual_seed(SEED)
    return AutoencoderKL(
        block_out_channels=tuple(widths), in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(widths), up_block_types=["UpDecoderBlock2D"] * len(widths),
        layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=4, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035, sample_size=FLOW_IMAGE_SIZE,
    ).eval()


def sd3_components(scheduler=None, layers=1, heads=4, head_dim=8, vae_widths=(8, 16)):
    """Components for ``StableDiffusion3Img2ImgPipeline``: two CLIP encoders and a T5, an MMDiT (1 layer)."""
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = SD3Transformer2DModel(
        sample_size=FLOW_IMAGE_SIZE // 2,  # the pipeline's default size is this many latents
        patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=TEXT_HIDDEN_SIZE,  # T5's width; the two CLIPs' 2 x 32 are cut to it, as in SD3
        caption_projection_dim=heads * head_dim,  # the MMDiT's width, which the text stream shares
        pooled_projection_dim=2 * TEXT_HIDDEN_SIZE,  # both CLIPs' pooled projections side by side
    ).eval()
    return dict(
        transformer=transformer, vae=flow_vae(vae_widths), text_encoder=clip_text_model(clip, with_projection=True),
        text_encoder_2=clip_text_model(clip, with_projection=True), text_encoder_3=t5_encoder(t5), tokenizer=clip,
        tokenizer_2=clip, tokenizer_3=t5, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def rope_axes(head_dim):
    """Rotary embedding widths per axis (frame, row, column) that fill a head, in FLUX.1's proportions: [4, 4, 8]
    for a head of 16 (FLUX.1: [16, 56, 56] for 128; at this size the last two get equal shares)."""
    return [head_dim // 4, head_dim // 4, head_dim // 2]


def flux_components(scheduler=None, layers=1, single_layers=1, heads=2, head_dim=16, vae_widths=(8, 16)):
    """Components for ``FluxImg2ImgPipeline``: CLIP and T5 encoders, a guidance-distilled transformer of `layers`
    double-stream and `single_layers` single-stream blocks (1 + 1)."""
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS,  # the pipeline packs 2x2 latent patches into one token
        num_layers=layers, num_single_layers=single_layers, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=TEXT_HIDDEN_SIZE, pooled_projection_dim=TEXT_HIDDEN_SIZE,
        guidance_embeds=True, axes_dims_rope=rope_axes(head_dim),  # guidance-distilled, as FLUX.1-dev
    ).eval()
    return dict(
        transformer=transformer, vae=flow_vae(vae_widths), text_encoder=clip_text_model(clip),
        text_encoder_2=t5_encoder(t5), tokenizer=clip, tokenizer_2=t5,
        scheduler=scheduler or flux_scheduler(),
    )


def flux_scheduler():
    """FLUX.1's schedule: its shift depends on the image's token count."""
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def count_transformer_calls(pipe):
    """A list that grows by one at every forward call of ``pipe.transformer``: the benchmarks' counter."""
    return count_unet_calls(pipe.transformer)


def x0_and_noise(pipe, pixels, seed=SEED):
    """x0 and noise of preprocessed `pixels` in [-1, 1] as stock flow img2img draws them (VAE sample, then noise,
    from one generator), x0 shifted and scaled as SD3 and Flux do."""
    generator = seeded_generator(seed)
    config = pipe.vae.config
    x0 = (pipe.vae.encode(pixels).latent_dist.sample(generator) - config.shift_factor) * config.scaling_factor
    return x0, torch.randn(x0.shape, generator=generator)


save_sd3 = partial(save_stock, StableDiffusion3Img2ImgPipeline, sd3_components)  # save_sd3(folder) -> folder
save_flux = partial(save_stock, FluxImg2ImgPipeline, flux_components)
