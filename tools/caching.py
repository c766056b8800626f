"""--cache and --compile, the speed features of every run.py (docs/speed.md): diffusers' caches on the denoisers that
take them (the transformers of FLUX.1, Chroma, Qwen-Image, FLUX.2 and their edit models), and torch.compile.

    python Flux/run.py --cache fbc --cache-threshold 0.08      # FirstBlockCache
    python Flux/run.py --compile
"""

from __future__ import annotations

import argparse

from tools import cli

NAMES = {"fbc": "FirstBlockCache", "taylorseer": "TaylorSeer", "magcache": "MagCache", "fastercache": "FasterCache",
         "pab": "Pyramid Attention Broadcast"}  # the flags are tools/cli.py's
DEFAULT_THRESHOLDS = {"fbc": 0.08, "magcache": 0.06}  # the FLUX.1 setting gpu_bench measures; MagCache's own


def cache_config(name: str, threshold: float | None, pipe, steps: int):
    """The diffusers config of ``--cache name`` for ``pipe``, whose pipelines set ``_current_timestep`` before each
    transformer call."""
    from diffusers import hooks

    timestep = lambda: pipe._current_timestep  # noqa: E731
    if name == "fbc":
        return hooks.FirstBlockCacheConfig(threshold=DEFAULT_THRESHOLDS[name] if threshold is None else threshold)
    if name == "taylorseer":
        return hooks.TaylorSeerCacheConfig()
    if name == "magcache":
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS
        # FLUX.1's table, which MagCache stretches to the run's T steps
        return hooks.MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=steps,
                                    threshold=DEFAULT_THRESHOLDS[name] if threshold is None else threshold)
    if name == "fastercache":  # none of the pipelines here batches its guidance: nothing to split
        return hooks.FasterCacheConfig(current_timestep_callback=timestep, is_guidance_distilled=True,
                                       attention_weight_callback=lambda _: 0.5)
    return hooks.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                 current_timestep_callback=timestep)


def prepare(pipe, args: argparse.Namespace) -> None:
    """Turns on ``--cache`` and ``--compile`` on ``pipe``'s denoiser, once; a denoiser without diffusers' caches,
    or a cache that diffusers cannot put on it, is one line."""
    cache, compile_ = getattr(args, "cache", None), getattr(args, "compile", False)
    if not (cache or compile_):
        return
    name = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    denoiser = getattr(pipe, name)
    if cache and not getattr(denoiser, "is_cache_enabled", True):
        if cache == "magcache" and type(denoiser).__name__ != "FluxTransformer2DModel":
            raise cli.CliError("--cache magcache reads a table calibrated for the model, and diffusers ships FLUX.1's "
                               "only; pick another --cache")
        try:
            denoiser.enable_cache(cache_config(cache, args.cache_threshold, pipe, args.steps))
        except (ValueError, TypeError) as error:
            raise cli.CliError(f"--cache {cache}: diffusers cannot put {NAMES[cache]} on this "
                               f"{type(denoiser).__name__}: {cli.one_line(error)}; pick another --cache") from error
    elif cache and not hasattr(denoiser, "enable_cache"):
        raise cli.CliError(f"--cache: this model's {type(denoiser).__name__} takes no diffusers cache; the caches "
                           "work with the transformers of FLUX.1, Chroma, Qwen-Image and FLUX.2")
    if compile_ and getattr(denoiser, "_compiled_call_impl", None) is None:
        denoiser.compile()
