"""Tiny random-weight Wan 2.1 models, so the video pipelines are tested offline in a fraction of a second.

diffusers' own test configs (tests/pipelines/wan/test_wan_video_to_video.py) with the local T5 tokenizer: a VAE that
downsamples 8x in space and 4x in time (frame 0 alone, then groups of 4: 17 frames give 5 latent frames of 16
channels), and a 2-layer transformer on 1x2x2 patches. 17 frames of 16x16 px run in about 0.1 s.
"""

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

from tests.tiny_models import SEED, TEXT_HIDDEN_SIZE, t5_encoder, t5_tokenizer


def wan_scheduler():
    """The Wan 2.1 releases' scheduler: UniPC on flow sigmas with their shift of 3 (480p). diffusers' test builds
    `UniPCMultistepScheduler(flow_shift=3.0)`, which ignores the shift without `use_flow_sigmas`."""
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def wan_components(scheduler=None, spatial_factor=8):
    """Components for ``WanVideoToVideoPipeline``. `spatial_factor` 4 drops one level of the VAE (still 4x in
    time), so that 64 px frames have the 16x16 latents of the contract's images."""
    torch.manual_seed(SEED)
    levels = {8: ([1, 1, 1, 1], [False, True, True]), 4: ([1, 1, 1], [True, True])}[spatial_factor]
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=levels[0], num_res_blocks=1,
                           temperal_downsample=levels[1]).eval()
    tokenizer = t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=TEXT_HIDDEN_SIZE, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    return dict(transformer=transformer, vae=vae, scheduler=scheduler or wan_scheduler(),
                text_encoder=t5_encoder(tokenizer), tokenizer=tokenizer)
