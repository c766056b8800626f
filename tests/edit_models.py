"""Tiny random-weight models of the instruction editors' inpainting pipelines (design notes, section 8), for offline
tests in a fraction of a second. The size parameters (``layers``, ``heads``, ``head_dim``, ``vae_widths``) build the
same blocks larger for the benchmarks.

FLUX.2 [klein]: diffusers' own test configs (tests/pipelines/flux2/test_pipeline_flux2_klein_inpaint.py) with the
local Qwen tokenizer of flow_models2, and 4 latent channels (as flow_models' VAE) where diffusers' test has 1: with one
channel, some latent of a run ends within 1e-2 of x0 by chance, where the contract checks that none does unless it is
kept. Its VAE has one level by default, so a 32 px image is 4 x 32 x 32 latents, which the pipeline folds into 16 x 16
tokens of 16 channels.
"""

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinInpaintPipeline, Flux2Transformer2DModel
from transformers import Qwen3ForCausalLM

from tests.flow_models import LATENT_CHANNELS, flux_scheduler
from tests.flow_models2 import qwen3_encoder, qwen_tokenizer
from tests.tiny_models import SEED, build_pipeline, save_pipeline

# FLUX.2 normalises its latents, folded into 2x2 patches, with the VAE's batch-norm statistics; stock's latent output
# is the latents de-normalised. A mean of 0 and a std of exactly 2 (eps 0) keep that round trip exact, so that a test
# can set stock's latent output beside the loop's latents and x0 bit for bit, and still see the scaling.
FLUX2_LATENT_STD = 2.0


def flux2_vae(widths=(4,)):
    """FLUX.2's VAE with `len(widths)` levels (scale factor 2 ** (len(widths) - 1): 1 by default) and 4 latent
    channels, its batch-norm statistics set to mean 0 and std `FLUX2_LATENT_STD`."""
    torch.manual_seed(SEED)
    vae = AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=tuple(widths), layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        batch_norm_eps=0.0,
    ).eval()
    vae.bn.running_var.fill_(FLUX2_LATENT_STD**2)
    return vae


def flux2_klein_components(scheduler=None, layers=1, single_layers=1, heads=2, head_dim=16, vae_widths=(4,),
                           text_layers=2):
    """Components for ``Flux2KleinInpaintPipeline``: a 2-layer Qwen3 causal LM of width 16 (pass
    ``text_encoder_out_layers=(1,)``: stock stacks those hidden states as the prompt), a transformer of `layers`
    double-stream and `single_layers` single-stream blocks (1 + 1), not distilled (guidance is true CFG, two calls a
    step), and FLUX.1's scheduler config, which FLUX.2 shares (its pipeline computes the shift itself)."""
    tokenizer = qwen_tokenizer()
    config = qwen3_encoder(tokenizer).config
    config = type(config)(**{**config.to_dict(), "num_hidden_layers": text_layers, "layer_types": None})
    torch.manual_seed(SEED)
    text_encoder = Qwen3ForCausalLM(config).eval()
    torch.manual_seed(SEED)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS,  # the pipeline folds 2x2 latent patches into one token
        num_layers=layers, num_single_layers=single_layers, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=config.hidden_size,  # one hidden-state layer of the text encoder
        timestep_guidance_channels=256, axes_dims_rope=[head_dim // 4] * 4, guidance_embeds=False,
    ).eval()
    return dict(transformer=transformer, vae=flux2_vae(vae_widths), text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=scheduler or flux_scheduler())



def save_flux2_klein(folder):
    """A stock FLUX.2 [klein] inpainting pipeline for Flux2/run.py, saved: it runs on stock's defaults, so its text
    encoder has the 28 layers whose hidden states (9, 18, 27) stock stacks, and its VAE the real factor 8, which with
    the 2x2 patches makes stock round sizes to 16 px as the real model does."""
    components = flux2_klein_components(vae_widths=(8, 8, 8, 8), text_layers=28)
    width = components["text_encoder"].config.hidden_size
    config = {name: value for name, value in components["transformer"].config.items() if not name.startswith("_")}
    torch.manual_seed(SEED)
    components["transformer"] = Flux2Transformer2DModel.from_config({**config, "joint_attention_dim": 3 * width})
    return save_pipeline(build_pipeline(Flux2KleinInpaintPipeline, components), folder)
