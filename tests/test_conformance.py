"""Drop-in conformance with the stock diffusers pipelines that each of ours subclasses (#11).

Every check runs against the installed diffusers: the signatures are compared with stock's as they are today, and
every feature is run on stock and ours side by side, where a uniform map must give stock's result bit for bit.
"""

import inspect
import itertools
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from conftest import (
    IF_STAGE1_SIZE,
    build_pipeline,
    count_unet_calls,
    if_stage1_components,
    if_stage2_components,
    kandinsky_decoder_components,
    sd_components,
    sdxl_components,
    seeded_generator,
    test_image,
)
from diffusers import (
    AutoencoderTiny,
    IFImg2ImgPipeline,
    IFImg2ImgSuperResolutionPipeline,
    KandinskyV22Img2ImgPipeline,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)
from diffusers.callbacks import SDCFGCutoffCallback, SDXLCFGCutoffCallback
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

from IF.diff_pipe_I import IFDiffImg2ImgPipeline
from IF.diff_pipe_II import IFDiffImg2ImgSuperResolutionPipeline
from Kandinsky.diff_pipe import KandinskyV22DiffImg2ImgPipeline
from SD2.diff_pipe import StableDiffusionDiffImg2ImgPipeline
from SD2.diff_pipe_controlnet import StableDiffusionControlNetDiffImg2ImgPipeline
from SD2.diff_pipe_inpaint import StableDiffusionDiffInpaintPipeline
from SDXL.diff_pipe import StableDiffusionXLDiffImg2ImgPipeline
from SDXL.diff_pipe_controlnet import StableDiffusionXLControlNetDiffImg2ImgPipeline
from SDXL.diff_pipe_inpaint import StableDiffusionXLDiffInpaintPipeline
from tests.tiny_models import sd_controlnet_components, sdxl_controlnet_components

PROMPT = "a red apple on a table"


@dataclass
class Family:
    ours: type
    stock: type
    components: Callable[[], dict]
    inputs: Callable[[], dict]  # everything but the strength, the map and the generator


def kandinsky_inputs():
    return dict(image_embeds=torch.randn(1, 32, generator=seeded_generator(1)), image=test_image(),
                negative_image_embeds=torch.randn(1, 32, generator=seeded_generator(2)), height=64, width=64,
                num_inference_steps=4, output_type="np")


FAMILIES = {
    "sd": Family(StableDiffusionDiffImg2ImgPipeline, StableDiffusionImg2ImgPipeline, sd_components,
                 lambda: dict(prompt=PROMPT, image=test_image(), num_inference_steps=4, output_type="np")),
    "sdxl": Family(StableDiffusionXLDiffImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline, sdxl_components,
                   lambda: dict(prompt=PROMPT, image=test_image(), num_inference_steps=4, output_type="np")),
    "kandinsky": Family(KandinskyV22DiffImg2ImgPipeline, KandinskyV22Img2ImgPipeline, kandinsky_decoder_components,
                        kandinsky_inputs),
    "if_stage1": Family(IFDiffImg2ImgPipeline, IFImg2ImgPipeline, if_stage1_components,
                        lambda: dict(prompt=PROMPT, image=test_image(), num_inference_steps=4, output_type="np",
                                     clean_caption=False)),
    "if_stage2": Family(IFDiffImg2ImgSuperResolutionPipeline, IFImg2ImgSuperResolutionPipeline, if_stage2_components,
                        lambda: dict(image=test_image(IF_STAGE1_SIZE, seed=10), original_image=test_image(),
                                     prompt=PROMPT, num_inference_steps=4, output_type="np", clean_caption=False)),
}
# ControlNet img2img and inpainting checkpoints (#15): the same drop-in checks.
FAMILIES["sd_controlnet"] = Family(
    StableDiffusionControlNetDiffImg2ImgPipeline, StableDiffusionControlNetImg2ImgPipeline, sd_controlnet_components,
    lambda: dict(prompt=PROMPT, image=test_image(), control_image=test_image(seed=7), num_inference_steps=4,
                 output_type="np"),
)
FAMILIES["sdxl_controlnet"] = Family(
    StableDiffusionXLControlNetDiffImg2ImgPipeline, StableDiffusionXLControlNetImg2ImgPipeline,
    sdxl_controlnet_components, FAMILIES["sd_controlnet"].inputs,
)
LATENT_FAMILIES = ["sd", "sdxl"]  # the families whose stock pipelines have IP-Adapter, `interrupt` and CFG callbacks

