"""Tiny random-weight models of all four families, built in code: the tests' models, and larger ones for benchmarks.

Every builder seeds torch before each model and puts it in eval mode, as ``from_pretrained`` does: a fresh model is in
train mode, whose VAE decodes a last bit apart from its saved copy. Default sizes (64 px test images): SD, SDXL and
Kandinsky 2.2 have 2-level VAEs (4 x 32 x 32 latents); IF stage I works at 32 px, stage II at 64 px. The size
parameters (``widths``, ``vae_widths``, ``text_width``...) build the same blocks larger for the benchmarks.
"""

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from diffusers import (
    AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler, PNDMScheduler, PriorTransformer, UNet2DConditionModel, UnCLIPScheduler, VQModel,
)
from PIL import Image
from torch import nn
from transformers import (
    CLIPImageProcessorPil, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionConfig,
    CLIPVisionModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer,
)

SEED = 0
IMAGE_SIZE = 64
IF_STAGE1_SIZE = 32
IF_STAGE2_SIZE = 64
TEXT_HIDDEN_SIZE = 32
SDXL_TIME_EMBED_DIM = 8

# Small inputs


def test_image(size=IMAGE_SIZE, seed=SEED):
    """A deterministic RGB image with gradients, a disc and mild noise, so that edits are visible."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2) < 0.08
    rgb = np.stack([x, y, np.where(disc, 1.0, 0.2)], axis=-1)
    rgb = rgb + rng.normal(0, 0.05, rgb.shape)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), mode="RGB")


test_image.__test__ = False  # a builder, not a test, even when a test module imports it


def seeded_generator(seed=SEED):
    """A CPU generator: CPU draws are the same on every machine, so outputs can be compared exactly."""
    return torch.Generator("cpu").manual_seed(seed)


def build_pipeline(pipeline_class, components):
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, folder):
    """Save ``pipe`` as a diffusers folder and return the folder's path."""
    pipe.save_pretrained(folder)
    return Path(folder)


def save_stock(pipeline_class, builder, folder):
    """The stock pipeline on the builder's components, saved as a diffusers folder: returns the folder."""
    return save_pipeline(build_pipeline(pipeline_class, builder()), folder)


# Tokenizers

CLIP_MERGES = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("in", "g</w>"), ("a", "n"), ("an", "d</w>")]


def byte_level_alphabet():
    """The 256 printable stand-ins that byte-level BPE uses for raw bytes (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # The other bytes take the code points from 256 upwards.
    remapped = range(256, 256 + 256 - len(printable))
    return [chr(c) for c in [*printable, *remapped]]


def clip_tokenizer(folder=None):
    """A CLIP tokenizer with a tiny byte-level BPE vocabulary, written to ``folder`` (a temporary one if None)."""
    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            return clip_tokenizer(tmp)
    folder, alphabet = Path(folder), byte_level_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in CLIP_MERGES]
    # Special tokens last, as in the real CLIP vocabulary.
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    merges = "\n".join(f"{a} {b}" for a, b in CLIP_MERGES)
    (folder / "merges.txt").write_text(f"#version: 0.2\n{merges}\n")
    # SD pipelines pad prompts to model_max_length, so it must be the real 77.
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    # A failed load returns an empty 2-token tokenizer instead of raising.
    assert len(tokenizer) > 2, f"CLIP tokenizer in {folder} did not load"
    return tokenizer


T5_CORPUS = [
    "a photo of a cat sitting on a red chair", "a painting of a mountain lake at sunset",
    "an astronaut riding a horse on the moon", "a bowl of fruit on a wooden table",
    "a dog running through a field of flowers", "a city street at night with neon lights",
    "a portrait of a woman in a blue dress", "a small boat on a calm sea under clouds",
]


def t5_tokenizer():
    """A T5 tokenizer from a SentencePiece unigram model trained in-process on a few captions."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(T5_CORPUS * 4), model_writer=model, model_type="unigram", vocab_size=64,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,  # T5's layout: no bos
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=77)
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1, "T5 special tokens out of place"
    return tokenizer


# Schedulers

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler,
              "euler_a": EulerAncestralDiscreteScheduler, "dpm++": DPMSolverMultistepScheduler, "pndm": PNDMScheduler}

# The noise schedule that SD 1.x/2.x and SDXL ship with; each scheduler class ignores keys it lacks.
LATENT_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       steps_offset=1, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False,
                       skip_prk_steps=True)

# Kandinsky 2.2's decoder uses a linear schedule.
KANDINSKY_SCHEDULE = {**LATENT_SCHEDULE, "beta_schedule": "linear"}


