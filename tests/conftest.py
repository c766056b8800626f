"""Tiny random-weight models for all four families, so tests run offline on a CPU in seconds.

Every builder seeds torch before each model it creates, so the same call always gives the same weights, and
puts each model in eval mode as ``from_pretrained`` does: a fresh diffusers model is in train mode, and the VAE
then decodes differently in the last bit, so an in-memory pipeline would not match its saved copy exactly.
The builders are plain functions (``from conftest import sd_components``) and also fixtures of the same
name. Session fixtures (``sd_dir``, ``if_stage2_dir``, ...) save each stock pipeline once, so tests of
``from_pretrained`` and of ``run.py --model DIR`` have a local folder to load.

Sizes (test images are 64 x 64 px):
  * SD, SDXL: 2-level VAE, vae_scale_factor 2, 4 x 32 x 32 latents.
  * Kandinsky 2.2: 2-level MoVQ, scale factor 2, 4 x 32 x 32 latents, image embeddings of size 32.
  * IF: pixel space; stage I works at 32 px, stage II upscales to 64 px (``unet.config.sample_size``).
"""

import os

# Before any Hugging Face import: fail at once instead of retrying the network, and keep logs quiet.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Tiny models gain nothing from threads, and on a busy machine extra threads make them several times slower.
# The variable also reaches subprocesses (run.py tests), so both sides compute in the same order.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import io
import json
import sys
import tempfile

# diffusers copies a local custom pipeline to <HF_MODULES_CACHE>/diffusers_modules/local/<file name> before importing
# it, and every family's file is called diff_pipe.py: a private folder keeps test runs side by side from replacing
# each other's copy between the write and the import. Subprocesses inherit it.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="diffusers-modules-"))
from pathlib import Path

import diffusers
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    IFImg2ImgPipeline,
    IFImg2ImgSuperResolutionPipeline,
    KandinskyV22Img2ImgPipeline,
    KandinskyV22PriorPipeline,
    PNDMScheduler,
    PriorTransformer,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
    UnCLIPScheduler,
    VQModel,
)
from PIL import Image
from torch import nn
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

# Loading bars ("Loading pipeline components...") only clutter failure reports.
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was imported before this file

SEED = 0
IMAGE_SIZE = 64
IF_STAGE1_SIZE = 32
IF_STAGE2_SIZE = 64
TEXT_HIDDEN_SIZE = 32
SDXL_TIME_EMBED_DIM = 8

# ---------------------------------------------------------------------------------------------------------------
# Small inputs
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------

CLIP_MERGES = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("in", "g</w>"), ("a", "n"), ("an", "d</w>")]


def byte_level_alphabet():
    """The 256 printable stand-ins that byte-level BPE uses for raw bytes (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # The other bytes take the code points from 256 upwards.
    remapped = range(256, 256 + 256 - len(printable))
    return [chr(c) for c in [*printable, *remapped]]


def _write_clip_vocab(folder):
    alphabet = byte_level_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in CLIP_MERGES]
    # Special tokens last, as in the real CLIP vocabulary.
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    merges = "\n".join(f"{a} {b}" for a, b in CLIP_MERGES)
    (folder / "merges.txt").write_text(f"#version: 0.2\n{merges}\n")


def clip_tokenizer(folder=None):
    """A CLIP tokenizer with a tiny byte-level BPE vocabulary, written to ``folder`` (a temporary one if None)."""
    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            return clip_tokenizer(tmp)
    folder = Path(folder)
    _write_clip_vocab(folder)
    # SD pipelines pad prompts to model_max_length, so it must be the real 77.
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    # A failed load returns an empty 2-token tokenizer instead of raising.
    assert len(tokenizer) > 2, f"CLIP tokenizer in {folder} did not load"
    return tokenizer


T5_CORPUS = [
    "a photo of a cat sitting on a red chair",
    "a painting of a mountain lake at sunset",
    "an astronaut riding a horse on the moon",
    "a bowl of fruit on a wooden table",
    "a dog running through a field of flowers",
    "a city street at night with neon lights",
    "a portrait of a woman in a blue dress",
    "a small boat on a calm sea under clouds",
]


def _train_unigram_model():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(T5_CORPUS * 4),
        model_writer=model,
        model_type="unigram",
        vocab_size=64,
        hard_vocab_limit=False,
        pad_id=0,  # T5's layout: pad, eos, unk, and no bos
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def t5_tokenizer():
    """A T5 tokenizer from a SentencePiece unigram model trained in-process on a few captions."""
    processor = _train_unigram_model()
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=77)
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1, "T5 special tokens out of place"
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Schedulers
# ---------------------------------------------------------------------------------------------------------------

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
}

# The noise schedule that SD 1.x/2.x and SDXL ship with; each scheduler class ignores keys it lacks.
LATENT_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
)

# Kandinsky 2.2's decoder uses a linear schedule.
KANDINSKY_SCHEDULE = {**LATENT_SCHEDULE, "beta_schedule": "linear"}


def make_scheduler(name, schedule=LATENT_SCHEDULE):
    """A scheduler by short name (see ``SCHEDULERS``) on the given noise schedule."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    cls = SCHEDULERS[name]
    return cls.from_config(schedule)


