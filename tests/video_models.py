"""Tiny random-weight Wan 2.1 models, so the video pipelines are tested offline in a fraction of a second.

diffusers' own test configs (tests/pipelines/wan/test_wan_video_to_video.py) with the local T5 tokenizer: a VAE that
downsamples 8x in space and 4x in time (frame 0 alone, then groups of 4: 17 frames give 5 latent frames of 16
channels), and a 2-layer transformer on 1x2x2 patches. 17 frames of 16x16 px run in about 0.1 s. The size parameters
(``layers``, ``heads``, ``head_dim``, ``ffn_dim``, ``vae_base_dim``, ``vae_dim_mult``, ``vae_res_blocks``) build the
same blocks larger for the benchmarks.
"""

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

from tests.tiny_models import SEED, TEXT_HIDDEN_SIZE, t5_encoder, t5_tokenizer


def wan_scheduler():
    """The Wan 2.1 releases' scheduler: UniPC on flow sigmas with their shift of 3 (480p). diffusers' test builds
    `UniPCMultistepScheduler(flow_shift=3.0)`, which ignores the shift without `use_flow_sigmas`."""
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def wan_components(scheduler=None, spatial_factor=8, layers=2, heads=2, head_dim=12, ffn_dim=32, vae_base_dim=3,
                   vae_dim_mult=None, vae_res_blocks=1):
    """Components for ``WanVideoToVideoPipeline``. `spatial_factor` 4 drops one level of the VAE (still 4x in
    time), so that 64 px frames have the 16x16 latents of the contract's images. `vae_dim_mult` gives the VAE's
    widths as multiples of `vae_base_dim`, one per level (default all 1; Wan 2.1's is [1, 2, 4, 4] of 96)."""
    torch.manual_seed(SEED)
    levels = {8: ([1, 1, 1, 1], [False, True, True]), 4: ([1, 1, 1], [True, True])}[spatial_factor]
    vae = AutoencoderKLWan(base_dim=vae_base_dim, z_dim=16, dim_mult=vae_dim_mult or levels[0],
                           num_res_blocks=vae_res_blocks, temperal_downsample=levels[1]).eval()
    tokenizer = t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16, out_channels=16,
        text_dim=TEXT_HIDDEN_SIZE, freq_dim=256, ffn_dim=ffn_dim, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    return dict(transformer=transformer, vae=vae, scheduler=scheduler or wan_scheduler(),
                text_encoder=t5_encoder(tokenizer), tokenizer=tokenizer)