def make_scheduler(name, schedule=LATENT_SCHEDULE):
    """A scheduler by short name (see ``SCHEDULERS``) on the given noise schedule."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(schedule)


def if_scheduler():
    """IF's DDPM setup: cosine schedule, learned variance and dynamic thresholding."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", thresholding=True,
                         dynamic_thresholding_ratio=0.95, sample_max_value=1.0, prediction_type="epsilon",
                         variance_type="learned_range")


# Shared tiny models


def up_blocks(down_block_types):
    """The decoder half of a UNet: the down blocks' counterparts, deepest first."""
    return tuple(block.replace("Down", "Up") for block in reversed(down_block_types))


def clip_text_model(tokenizer, with_projection=False, hidden_size=TEXT_HIDDEN_SIZE):
    torch.manual_seed(SEED)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    # Ids come from the tokenizer: the pooled output is read at the first eos token.
    return cls(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_size=hidden_size, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, projection_dim=hidden_size, hidden_act="gelu",
    )).eval()


def tiny_vae(widths=(32, 64)):
    """An SD-style VAE; its scale factor is 2 ** (levels - 1): 2 by default, 8 (the real one's) with 4 widths."""
    torch.manual_seed(SEED)
    return AutoencoderKL(
        block_out_channels=list(widths), in_channels=3, out_channels=3, latent_channels=4, sample_size=IMAGE_SIZE,
        down_block_types=["DownEncoderBlock2D"] * len(widths), up_block_types=["UpDecoderBlock2D"] * len(widths),
    ).eval()


def latent_unet(cross_attention_dim, widths=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                **sdxl_kwargs):
    torch.manual_seed(SEED)
    return UNet2DConditionModel(
        block_out_channels=tuple(widths), layers_per_block=2, sample_size=IMAGE_SIZE // 2, in_channels=4,
        out_channels=4, down_block_types=tuple(down_block_types), up_block_types=up_blocks(down_block_types),
        cross_attention_dim=cross_attention_dim, **sdxl_kwargs,
    ).eval()


# Stable Diffusion 1.x / 2.x


def sd_components(scheduler="ddim", widths=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  vae_widths=(32, 64), text_width=TEXT_HIDDEN_SIZE):
    """Components for ``StableDiffusionImg2ImgPipeline``: ``down_block_types`` has one entry per UNet level (SD's own
    has cross-attention on all but the deepest); ``text_width`` is the text encoder's, which cross-attention reads."""
    tokenizer = clip_tokenizer()
    return dict(
        unet=latent_unet(text_width, widths, down_block_types), vae=tiny_vae(vae_widths),
        text_encoder=clip_text_model(tokenizer, hidden_size=text_width), tokenizer=tokenizer,
        scheduler=make_scheduler(scheduler), safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )


# SDXL


def sdxl_unet(refiner, widths=(32, 64), text_width=TEXT_HIDDEN_SIZE):
    """SDXL's UNet layout: a plain top level, then cross-attention levels with more heads and transformer layers."""
    levels = len(widths)
    # The added conditioning is the time ids (6 numbers, or 5 when an aesthetic score replaces the target size),
    # each embedded in SDXL_TIME_EMBED_DIM, plus text_encoder_2's pooled projection.
    time_ids = 5 if refiner else 6
    # Cross-attention sees the concatenated hidden states of every text encoder the stage has.
    encoders = 1 if refiner else 2
    return latent_unet(
        encoders * text_width, widths, ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        attention_head_dim=tuple(2 ** (level + 1) for level in range(levels)), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        transformer_layers_per_block=(1,) + (2,) * (levels - 1),
        projection_class_embeddings_input_dim=time_ids * SDXL_TIME_EMBED_DIM + text_width,
    )


def sdxl_components(refiner=False, scheduler="euler", widths=(32, 64), vae_widths=(32, 64),
                    text_width=TEXT_HIDDEN_SIZE):
    """Components for ``StableDiffusionXLImg2ImgPipeline``: the base, or with ``refiner=True`` a standalone refiner,
    whose own VAE and second text encoder have the base's weights (``sdxl_refiner_components(base)`` shares them)."""
    if refiner:
        return sdxl_refiner_components(None, scheduler, widths, vae_widths, text_width)
    tokenizer = clip_tokenizer()
    return dict(
        unet=sdxl_unet(False, widths, text_width), vae=tiny_vae(vae_widths),
        text_encoder=clip_text_model(tokenizer, hidden_size=text_width),
        text_encoder_2=clip_text_model(tokenizer, with_projection=True, hidden_size=text_width),
        tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=make_scheduler(scheduler), image_encoder=None,
        feature_extractor=None, requires_aesthetics_score=False,
    )