def if_scheduler():
    """IF's DDPM setup: cosine schedule, learned variance and dynamic thresholding."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
        prediction_type="epsilon",
        variance_type="learned_range",
    )


# ---------------------------------------------------------------------------------------------------------------
# Shared tiny models
# ---------------------------------------------------------------------------------------------------------------


def clip_text_config(tokenizer, projection_dim=TEXT_HIDDEN_SIZE):
    # Ids come from the tokenizer: the pooled output is read at the first eos token.
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )


def clip_text_model(tokenizer, with_projection=False):
    torch.manual_seed(SEED)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(clip_text_config(tokenizer)).eval()


def tiny_vae():
    torch.manual_seed(SEED)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=IMAGE_SIZE,
    ).eval()


def latent_unet(cross_attention_dim, **sdxl_kwargs):
    torch.manual_seed(SEED)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        **sdxl_kwargs,
    ).eval()


# ---------------------------------------------------------------------------------------------------------------
# Stable Diffusion 1.x / 2.x
# ---------------------------------------------------------------------------------------------------------------


def sd_components(scheduler="ddim"):
    """Components for ``StableDiffusionImg2ImgPipeline(**components)``."""
    tokenizer = clip_tokenizer()
    return dict(
        unet=latent_unet(cross_attention_dim=TEXT_HIDDEN_SIZE),
        vae=tiny_vae(),
        text_encoder=clip_text_model(tokenizer),
        tokenizer=tokenizer,
        scheduler=make_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


# ---------------------------------------------------------------------------------------------------------------
# SDXL
# ---------------------------------------------------------------------------------------------------------------


def sdxl_unet(refiner):
    # The added conditioning is the time ids (6 numbers, or 5 when an aesthetic score replaces the target size),
    # each embedded in SDXL_TIME_EMBED_DIM, plus text_encoder_2's pooled projection.
    time_ids = 5 if refiner else 6
    # Cross-attention sees the concatenated hidden states of every text encoder the stage has.
    encoders = 1 if refiner else 2
    return latent_unet(
        cross_attention_dim=encoders * TEXT_HIDDEN_SIZE,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=time_ids * SDXL_TIME_EMBED_DIM + TEXT_HIDDEN_SIZE,
    )


def sdxl_components(refiner=False, scheduler="euler"):
    """Components for ``StableDiffusionXLImg2ImgPipeline``: the base, or with ``refiner=True`` a standalone refiner.

    A standalone refiner builds its own VAE and second text encoder; they have the same weights as the base's,
    because every builder seeds the same way. To share the very objects, use ``sdxl_refiner_components(base)``.
    """
    if refiner:
        return sdxl_refiner_components(None, scheduler)
    tokenizer = clip_tokenizer()
    return dict(
        unet=sdxl_unet(refiner=False),
        vae=tiny_vae(),
        text_encoder=clip_text_model(tokenizer),
        text_encoder_2=clip_text_model(tokenizer, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=make_scheduler(scheduler),
        image_encoder=None,
        feature_extractor=None,
        requires_aesthetics_score=False,
    )


def sdxl_refiner_components(base=None, scheduler="euler"):
    """Refiner components; given the base's components, it reuses their VAE and second text encoder, as SDXL does."""
    if base is None:
        tokenizer_2 = clip_tokenizer()
        text_encoder_2 = clip_text_model(tokenizer_2, with_projection=True)
        vae = tiny_vae()
    else:
        tokenizer_2, text_encoder_2, vae = base["tokenizer_2"], base["text_encoder_2"], base["vae"]
    return dict(
        unet=sdxl_unet(refiner=True),
        vae=vae,
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=tokenizer_2,
        scheduler=make_scheduler(scheduler),
        image_encoder=None,
        feature_extractor=None,
        requires_aesthetics_score=True,
    )


# ---------------------------------------------------------------------------------------------------------------
# Kandinsky 2.2
# ---------------------------------------------------------------------------------------------------------------

KANDINSKY_CLIP_IMAGE_SIZE = 32