OUR_DEFAULTS = {"strength": 1.0}  # documented: a map already says how much each pixel changes


# ---------------------------------------------------------------------------------------------------------------
# Signatures


# Inpainting takes a map instead of stock's mask, so only its signature is compared here (tests/test_inpaint.py
# runs it against stock).
SIGNATURES = {name: (family.ours, family.stock) for name, family in FAMILIES.items()} | {
    "sd_inpaint": (StableDiffusionDiffInpaintPipeline, StableDiffusionInpaintPipeline),
    "sdxl_inpaint": (StableDiffusionXLDiffInpaintPipeline, StableDiffusionXLInpaintPipeline),
}


@pytest.mark.parametrize("family", SIGNATURES)
def test_call_takes_every_stock_argument_in_stock_order_with_stock_defaults(family):
    ours, stock = SIGNATURES[family]
    stock_parameters = list(inspect.signature(stock.__call__).parameters.values())
    our_parameters = list(inspect.signature(ours.__call__).parameters.values())
    stock_named = [p for p in stock_parameters if p.kind is not p.VAR_KEYWORD]
    assert [p.name for p in our_parameters[: len(stock_named)]] == [p.name for p in stock_named]
    for our, theirs in zip(our_parameters, stock_named):
        assert our.kind == theirs.kind, our.name
        assert our.default == OUR_DEFAULTS.get(our.name, theirs.default), our.name
    # Our own arguments come after all of stock's and are keyword-only, so stock's positions keep their meaning.
    extras = our_parameters[len(stock_named) :]
    takes_var_keyword = any(p.kind is p.VAR_KEYWORD for p in stock_parameters)
    if takes_var_keyword:
        assert extras and extras[-1].kind is extras[-1].VAR_KEYWORD and extras[-1].name == "kwargs"
        extras = extras[:-1]
    assert {"map", "invert_map", "keep_exact", "crop_to_change", "crop_margin", "crop_upscale"} <= {
        p.name for p in extras}
    assert all(p.kind is p.KEYWORD_ONLY for p in extras), [(p.name, p.kind) for p in extras]
    assert not any(p.kind is p.VAR_KEYWORD for p in our_parameters[:-1])
    assert any(p.kind is p.VAR_KEYWORD for p in our_parameters) == takes_var_keyword


# ---------------------------------------------------------------------------------------------------------------
# The five families, run side by side with stock

HALF = np.full((64, 64), 0.5, np.float32)  # strength 0.5 everywhere: stock at strength=0.5
WHITE = np.ones((64, 64), np.float32)  # nothing to change: no step runs


def three_band_map(size=64):
    """Left third kept, middle third at strength 0.5, right third changed fully."""
    keep_map = np.ones((size, size), np.float32)
    keep_map[:, size // 3 : 2 * size // 3] = 0.5
    keep_map[:, 2 * size // 3 :] = 0.0
    return keep_map


def stock_and_ours(family, components=None):
    """A stock pipeline and ours on the very same components."""
    components = FAMILIES[family].components() if components is None else components
    return build_pipeline(FAMILIES[family].stock, components), build_pipeline(FAMILIES[family].ours, components)


def run_stock(pipe, family, **changes):
    run = {**FAMILIES[family].inputs(), "strength": 0.5, "generator": seeded_generator(), **changes}
    return pipe(**run).images


def run_ours(pipe, family, map=HALF, **changes):
    run = {**FAMILIES[family].inputs(), "map": map, "generator": seeded_generator(), **changes}
    return pipe(**run).images


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pipe_works_both_ways_and_shares_every_component(family):
    stock = build_pipeline(FAMILIES[family].stock, FAMILIES[family].components())
    ours = FAMILIES[family].ours.from_pipe(stock)
    back = FAMILIES[family].stock.from_pipe(ours)
    assert type(ours) is FAMILIES[family].ours and type(back) is FAMILIES[family].stock
    for name, component in stock.components.items():
        assert ours.components[name] is component and back.components[name] is component, name
    expected = run_stock(stock, family)
    assert np.array_equal(run_ours(ours, family), expected)
    assert np.array_equal(run_stock(back, family), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_and_from_pretrained_round_trip(family, tmp_path):
    ours = build_pipeline(FAMILIES[family].ours, FAMILIES[family].components())
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == FAMILIES[family].ours.__name__
    reloaded = FAMILIES[family].ours.from_pretrained(tmp_path)  # no component to pass by hand, IF stage II included
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded) is FAMILIES[family].ours
    assert np.array_equal(run_ours(reloaded, family, three_band_map()), run_ours(ours, family, three_band_map()))


@pytest.mark.parametrize("family", FAMILIES)
def test_model_cpu_offload_runs_as_stock_and_frees_its_hooks(family):
    # diffusers 0.42 refuses offload without an accelerator unless the device is named; on a CPU it still installs
    # accelerate's hooks and runs through them, which is what the pipeline has to get along with.
    stock, ours = stock_and_ours(family)
    expected = run_stock(stock, family)
    ours.enable_model_cpu_offload(device="cpu")
    for keep_map in (HALF, WHITE):  # a run of stock's loop, and the run without steps that ours adds
        hooks = list(ours._all_hooks)
        assert hooks
        result = run_ours(ours, family, keep_map)
        if keep_map is HALF:
            assert np.array_equal(result, expected)
        # maybe_free_model_hooks() ran at the end of the call: it installs the hooks afresh
        assert len(ours._all_hooks) == len(hooks) and not any(a is b for a, b in zip(ours._all_hooks, hooks))


# ---------------------------------------------------------------------------------------------------------------
# A VAE swapped in after construction


def tiny_autoencoder():
    """An AutoencoderTiny with 4 pixels per latent, where the test pipelines' VAE has 2."""
    torch.manual_seed(0)
    return AutoencoderTiny(
        in_channels=3, out_channels=3, latent_channels=4, encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8), num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1),
    ).eval()


