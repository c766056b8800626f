"""DeepFloyd IF: the cost of per-pixel strength at stages I and II, side by side with stock IF in one process.

    python benchmarks/bench_if.py [--size 64] [--stage2-size 128] [--steps 20] [--stage2-steps 10] [--repeats 3]
                                  [--device cpu]

The models have IF's architecture (pixel-space UNets with learned variance, text-pooled conditioning, a 6-channel
stage II reading the upscaled stage I image) at a small width with random weights: nothing is downloaded, and time
per step depends on the shapes, not on the weights. Text embeddings are given, since encoding is the same for both.
For each stage it prints
  * the overhead against stock img2img doing the same work (a uniform map of strength 1, and a gradient map that
    keeps the blend busy at every step),
  * UNet calls and time for a map whose strongest pixel is 0.3, against running all T steps as the authors' code
    does (whose per-step cost is stock's at strength 1),
  * peak memory of each case,
  * the time spent in the differential work itself (map preparation once per call, the blend once per step),
    timed inside the gradient-map runs: on a busy machine the whole-run ratios above wander by several per cent,
    this figure much less.
"""

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDPMScheduler,
    IFImg2ImgPipeline,
    IFImg2ImgSuperResolutionPipeline,
    UNet2DConditionModel,
)
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import UNetCalls, compare, mib  # noqa: E402
from IF import diff_pipe_I, diff_pipe_II  # noqa: E402

TEXT_WIDTH = 256  # T5-XXL's is 4096; only the first layer that reads it gets cheaper
TEXT_TOKENS = 77
BLOCKS = (32, 64, 128)


def if_unet(sample_size, super_resolution):
    torch.manual_seed(0)
    stage2 = dict(class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu")
    return UNet2DConditionModel(
        sample_size=sample_size, layers_per_block=2, block_out_channels=BLOCKS,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        in_channels=6 if super_resolution else 3, out_channels=6, cross_attention_dim=BLOCKS[-1],
        encoder_hid_dim=TEXT_WIDTH, attention_head_dim=64, addition_embed_type="text",
        addition_embed_type_num_heads=2, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
        act_fn="gelu", **(stage2 if super_resolution else {}),
    )


def if_scheduler():
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", thresholding=True, dynamic_thresholding_ratio=0.95,
                         sample_max_value=1.0, variance_type="learned_range")


def components(sample_size, super_resolution):
    parts = dict(unet=if_unet(sample_size, super_resolution), scheduler=if_scheduler(), tokenizer=None,
                 text_encoder=None, safety_checker=None, feature_extractor=None, watermarker=None,
                 requires_safety_checker=False)
    if super_resolution:
        parts["image_noising_scheduler"] = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    return parts


def maps(size):
    uniform = np.zeros((size, size), np.float32)
    gradient = np.linspace(0, 1, size, dtype=np.float32)[None].repeat(size, 0)  # strength 1 at the left, 0 right
    weak = 1 - 0.3 * (1 - gradient)  # strongest pixel 0.3
    return uniform, gradient, weak


class Stopwatch:
    """Adds up the time spent in the functions it wraps."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0

    def wrap(self, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1

        return timed


def differential_work(module, run):
    """Seconds of map preparation per call and of blending per step, in `run()` with `module`'s pipeline."""
    keep_map, release, blend = Stopwatch(), Stopwatch(), Stopwatch()
    saved = module.keep_map_on_grid, module.release_steps, module.FrozenPixels.blend
    module.keep_map_on_grid, module.release_steps = keep_map.wrap(saved[0]), release.wrap(saved[1])
    module.FrozenPixels.blend = blend.wrap(saved[2])
    try:
        run()
    finally:
        module.keep_map_on_grid, module.release_steps, module.FrozenPixels.blend = saved
    return (keep_map.seconds + release.seconds) / keep_map.calls, blend.seconds / max(blend.calls, 1)


