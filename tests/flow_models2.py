"""Tiny random-weight Chroma, Qwen-Image and Z-Image models, for offline tests in seconds.

They share flow_models' 2-level VAE (scale factor 2, 4 latent channels) where the family uses diffusers' plain
`AutoencoderKL`: 64 px images give 4 x 32 x 32 latents.
"""

import torch
from conftest import SEED, TEXT_HIDDEN_SIZE, build_pipeline, save_pipeline, t5_encoder, t5_tokenizer
from diffusers import ChromaImg2ImgPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
from flow_models import LATENT_CHANNELS, flow_vae


def chroma_components(scheduler=None):
    """Components for ``ChromaImg2ImgPipeline``: a T5 encoder and a 1+1-layer transformer with a tiny approximator."""
    t5 = t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # the pipeline packs 2x2 latent patches into one token
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN_SIZE,
        axes_dims_rope=[4, 4, 8],
        approximator_num_channels=8,
        approximator_hidden_dim=32,
        approximator_layers=1,
    ).eval()
    return dict(
        transformer=transformer,
        vae=flow_vae(),
        text_encoder=t5_encoder(t5),
        tokenizer=t5,
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        ),
    )


def save_chroma(folder):
    """A tiny stock Chroma img2img pipeline saved as a diffusers folder, for from_pretrained and run.py --model."""
    return save_pipeline(build_pipeline(ChromaImg2ImgPipeline, chroma_components()), folder)
