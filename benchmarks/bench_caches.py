"""diffusers' caches with a map: how much of the transformer each one skips, and how far its result moves.

    python benchmarks/bench_caches.py [--family flux] [--size 256] [--steps 20] [--repeats 3] [--device cpu]

FLUX.1's transformer shape (1 double + 4 single blocks at width 256; Qwen-Image: 5 MMDiT blocks) with random weights,
over a VAE of factor 8, on a gradient map (pixels released at many steps, the worst case for a cache: each release
step computes the whole transformer) and on a uniform map (released at once, as stock img2img). Per cache config it
prints the steps on which the transformer's last block computed, out of those run and beside the steps that release
pixels, the largest difference of the final latents from the run without a cache, and the CPU time against that run,
measured alternately in one process.
Random weights make the residuals change more from step to step than a trained model's, so a threshold reuses less
here than on real weights: read the figures as the mechanics, not the speed-up of a real model.
"""

import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers import hooks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
from Flux.diff_pipe import FluxDiffImg2ImgPipeline, map_on_grid, map_to_tensor, release_steps  # noqa: E402
from QwenImage.diff_pipe import QwenImageDiffImg2ImgPipeline  # noqa: E402
from tests.flow_models import flux_components  # noqa: E402
from tests.flow_models2 import qwenimage_components  # noqa: E402
from tests.tiny_models import build_pipeline, seeded_generator, test_image  # noqa: E402
from tools.maps import linear_gradient  # noqa: E402

VAE_WIDTHS = (16, 32, 32, 32)
FAMILIES = {
    "flux": (FluxDiffImg2ImgPipeline, lambda: flux_components(layers=1, single_layers=4, heads=4, head_dim=64,
                                                               vae_widths=VAE_WIDTHS), dict(guidance_scale=3.5)),
    "qwenimage": (QwenImageDiffImg2ImgPipeline, lambda: qwenimage_components(layers=5, heads=4, head_dim=64,
                                                                               vae_levels=len(VAE_WIDTHS)), {}),
}


def configs(pipe, steps):
    timestep = lambda: pipe._current_timestep  # noqa: E731
    return {
        "FirstBlockCache 0": hooks.FirstBlockCacheConfig(threshold=0.0),
        "FirstBlockCache 0.08": hooks.FirstBlockCacheConfig(threshold=0.08),
        "FirstBlockCache 0.3": hooks.FirstBlockCacheConfig(threshold=0.3),
        "TaylorSeer": hooks.TaylorSeerCacheConfig(),
        "MagCache (flat table)": hooks.MagCacheConfig(mag_ratios=[1.0] * steps, num_inference_steps=steps),
        "FasterCache": hooks.FasterCacheConfig(current_timestep_callback=timestep, is_guidance_distilled=True,
                                               attention_weight_callback=lambda _: 0.5),
        "Pyramid Attention Broadcast": hooks.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=timestep),
    }


@contextmanager
def full_computations(pipe):
    """Yields (computed, steps) and fills them while the block runs: for every transformer call in which its last
    block computes, the loop iteration of that call (counted by the scheduler's steps); and an entry per step. The
    block is watched through a module inside it: a cache that reuses returns a stored output from the block's own
    hook, and never reaches its layers."""
    blocks = [module for name, module in pipe.transformer.named_modules()
              if name.endswith("blocks") and isinstance(module, torch.nn.ModuleList)][-1]
    linear = [module for module in blocks[-1].modules() if isinstance(module, torch.nn.Linear)][-1]
    computed, steps, step = [], [], pipe.scheduler.step

    def counting(*args, **kwargs):
        steps.append(None)
        return step(*args, **kwargs)

    handle = linear.register_forward_hook(lambda *_: computed.append(len(steps)))
    pipe.scheduler.step = counting
    try:
        yield computed, steps
    finally:
        handle.remove()
        del pipe.scheduler.step


def run(pipe, inputs, keep_map):
    """(final latents, the steps on which the last block computed, the steps run, CPU seconds)."""
    with full_computations(pipe) as (computed, steps):
        started = time.process_time()
        latents = pipe(**inputs, map=keep_map, generator=seeded_generator()).images
        seconds = time.process_time() - started
    return latents, len(set(computed)), len(steps), seconds


def main(argv=None):
    parser = harness.bench_parser(__doc__, multiple=16)
    parser.add_argument("--family", choices=FAMILIES, default="flux", help="the transformer to cache (default flux)")
    args = parser.parse_args(argv)
    harness.quiet_libraries()
    pipeline_class, components, guidance = FAMILIES[args.family]
    pipe = build_pipeline(pipeline_class, components()).to(args.device)
    inputs = dict(prompt="a red apple on a table", image=test_image(args.size), height=args.size, width=args.size,
                  max_sequence_length=32, num_inference_steps=args.steps, output_type="latent", **guidance)
    maps = {"gradient map": linear_gradient(args.size, args.size), "uniform map 0": np.zeros((args.size, args.size))}
    print(f"{args.family}-shaped transformer, {args.size}x{args.size} px, T = {args.steps}, {args.device}, "
          f"median of {args.repeats} rounds; CPU time against the same map without a cache")
    print(f"{'config':30} {'map':15} {'last block computed':>20} {'releasing':>9} {'max |diff|':>11} {'time':>6}")
    for map_name, keep_map in maps.items():
        plain, _, _, _ = run(pipe, inputs, keep_map)
        grid = (args.size // pipe.vae_scale_factor,) * 2  # the flow rule, on the map as the pipeline grids it
        release = release_steps(map_on_grid(map_to_tensor(keep_map, complement=True), grid), args.steps)
        releasing = len([step for step in release.unique().tolist() if step < args.steps])
        for name, config in configs(pipe, args.steps).items():
            times = []
            for _ in range(args.repeats):  # alternately, so that the machine's drift hits both alike
                times.append(run(pipe, inputs, keep_map)[3])
                pipe.transformer.enable_cache(config)
                latents, computed, total, seconds = run(pipe, inputs, keep_map)
                pipe.transformer.disable_cache()
                times[-1] = seconds / times[-1]
            difference = (latents - plain).abs().max().item()
            print(f"{name:30} {map_name:15} {f'{computed} of {total} steps':>20} {releasing:9} {difference:11.2e} "
                  f"{np.median(times):6.2f}")


if __name__ == "__main__":
    main()