@pytest.mark.parametrize("family", LATENT_FAMILIES)
def test_a_vae_swapped_in_after_construction_sets_the_latent_grid(family):
    stock, ours = stock_and_ours(family)
    stock.vae = ours.vae = tiny_autoencoder()  # leaves both pipelines' vae_scale_factor at 2
    expected = run_stock(stock, family)
    result = run_ours(ours, family)
    assert result.shape == (1, 64, 64, 3) and np.array_equal(result, expected)

    pixels = ours.image_processor.preprocess(test_image())
    x0 = ours.vae.encode(pixels).latents * ours.vae.config.scaling_factor
    assert x0.shape[-2:] == (16, 16)
    keep_map = np.ones((64, 64), np.float32)
    keep_map[:, 32:] = 0.0
    final = run_ours(ours, family, keep_map, output_type="latent")
    assert torch.equal(final[..., :8], x0[..., :8])
    assert not torch.allclose(final[..., 8:], x0[..., 8:], atol=1e-2)


def test_an_image_the_swapped_vae_does_not_divide_is_refused_clearly():
    _, ours = stock_and_ours("sd")
    ours.vae = tiny_autoencoder()  # 62 px: 15.5 latents, which this encoder rounds up and the scale factor down
    with pytest.raises(ValueError, match="encoded to a 16x16 grid, but the map was sized to 15x15"):
        run_ours(ours, "sd", np.zeros((62, 62), np.float32), image=test_image(62))


# ---------------------------------------------------------------------------------------------------------------
# Loaders: IP-Adapter and LoRA

IMAGE_EMBEDDING_SIZE = 32


def clip_image_encoder():
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, projection_dim=IMAGE_EMBEDDING_SIZE, image_size=32, patch_size=8,
                              intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    return CLIPVisionModelWithProjection(config).eval()


def clip_image_processor():
    return CLIPImageProcessorPil(size=32, crop_size=32, do_center_crop=True, do_normalize=True, do_resize=True,
                                 image_mean=[0.48145466, 0.4578275, 0.40821073],
                                 image_std=[0.26862954, 0.26130258, 0.27577711], resample=3)


def ip_adapter_state_dict(unet, tokens=4):
    """A random IP-Adapter in the layout `load_ip_adapter` reads: an image projection to `tokens` text tokens, and
    key/value projections for every cross-attention, numbered 1, 3, 5, ... in the order of `unet.attn_processors`."""
    generator, width = seeded_generator(1), unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(width * tokens, IMAGE_EMBEDDING_SIZE, generator=generator) * 0.1,
        "proj.bias": torch.zeros(width * tokens),
        "norm.weight": torch.ones(width),
        "norm.bias": torch.zeros(width),
    }
    cross_attentions = [name.removesuffix(".processor") for name in unet.attn_processors if "attn2" in name]
    ip_adapter = {}
    for number, name in zip(itertools.count(1, 2), cross_attentions):
        hidden_size = unet.get_submodule(name).to_k.out_features
        for projection in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{number}.{projection}.weight"] = torch.randn(hidden_size, width, generator=generator) * 0.1
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