def sdxl_refiner_components(base=None, scheduler="euler", widths=(32, 64), vae_widths=(32, 64),
                            text_width=TEXT_HIDDEN_SIZE):
    """Refiner components; given the base's components, it reuses their VAE and second text encoder, as SDXL does."""
    if base is None:
        tokenizer_2 = clip_tokenizer()
        text_encoder_2 = clip_text_model(tokenizer_2, with_projection=True, hidden_size=text_width)
        vae = tiny_vae(vae_widths)
    else:
        tokenizer_2, text_encoder_2, vae = base["tokenizer_2"], base["text_encoder_2"], base["vae"]
        text_width = text_encoder_2.config.hidden_size
    return dict(
        unet=sdxl_unet(True, widths, text_width), vae=vae, text_encoder=None, text_encoder_2=text_encoder_2,
        tokenizer=None, tokenizer_2=tokenizer_2, scheduler=make_scheduler(scheduler), image_encoder=None,
        feature_extractor=None, requires_aesthetics_score=True,
    )


# Kandinsky 2.2

KANDINSKY_CLIP_IMAGE_SIZE = 32


def kandinsky_prior_components():
    """Components for ``KandinskyV22PriorPipeline``; its image embeddings have size 32."""
    tokenizer = clip_tokenizer()
    torch.manual_seed(SEED)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=TEXT_HIDDEN_SIZE, num_layers=1)
    # A fresh prior has clip_std = 0, which multiplies every output to zero.
    prior.clip_std = nn.Parameter(torch.ones(prior.clip_std.shape))
    prior.eval()
    # The pipeline encodes a black image of this size for the unconditional embedding, so keep it small.
    return dict(
        prior=prior, image_encoder=clip_image_encoder(), text_encoder=clip_text_model(tokenizer, with_projection=True),
        tokenizer=tokenizer,
        scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                                  clip_sample=True, clip_sample_range=10.0),
        image_processor=clip_image_processor(),
    )


def clip_image_encoder():
    """A CLIP image encoder of 32 px images, with image embeddings of size 32 (Kandinsky's prior, IP-Adapters)."""
    torch.manual_seed(SEED)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=TEXT_HIDDEN_SIZE, projection_dim=TEXT_HIDDEN_SIZE, image_size=KANDINSKY_CLIP_IMAGE_SIZE,
        patch_size=8, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
    )).eval()


def clip_image_processor():
    return CLIPImageProcessorPil(
        size=KANDINSKY_CLIP_IMAGE_SIZE, crop_size=KANDINSKY_CLIP_IMAGE_SIZE, do_center_crop=True, do_normalize=True,
        do_resize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711], resample=3,
    )


def kandinsky_decoder_components(scheduler="ddim", widths=(32, 64), layers_per_block=1, attention_head_dim=4,
                                 movq_widths=(32, 64), embedding_width=TEXT_HIDDEN_SIZE):
    """Components for ``KandinskyV22Img2ImgPipeline`` (image embeddings of ``embedding_width``), in Kandinsky 2.2's
    layout: a ResNet top level, then simple cross-attention levels; a MoVQ with attention at its deepest level."""
    down_block_types = ("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (len(widths) - 1)
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=8,  # mean and variance, as in the real decoder
        addition_embed_type="image", down_block_types=down_block_types, up_block_types=up_blocks(down_block_types),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=tuple(widths),
        layers_per_block=layers_per_block, encoder_hid_dim=embedding_width, encoder_hid_dim_type="image_proj",
        cross_attention_dim=embedding_width, attention_head_dim=attention_head_dim,
        resnet_time_scale_shift="scale_shift", class_embed_type=None, sample_size=IMAGE_SIZE // 2,
    ).eval()
    movq_blocks = ["DownEncoderBlock2D"] * (len(movq_widths) - 1) + ["AttnDownEncoderBlock2D"]
    torch.manual_seed(SEED)
    movq = VQModel(
        block_out_channels=list(movq_widths), down_block_types=movq_blocks,
        up_block_types=[block.replace("DownEncoder", "UpDecoder") for block in reversed(movq_blocks)],
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
        num_vq_embeddings=12, vq_embed_dim=4,
    ).eval()
    return dict(unet=unet, scheduler=make_scheduler(scheduler, KANDINSKY_SCHEDULE), movq=movq)


# DeepFloyd IF


def t5_encoder(tokenizer, d_model=TEXT_HIDDEN_SIZE):
    torch.manual_seed(SEED)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        dropout_rate=0.0,  # a fresh model is in train mode; dropout would make embeddings random
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config).eval()