def kandinsky_prior_components():
    """Components for ``KandinskyV22PriorPipeline``; its image embeddings have size 32."""
    tokenizer = clip_tokenizer()
    torch.manual_seed(SEED)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=TEXT_HIDDEN_SIZE, num_layers=1)
    # A fresh prior has clip_std = 0, which multiplies every output to zero.
    prior.clip_std = nn.Parameter(torch.ones(prior.clip_std.shape))
    prior.eval()
    torch.manual_seed(SEED)
    # The pipeline encodes a black image of this size for the unconditional embedding, so keep it small.
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=TEXT_HIDDEN_SIZE,
            projection_dim=TEXT_HIDDEN_SIZE,
            image_size=KANDINSKY_CLIP_IMAGE_SIZE,
            patch_size=8,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
        )
    ).eval()
    return dict(
        prior=prior,
        image_encoder=image_encoder,
        text_encoder=clip_text_model(tokenizer, with_projection=True),
        tokenizer=tokenizer,
        scheduler=UnCLIPScheduler(
            variance_type="fixed_small_log",
            prediction_type="sample",
            num_train_timesteps=1000,
            clip_sample=True,
            clip_sample_range=10.0,
        ),
        image_processor=CLIPImageProcessorPil(
            size=KANDINSKY_CLIP_IMAGE_SIZE,
            crop_size=KANDINSKY_CLIP_IMAGE_SIZE,
            do_center_crop=True,
            do_normalize=True,
            do_resize=True,
            image_mean=[0.48145466, 0.4578275, 0.40821073],
            image_std=[0.26862954, 0.26130258, 0.27577711],
            resample=3,
        ),
    )


def kandinsky_decoder_components(scheduler="ddim"):
    """Components for ``KandinskyV22Img2ImgPipeline``; it takes image embeddings of size 32."""
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=8,  # mean and variance, as in the real decoder
        addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=TEXT_HIDDEN_SIZE,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=32,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
        sample_size=IMAGE_SIZE // 2,
    ).eval()
    torch.manual_seed(SEED)
    movq = VQModel(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
    ).eval()
    return dict(unet=unet, scheduler=make_scheduler(scheduler, KANDINSKY_SCHEDULE), movq=movq)


# ---------------------------------------------------------------------------------------------------------------
# DeepFloyd IF
# ---------------------------------------------------------------------------------------------------------------


def t5_encoder(tokenizer):
    torch.manual_seed(SEED)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TEXT_HIDDEN_SIZE,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,  # a fresh model is in train mode; dropout would make embeddings random
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config).eval()


def if_unet(sample_size, super_resolution):
    torch.manual_seed(SEED)
    # Stage II sees the noisy image and the upscaled stage I image side by side, and a noise-level class label.
    stage2 = dict(
        class_embed_type="timestep",
        mid_block_scale_factor=1.414,
        time_embedding_act_fn="gelu",
        time_embedding_dim=32,
    )
    return UNet2DConditionModel(
        sample_size=sample_size,  # the pipelines resize their input to this: it is the stage's output size
        layers_per_block=1,
        block_out_channels=[32, 64],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        in_channels=6 if super_resolution else 3,
        out_channels=6,  # mean and learned variance
        cross_attention_dim=32,
        encoder_hid_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        **(stage2 if super_resolution else {}),
    ).eval()


def _if_text_components():
    tokenizer = t5_tokenizer()
    return dict(tokenizer=tokenizer, text_encoder=t5_encoder(tokenizer))


_IF_NO_EXTRAS = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)


def if_stage1_components(sample_size=IF_STAGE1_SIZE):
    """Components for ``IFImg2ImgPipeline``, producing ``sample_size`` px images."""
    return dict(
        **_if_text_components(),
        unet=if_unet(sample_size, super_resolution=False),
        scheduler=if_scheduler(),
        **_IF_NO_EXTRAS,
    )


def if_stage2_components(sample_size=IF_STAGE2_SIZE):
    """Components for ``IFImg2ImgSuperResolutionPipeline``, producing ``sample_size`` px images."""
    return dict(
        **_if_text_components(),
        unet=if_unet(sample_size, super_resolution=True),
        scheduler=if_scheduler(),
        image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
        **_IF_NO_EXTRAS,
    )


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------------


def save_pipeline(pipe, folder):
    """Save ``pipe`` as a diffusers folder and return the folder's path."""
    pipe.save_pretrained(folder)
    return Path(folder)