@pytest.mark.parametrize("family", LATENT_FAMILIES)
def test_ip_adapter_loads_into_ours_and_its_image_acts_as_in_stock(family):
    components = {**FAMILIES[family].components(), "image_encoder": clip_image_encoder(),
                  "feature_extractor": clip_image_processor()}
    stock, ours = stock_and_ours(family, components)
    ours.load_ip_adapter(ip_adapter_state_dict(ours.unet), subfolder=None, weight_name=None)
    assert stock.unet is ours.unet  # stock runs the adapter that ours loaded
    adapter_image = test_image(seed=3)
    expected = run_stock(stock, family, ip_adapter_image=adapter_image)
    assert np.array_equal(run_ours(ours, family, ip_adapter_image=adapter_image), expected)
    other_image = run_ours(ours, family, ip_adapter_image=test_image(seed=4))
    assert np.abs(other_image - expected).max() > 1e-3  # the adapter image steers the result
    embeds = stock.prepare_ip_adapter_image_embeds(adapter_image, None, torch.device("cpu"), 1, True)
    assert np.array_equal(run_ours(ours, family, ip_adapter_image_embeds=embeds), expected)


def lora_state_dict(unet, rank=2):
    """A random LoRA on every attention projection of `unet`, in the PEFT layout `load_lora_weights` reads."""
    generator, weights = seeded_generator(2), {}
    for name, module in unet.named_modules():
        if name.endswith((".to_q", ".to_k", ".to_v")):
            weights[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.1
            weights[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.1
    return weights


@pytest.mark.parametrize("family", LATENT_FAMILIES)
def test_lora_loads_into_ours_and_acts_as_in_stock(family):
    pytest.importorskip("peft", reason="diffusers loads LoRA weights through peft, which is not installed")
    stock, ours = stock_and_ours(family)
    without_lora = run_ours(ours, family)
    ours.load_lora_weights(lora_state_dict(ours.unet), adapter_name="tiny")
    assert ours.get_active_adapters() == ["tiny"]
    expected = run_stock(stock, family)
    result = run_ours(ours, family)
    assert np.array_equal(result, expected) and np.abs(result - without_lora).max() > 1e-3
    # The LoRA scale reaches the attention processors through cross_attention_kwargs, as in stock.
    assert np.array_equal(run_ours(ours, family, cross_attention_kwargs={"scale": 0.0}), without_lora)


# ---------------------------------------------------------------------------------------------------------------
# Step-end callbacks that steer stock's loop


def interrupt_at(step):
    def interrupt(pipe, i, t, callback_kwargs):
        if i == step:
            pipe._interrupt = True
        return {}

    return interrupt


@pytest.mark.parametrize("family", LATENT_FAMILIES)
def test_interrupt_from_a_callback_stops_the_run_as_in_stock(family):
    stock, ours = stock_and_ours(family)
    calls = count_unet_calls(ours)  # the UNet that both pipelines share
    run = dict(num_inference_steps=8, callback_on_step_end=interrupt_at(1), guidance_scale=1.0)
    expected = run_stock(stock, family, **run)
    assert len(calls) == 2  # steps 0 and 1 of the 4 that strength 0.5 runs
    calls.clear()
    assert np.array_equal(run_ours(ours, family, **run), expected) and len(calls) == 2
    calls.clear()
    run_ours(ours, family, three_band_map(), **run)
    assert len(calls) == 2 and ours.interrupt


@pytest.mark.parametrize("family, cutoff", [("sd", SDCFGCutoffCallback), ("sdxl", SDXLCFGCutoffCallback)])
def test_a_guidance_cutoff_callback_acts_as_in_stock(family, cutoff):
    stock, ours = stock_and_ours(family)
    run = dict(num_inference_steps=8, callback_on_step_end=cutoff(cutoff_step_ratio=0.5))
    expected = run_stock(stock, family, **run)
    assert np.array_equal(run_ours(ours, family, **run), expected)
    assert ours.guidance_scale == 0.0  # the callback turned guidance off halfway
    assert np.abs(run_ours(ours, family, num_inference_steps=8) - expected).max() > 1e-3