def measure(name, stock_class, module, ours_class, parts, common, steps, repeats, device):
    stock = stock_class(**parts).to(device)
    ours = getattr(module, ours_class)(**parts).to(device)
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    calls = UNetCalls(parts["unet"])
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    uniform, gradient, weak = maps(common.pop("map_size"))
    cases = {
        "stock, strength 1": lambda: stock(strength=1.0, generator=seed(), **common),
        "ours, uniform map, strength 1": lambda: ours(map=uniform, generator=seed(), **common),
        "ours, gradient map 0..1": lambda: ours(map=gradient, generator=seed(), **common),
        "ours, map with max strength 0.3": lambda: ours(map=weak, generator=seed(), **common),
    }
    unet_calls = {}
    for case, run in cases.items():
        calls.count = 0
        run()
        unet_calls[case] = calls.count
    results = compare(cases, repeats=repeats, device=device, warmup=0)  # the counting run above warmed up
    preparation, blend = differential_work(module, cases["ours, gradient map 0..1"])

    # Ratios use CPU time on the CPU, where other processes disturb wall time; on a GPU, wall time.
    clock = "cpu_seconds" if torch.device(device).type == "cpu" else "seconds"
    baseline = results["stock, strength 1"][clock]
    print(f"\n{name}: T = {steps}, CFG on, {device}, {torch.get_num_threads()} threads, median of {repeats} "
          f"alternating rounds; ratios of {clock.replace('_', ' ')}")
    print(f"{'case':36} {'UNet calls':>10} {'seconds':>9} {'CPU s':>9} {'vs stock':>9} {'peak memory':>12}")
    for case, result in results.items():
        print(f"{case:36} {unet_calls[case]:>10} {result['seconds']:>9.3f} {result['cpu_seconds']:>9.3f} "
              f"{result[clock] / baseline:>9.3f} {mib(result['peak_bytes']):>12}")
    per_step = lambda case: results[case][clock] / unet_calls[case]  # noqa: E731
    stock_step = per_step("stock, strength 1")
    print(f"overhead per UNet step, uniform map:  {per_step('ours, uniform map, strength 1') / stock_step - 1:+.1%}")
    print(f"overhead per UNet step, gradient map: {per_step('ours, gradient map 0..1') / stock_step - 1:+.1%}")
    print(f"max strength 0.3: {unet_calls['ours, map with max strength 0.3']} UNet calls against {steps} for all "
          f"steps (the authors' code); time ratio {results['ours, map with max strength 0.3'][clock] / baseline:.2f}")
    print(f"differential work, gradient map: map preparation {preparation * 1e3:.2f} ms per call, blend "
          f"{blend * 1e3:.3f} ms per step = {blend / stock_step:.3%} of a stock step")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="stage I image side in pixels (default 64, as IF)")
    parser.add_argument("--stage2-size", type=int, default=128,
                        help="stage II image side in pixels (default 128; IF's is 256)")
    parser.add_argument("--steps", type=int, default=20, help="stage I num_inference_steps T (default 20)")
    parser.add_argument("--stage2-steps", type=int, default=10, help="stage II num_inference_steps T (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per case (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args()

    print(f"IF-shaped UNets {BLOCKS}, text embeddings {TEXT_TOKENS} x {TEXT_WIDTH}")
    embeds = torch.randn(1, TEXT_TOKENS, TEXT_WIDTH, generator=torch.Generator().manual_seed(0)).to(args.device)
    text = dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), output_type="pt")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (args.stage2_size, args.stage2_size, 3), dtype=np.uint8))

    measure(f"stage I, {args.size}x{args.size} px", IFImg2ImgPipeline, diff_pipe_I, "IFDiffImg2ImgPipeline",
            components(args.size, super_resolution=False),
            dict(image=image, num_inference_steps=args.steps, map_size=args.stage2_size, **text),
            args.steps, args.repeats, args.device)
    low_res = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    measure(f"stage II, {args.size} -> {args.stage2_size} px", IFImg2ImgSuperResolutionPipeline, diff_pipe_II,
            "IFDiffImg2ImgSuperResolutionPipeline", components(args.stage2_size, super_resolution=True),
            dict(image=low_res.to(args.device), original_image=image, num_inference_steps=args.stage2_steps,
                 map_size=args.stage2_size, **text),
            args.stage2_steps, args.repeats, args.device)


if __name__ == "__main__":
    main()
