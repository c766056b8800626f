"""Drop-in conformance with the stock pipelines ours subclass (#11), on the registry of tests/families.py: every
feature run on stock and ours side by side, where a uniform map must give stock's result bit for bit."""

import inspect
import itertools
import json

import numpy as np
import pytest
import torch
from conftest import build_pipeline, count_unet_calls, seeded_generator, test_image
from diffusers import AutoencoderTiny, DiffusionPipeline
from diffusers.callbacks import SDCFGCutoffCallback, SDXLCFGCutoffCallback
from families import FAMILIES, FOUR_EDGES, MAP_SIZE, band_map, family_context

from tests.tiny_models import clip_image_encoder, clip_image_processor

HALF = np.full((MAP_SIZE, MAP_SIZE), 0.5, np.float32)  # strength 0.5 everywhere: stock at strength=0.5
WHITE = np.ones((MAP_SIZE, MAP_SIZE), np.float32)  # nothing to change: no step runs
BANDS = band_map(1.0, 0.7, 0.5, 0.0, edges=FOUR_EDGES)


def families_with(feature):
    return [name for name, entry in FAMILIES.items() if feature in entry.features]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(autouse=True)
def in_family_context(request):
    """Each test inside its family's own context (tests/families.py, `Family.context`)."""
    with family_context(request.node):
        yield


@pytest.fixture(scope="module")
def components(family):
    """Shared by the tests that leave the models as they are; the others build their own."""
    return FAMILIES[family].components()


def stock_and_ours(family, components=None):
    """A stock pipeline and ours on the very same components."""
    entry = FAMILIES[family]
    components = entry.components() if components is None else components
    return build_pipeline(entry.stock, components), build_pipeline(entry.ours, components)


def run_stock(pipe, family, **changes):
    entry = FAMILIES[family]
    run = {**entry.inputs(0), **entry.stock_inputs, "strength": 0.5, "num_inference_steps": 4, "output_type": "np"}
    return getattr(pipe(**{**run, "generator": seeded_generator(), **changes}), entry.output)


def run_ours(pipe, family, map=HALF, **changes):
    run = {**FAMILIES[family].inputs(0), "map": map, "num_inference_steps": 4, "output_type": "np"}
    return getattr(pipe(**{**run, "generator": seeded_generator(), **changes}), FAMILIES[family].output)


def test_from_pipe_works_both_ways_and_shares_every_component(family, components):
    entry = FAMILIES[family]
    stock = build_pipeline(entry.stock, components)
    ours = entry.ours.from_pipe(stock)
    back = entry.stock.from_pipe(ours)
    assert type(ours) is entry.ours and type(back) is entry.stock
    for name, component in stock.components.items():
        assert ours.components[name] is component and back.components[name] is component, name
    expected = run_stock(stock, family)
    assert np.array_equal(run_ours(ours, family), expected)
    assert np.array_equal(run_stock(back, family), expected)


def test_loads_from_a_folder_as_our_class_and_as_a_community_pipeline(family, components, tmp_path):
    entry = FAMILIES[family]
    stock, ours = stock_and_ours(family, components)
    stock.save_pretrained(tmp_path / "stock")
    by_class = entry.ours.from_pretrained(tmp_path / "stock")  # IF stage II: no absent watermarker to name
    by_class.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "model_index.json").read_text())["_class_name"] == entry.ours.__name__
    loaded = [
        by_class,
        entry.ours.from_pretrained(tmp_path / "ours"),  # no component to pass by hand
        DiffusionPipeline.from_pretrained(tmp_path / "stock", custom_pipeline=inspect.getfile(entry.ours),
                                          trust_remote_code=True),
    ]
    results = []
    for pipe in loaded:
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe).__name__ == entry.ours.__name__
        results.append(run_ours(pipe, family, BANDS))
    in_memory = [] if "in memory as loaded" in entry.skip else [run_ours(ours, family, BANDS)]
    assert all(np.array_equal(result, results[0]) for result in results[1:] + in_memory)


def test_model_cpu_offload_runs_as_stock_and_frees_its_hooks(family):
    # diffusers 0.42 refuses offload without an accelerator unless the device is named; on a CPU it still installs
    # accelerate's hooks and runs through them, which is what the pipeline has to get along with.
    stock, ours = stock_and_ours(family)  # components of their own: offloading hooks every model
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


