"""Tiny random-weight Chroma, Qwen-Image and Z-Image models, for offline tests in seconds, with flow_models' VAE
where the family uses a plain `AutoencoderKL` (Qwen-Image's VAE takes ``vae_levels``) and its size parameters."""

from functools import partial

import torch
from diffusers import (
    AutoencoderKLQwenImage, ChromaImg2ImgPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler,
    QwenImageImg2ImgPipeline, QwenImageTransformer2DModel, ZImageImg2ImgPipeline, ZImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen3Config, Qwen3Model

from tests.flow_models import LATENT_CHANNELS, flow_vae, flux_scheduler, rope_axes
from tests.tiny_models import (
    SEED, TEXT_HIDDEN_SIZE, byte_level_alphabet, save_stock, seeded_generator, t5_encoder, t5_tokenizer,
)


def chroma_components(scheduler=None, layers=1, single_layers=1, heads=2, head_dim=16, vae_widths=(8, 16)):
    """Components for ``ChromaImg2ImgPipeline``: a T5 encoder and a transformer of `layers` double-stream and
    `single_layers` single-stream blocks (1 + 1) with a tiny approximator."""
    t5 = t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS,  # the pipeline packs 2x2 latent patches into one token
        num_layers=layers, num_single_layers=single_layers, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=TEXT_HIDDEN_SIZE, axes_dims_rope=rope_axes(head_dim), approximator_num_channels=8,
        approximator_hidden_dim=32, approximator_layers=1,
    ).eval()
    return dict(transformer=transformer, vae=flow_vae(vae_widths), text_encoder=t5_encoder(t5), tokenizer=t5,
                scheduler=scheduler or flux_scheduler())  # Flux's schedule


QWEN_MERGES = [("t", "h"), ("th", "e"), ("i", "n"), ("in", "g"), ("a", "n"), ("an", "d")]
QWEN_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]  # the chat template that Qwen-Image wraps prompts in
# Z-Image formats prompts with the tokenizer's chat template; this is the shape of Qwen3's, without the thinking part.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer():
    """A Qwen2 byte-level BPE tokenizer with a tiny vocabulary: every byte, a few merges and Qwen's special tokens."""
    merged = [a + b for a, b in QWEN_MERGES]
    vocab = {token: i for i, token in enumerate(byte_level_alphabet() + merged + ["<|endoftext|>"])}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=QWEN_MERGES)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def qwen2_5_vl_encoder(tokenizer):
    """A 2-layer Qwen2.5-VL of width 16; Qwen-Image reads only its text path."""
    torch.manual_seed(SEED)
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            rope_scaling=dict(mrope_section=[1, 1, 2], rope_type="default", type="default"), rope_theta=1e6,
            vocab_size=len(tokenizer), bos_token_id=end_of_text, eos_token_id=end_of_text, pad_token_id=end_of_text,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16, vocab_size=len(tokenizer),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_vae(levels=2):
    """A Qwen-Image VAE of `levels` levels (scale factor 2 ** (levels - 1), 4 channels) whose latent mean and std
    are not 0 and 1, so that the normalisation stock applies is tested too."""
    torch.manual_seed(SEED)
    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4, 4][:levels], num_res_blocks=1,
        temperal_downsample=[False] * (levels - 1),
        latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 1.2],
    ).eval()


def qwenimage_components(scheduler=None, layers=1, heads=2, head_dim=16, vae_levels=2):
    """Components for ``QwenImageImg2ImgPipeline``: a tiny Qwen2.5-VL encoder and an MMDiT (1 layer)."""
    tokenizer = qwen_tokenizer()
    torch.manual_seed(SEED)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * LATENT_CHANNELS,  # the pipeline packs 2x2 latent patches into one token
        out_channels=LATENT_CHANNELS, num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=16, guidance_embeds=False,  # as Qwen-Image
        axes_dims_rope=tuple(rope_axes(head_dim)[::-1]),  # (8, 4, 4) for a head of 16
    ).eval()
    return dict(
        transformer=transformer, vae=qwen_vae(vae_levels), text_encoder=qwen2_5_vl_encoder(tokenizer),
        tokenizer=tokenizer,
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
            max_image_seq_len=8192),
    )


def qwen_x0_and_noise(pipe, pixels, seed=SEED):
    """x0 and noise of preprocessed (B, 3, H, W) `pixels` as stock Qwen-Image img2img draws them, in the (B, C, 1, H, W)
    layout that `_unpack_latents` gives; x0 normalised with the VAE's latent mean and std."""
    generator = seeded_generator(seed)
    config = pipe.vae.config
    latents = pipe.vae.encode(pixels[:, :, None]).latent_dist.sample(generator)
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
    x0 = (latents - mean) * (1.0 / std)
    noise = torch.randn(x0.transpose(1, 2).shape, generator=generator).transpose(1, 2)
    return x0, noise



def qwen3_encoder(tokenizer):
    """A 2-layer Qwen3 of width 16: Z-Image reads its second-to-last hidden states."""
    torch.manual_seed(SEED)
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=512, bos_token_id=end_of_text,
        eos_token_id=end_of_text, pad_token_id=end_of_text,
    )
    return Qwen3Model(config).eval()


def zimage_components(scheduler=None, layers=1, refiner_layers=1, heads=2, head_dim=16, vae_widths=(8, 16)):
    """Components for ``ZImageImg2ImgPipeline``: a tiny Qwen3 encoder and a single-stream transformer of `layers` main
    and `refiner_layers` refiner blocks (1 + 1), which makes its own 2x2 patches of unpacked (B, C, H, W) latents."""
    tokenizer = qwen_tokenizer()
    torch.manual_seed(SEED)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=LATENT_CHANNELS, dim=heads * head_dim,
        n_layers=layers, n_refiner_layers=refiner_layers, n_heads=heads, n_kv_heads=heads, norm_eps=1e-5,
        qk_norm=True, cap_feat_dim=16,  # the text encoder's width
        rope_theta=256.0, t_scale=1000.0, axes_lens=[256, 32, 32],
        axes_dims=rope_axes(head_dim)[::-1],  # [8, 4, 4] for a head of 16
    ).eval()
    return dict(transformer=transformer, vae=flow_vae(vae_widths), text_encoder=qwen3_encoder(tokenizer),
                tokenizer=tokenizer,
                scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0))  # Z-Image-Turbo's fixed shift


# save_chroma(folder) and the others: the stock pipeline saved (tiny_models.save_stock)
save_chroma = partial(save_stock, ChromaImg2ImgPipeline, chroma_components)
save_qwenimage = partial(save_stock, QwenImageImg2ImgPipeline, qwenimage_components)
save_zimage = partial(save_stock, ZImageImg2ImgPipeline, zimage_components)