def saved_as_none(folder):
    """The components that a folder's model_index.json records as absent (``[null, null]``)."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return [name for name, value in index.items() if value == [None, None]]


def load_pipeline(folder, pipeline_class=DiffusionPipeline, **kwargs):
    """Load a saved folder offline, passing ``None`` for every component that was saved as absent.

    IF stage II needs this: diffusers 0.42 does not list ``watermarker`` among its optional components, so a
    stage II saved without one only reloads with ``watermarker=None`` given explicitly.
    """
    absent = {name: None for name in saved_as_none(folder)}
    pipe = pipeline_class.from_pretrained(folder, **{**absent, **kwargs})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(pipeline_class, components):
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _forget_custom_pipeline_modules():
    """Drops the modules that ``custom_pipeline=...`` imported, once the test is over.

    diffusers imports SD2/diff_pipe.py and Kandinsky/diff_pipe.py under the same name, and executes a second file into
    the module of the first, which then holds two pipeline classes and loads neither.
    """
    yield
    for name in [name for name in sys.modules if name.startswith("diffusers_modules.local.")]:
        del sys.modules[name]


@pytest.fixture
def generator():
    return seeded_generator()


@pytest.fixture
def image():
    return test_image()


# Fresh components for each test, since tests may swap schedulers or move models.
@pytest.fixture(name="sd_components")
def _sd_components():
    return sd_components()


@pytest.fixture(name="sdxl_components")
def _sdxl_components():
    return sdxl_components()


@pytest.fixture(name="sdxl_refiner_components")
def _sdxl_refiner_components(sdxl_components):
    # A test that asks for both gets a refiner sharing the base's VAE and second text encoder.
    return sdxl_refiner_components(sdxl_components)


@pytest.fixture(name="kandinsky_prior_components")
def _kandinsky_prior_components():
    return kandinsky_prior_components()


@pytest.fixture(name="kandinsky_decoder_components")
def _kandinsky_decoder_components():
    return kandinsky_decoder_components()


@pytest.fixture(name="if_stage1_components")
def _if_stage1_components():
    return if_stage1_components()


@pytest.fixture(name="if_stage2_components")
def _if_stage2_components():
    return if_stage2_components()


def _saved(tmp_path_factory, name, pipeline_class, components):
    folder = tmp_path_factory.mktemp(name)
    return save_pipeline(build_pipeline(pipeline_class, components), folder)


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "sd", StableDiffusionImg2ImgPipeline, sd_components())


@pytest.fixture(scope="session")
def sdxl_base_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "sdxl_base", StableDiffusionXLImg2ImgPipeline, sdxl_components())


@pytest.fixture(scope="session")
def sdxl_refiner_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "sdxl_refiner", StableDiffusionXLImg2ImgPipeline, sdxl_refiner_components())


@pytest.fixture(scope="session")
def kandinsky_prior_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "kandinsky_prior", KandinskyV22PriorPipeline, kandinsky_prior_components())


@pytest.fixture(scope="session")
def kandinsky_decoder_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "kandinsky_decoder", KandinskyV22Img2ImgPipeline, kandinsky_decoder_components())


@pytest.fixture(scope="session")
def if_stage1_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "if_stage1", IFImg2ImgPipeline, if_stage1_components())


@pytest.fixture(scope="session")
def if_stage2_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "if_stage2", IFImg2ImgSuperResolutionPipeline, if_stage2_components())


# ---------------------------------------------------------------------------------------------------------------
# Scripts
# ---------------------------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_script(script, *args, cwd=None, timeout=300):
    """Runs a repository script (``"SD2/run.py"``) in a fresh Python, offline, and returns the finished process."""
    import subprocess
    import sys

    command = [sys.executable, str(REPO_ROOT / script), *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=cwd or REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def count_unet_calls(pipe):
    """A list that grows by one at every forward call of ``pipe.unet``."""
    calls = []
    pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.fixture
def inputs(tmp_path):
    """A 64 px test image and a map whose left half changes fully, saved as files for run.py."""
    from tools.maps import save_map

    image, map_path = tmp_path / "photo.png", tmp_path / "map.png"
    test_image().save(image)
    keep_map = np.ones((64, 64), np.float32)
    keep_map[:, :32] = 0.0
    save_map(keep_map, map_path)
    return image, map_path


# The bad command lines every run.py refuses in one line: (case, extra flags, text the error line must hold).
# "{image}", "{map}" and "{tmp}" stand for the test's image, map and temporary folder.
COMMON_BAD_INPUTS = [
    ("missing image", ["--image", "nowhere.png"], "--image"),
    ("missing map", ["--map", "nowhere.png"], "--map"),
    ("output is the image", ["--output", "{image}", "--overwrite"], "--image"),
    ("fp16 on the cpu", ["--dtype", "fp16"], "--dtype fp32"),
    ("steps out of range", ["--steps", "0"], "--steps"),
    ("strength out of range", ["--strength", "1.5"], "--strength"),
]


def assert_refused_in_one_line(script, base, extra, message, inputs, tmp_path):
    """Runs ``script`` with ``base + extra``; checks one ``error:`` line holding ``message``, no traceback, the
    inputs byte for byte as before and no output written."""
    image, map_path = inputs
    before = {path: path.read_bytes() for path in inputs}
    extra = [value.format(image=image, map=map_path, tmp=tmp_path) for value in extra]
    if "--output" not in extra:
        extra += ["--output", tmp_path / "out.png"]
    result = run_script(script, *base, *extra, cwd=tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert {path: path.read_bytes() for path in inputs} == before
    assert not (tmp_path / "out.png").exists()