@pytest.mark.parametrize("family", families_with("vae_swap"))
def test_a_vae_swapped_in_after_construction_sets_the_latent_grid_and_refuses_sizes_it_does_not_divide(family):
    stock, ours = stock_and_ours(family)
    stock.vae = ours.vae = tiny_autoencoder()  # leaves both pipelines' vae_scale_factor at 2
    expected = run_stock(stock, family, image=test_image())
    result = run_ours(ours, family, image=test_image())
    assert result.shape == (1, 64, 64, 3) and np.array_equal(result, expected)

    pixels = ours.image_processor.preprocess(test_image())
    x0 = ours.vae.encode(pixels).latents * ours.vae.config.scaling_factor
    assert x0.shape[-2:] == (16, 16)
    keep_map = np.ones((64, 64), np.float32)
    keep_map[:, 32:] = 0.0
    final = run_ours(ours, family, keep_map, image=test_image(), output_type="latent")
    assert torch.equal(final[..., :8], x0[..., :8])
    assert not torch.allclose(final[..., 8:], x0[..., 8:], atol=1e-2)
    # 62 px: 15.5 latents, which this encoder rounds up and the scale factor down
    with pytest.raises(ValueError, match="encoded to a 16x16 grid, but the map was sized to 15x15"):
        run_ours(ours, family, np.zeros((62, 62), np.float32), image=test_image(62))


# ---------------------------------------------------------------------------------------------------------------
# Loaders: IP-Adapter and LoRA

IMAGE_EMBEDDING_SIZE = 32  # clip_image_encoder's


def ip_adapter_state_dict(unet, tokens=4):
    """A random IP-Adapter in the layout `load_ip_adapter` reads: an image projection to `tokens` text tokens, and
    key/value projections for every cross-attention, numbered 1, 3, 5, ... in the order of `unet.attn_processors`."""
    generator, width = seeded_generator(1), unet.config.cross_attention_dim
    image_proj = {"proj.weight": torch.randn(width * tokens, IMAGE_EMBEDDING_SIZE, generator=generator) * 0.1,
                  "proj.bias": torch.zeros(width * tokens), "norm.weight": torch.ones(width),
                  "norm.bias": torch.zeros(width)}
    cross_attentions = [name.removesuffix(".processor") for name in unet.attn_processors if "attn2" in name]
    ip_adapter = {}
    for number, name in zip(itertools.count(1, 2), cross_attentions):
        hidden_size = unet.get_submodule(name).to_k.out_features
        for projection in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{number}.{projection}.weight"] = torch.randn(hidden_size, width, generator=generator) * 0.1
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


@pytest.mark.parametrize("family", families_with("ip_adapter"))
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


@pytest.mark.parametrize("family", families_with("lora"))
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


def interrupt_at_step_1(pipe, i, t, callback_kwargs):
    if i == 1:
        pipe._interrupt = True
    return {}


CUTOFFS = {"sd": SDCFGCutoffCallback, "sdxl": SDXLCFGCutoffCallback}


@pytest.mark.parametrize("family", families_with("step_end_steering"))
def test_an_interrupt_or_a_guidance_cutoff_from_a_callback_acts_as_in_stock(family):
    stock, ours = stock_and_ours(family)
    calls = count_unet_calls(ours)  # the UNet that both pipelines share
    run = dict(num_inference_steps=8, callback_on_step_end=interrupt_at_step_1, guidance_scale=1.0)
    expected = run_stock(stock, family, **run)
    assert len(calls) == 2  # steps 0 and 1 of the 4 that strength 0.5 runs
    calls.clear()
    assert np.array_equal(run_ours(ours, family, **run), expected) and len(calls) == 2
    calls.clear()
    run_ours(ours, family, BANDS, **run)
    assert len(calls) == 2 and ours.interrupt
    calls.stop()

    cutoff = dict(callback_on_step_end=CUTOFFS[family](cutoff_step_ratio=0.5), num_inference_steps=8)
    expected = run_stock(stock, family, **cutoff)
    assert np.array_equal(run_ours(ours, family, **cutoff), expected)
    assert ours.guidance_scale == 0.0  # the callback turned guidance off halfway
    assert np.abs(run_ours(ours, family, num_inference_steps=8) - expected).max() > 1e-3
    # A black map runs every step under the cutoff, as stock at strength 1.
    expected = run_stock(stock, family, strength=1.0, **cutoff)
    assert np.array_equal(run_ours(ours, family, np.zeros_like(HALF), **cutoff), expected)