def if_unet(sample_size, super_resolution, widths=(32, 64), layers_per_block=1, attention_head_dim=8,
            text_width=TEXT_HIDDEN_SIZE):
    """IF's pixel-space UNet layout: a ResNet top level, then simple cross-attention levels reading T5 states."""
    down_block_types = ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * (len(widths) - 1)
    torch.manual_seed(SEED)
    # Stage II sees the noisy image and the upscaled stage I image side by side, and a noise-level class label.
    stage2 = dict(class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu",
                  time_embedding_dim=widths[0])
    return UNet2DConditionModel(
        sample_size=sample_size,  # the pipelines resize their input to this: it is the stage's output size
        layers_per_block=layers_per_block, block_out_channels=list(widths), down_block_types=down_block_types,
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", up_block_types=list(up_blocks(down_block_types)),
        in_channels=6 if super_resolution else 3, out_channels=6,  # mean and learned variance
        cross_attention_dim=text_width, encoder_hid_dim=text_width, attention_head_dim=attention_head_dim,
        addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift", act_fn="gelu", **(stage2 if super_resolution else {}),
    ).eval()


def _if_text_components(text_width):
    tokenizer = t5_tokenizer()
    return dict(tokenizer=tokenizer, text_encoder=t5_encoder(tokenizer, text_width))


_IF_NO_EXTRAS = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)


def if_stage1_components(sample_size=IF_STAGE1_SIZE, text_width=TEXT_HIDDEN_SIZE, **unet_sizes):
    """Components for ``IFImg2ImgPipeline`` making ``sample_size`` px images; ``unet_sizes`` go to ``if_unet``."""
    return dict(**_if_text_components(text_width), scheduler=if_scheduler(), **_IF_NO_EXTRAS,
                unet=if_unet(sample_size, super_resolution=False, text_width=text_width, **unet_sizes))


def if_stage2_components(sample_size=IF_STAGE2_SIZE, text_width=TEXT_HIDDEN_SIZE, **unet_sizes):
    """Components for ``IFImg2ImgSuperResolutionPipeline``, producing ``sample_size`` px images (see stage I)."""
    return dict(**_if_text_components(text_width), scheduler=if_scheduler(), **_IF_NO_EXTRAS,
                unet=if_unet(sample_size, super_resolution=True, text_width=text_width, **unet_sizes),
                image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"))


# ControlNet and inpainting checkpoints


def tiny_controlnet(unet, seed=SEED):
    """A ControlNet copied from `unet`, its condition entering at the latent grid. A fresh one's output convolutions
    are zero and change nothing: they get small random weights, another set for each `seed`."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    generator = torch.Generator().manual_seed(seed)
    zero_convolutions = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                         controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for convolution in zero_convolutions:
            convolution.weight.copy_(torch.randn(convolution.weight.shape, generator=generator) * 0.1)
    return controlnet.eval()


def _with_controlnets(components, controlnets):
    nets = [tiny_controlnet(components["unet"], seed) for seed in range(controlnets)]
    return {**components, "controlnet": nets[0] if controlnets == 1 else nets}


def sd_controlnet_components(controlnets=1, scheduler="ddim"):
    """Components for ``StableDiffusionControlNetImg2ImgPipeline``: SD's, with one ControlNet or a list of them."""
    return _with_controlnets(sd_components(scheduler), controlnets)


def sdxl_controlnet_components(controlnets=1, scheduler="euler"):
    """Components for ``StableDiffusionXLControlNetImg2ImgPipeline``: the SDXL base's, with one ControlNet or more."""
    return _with_controlnets(sdxl_components(scheduler=scheduler), controlnets)


def _with_inpaint_unet(components):
    """An inpainting checkpoint's 9-channel UNet (latents, mask, masked image latents) in place of the 4-channel one."""
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 9}).eval()
    return {**components, "unet": unet}


def sd_inpaint_components(scheduler="ddim"):
    """Components for ``StableDiffusionInpaintPipeline`` with an inpainting checkpoint's 9-channel UNet."""
    return _with_inpaint_unet(sd_components(scheduler))


def sdxl_inpaint_components(scheduler="euler"):
    """Components for ``StableDiffusionXLInpaintPipeline`` with an inpainting checkpoint's 9-channel UNet."""
    return _with_inpaint_unet(sdxl_components(scheduler=scheduler))


# Depth estimation (tools.maps.depth_map, --control depth)


def save_depth_model(folder):
    """Saves a tiny random Depth Anything model and its image processor, like a Hub checkpoint; returns the folder."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    torch.manual_seed(SEED)
    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, image_size=28,
                            patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=16,
                                 neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8, head_hidden_size=8)
    DepthAnythingForDepthEstimation(config).eval().save_pretrained(folder)
    DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=False, do_pad=False).save_pretrained(folder)
    return Path(folder)
