"""Kandinsky 2.2: the cost of per-pixel strength, measured side by side with stock img2img in one process.

    python benchmarks/bench_kandinsky.py [--size 256] [--steps 20] [--repeats 3] [--device cpu]

The decoder has Kandinsky 2.2's architecture (a UNet of ResNet and simple cross-attention blocks conditioned on an
image embedding, and a spatially normalised MoVQ with scale factor 8) at a small width, with random weights: nothing
is downloaded, and time per step depends on the shapes, not on the weights. The prior is left out: it runs the same
for both, before the decoder. It prints
  * the overhead against stock img2img doing the same work (a uniform map of strength 1, and a gradient map that
    keeps the blend busy at every step),
  * UNet calls and time for a map whose strongest pixel is 0.3, against running all T steps as the authors' code
    does (whose per-step cost is stock's at strength 1),
  * the time spent outside the UNet, where the map's work happens: on a busy machine the UNet's own time varies
    from run to run by more than the whole blend costs, so this column shows the overhead more clearly,
  * the per-step blend alone (FrozenPixels.blend on this run's latents), timed directly,
  * peak memory of each case.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, KandinskyV22Img2ImgPipeline, UNet2DConditionModel, VQModel
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import UNetCalls, compare, mib, synchronize  # noqa: E402
from Kandinsky.diff_pipe import FrozenPixels, KandinskyV22DiffImg2ImgPipeline, release_steps  # noqa: E402

EMBEDDING_WIDTH = 256


def small_kandinsky_decoder_components():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256), layers_per_block=2, in_channels=4, out_channels=8,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", addition_embed_type="image",
        encoder_hid_dim=EMBEDDING_WIDTH, encoder_hid_dim_type="image_proj", cross_attention_dim=EMBEDDING_WIDTH,
        attention_head_dim=32, resnet_time_scale_shift="scale_shift", class_embed_type=None,
    )
    movq = VQModel(
        block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
        norm_type="spatial", num_vq_embeddings=256, vq_embed_dim=4,
    )
    # The decoder's own scheduler: DDPM on a linear schedule.
    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1, timestep_spacing="leading")
    return dict(unet=unet.eval(), movq=movq.eval(), scheduler=scheduler)


class UNetClock:
    """Seconds spent inside a module's forward calls since the last reset."""

    def __init__(self, module, device):
        self.device, self.seconds, self.started = device, 0.0, None
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _start(self, *_):
        synchronize(self.device)
        self.started = time.perf_counter()

    def _stop(self, *_):
        synchronize(self.device)
        self.seconds += time.perf_counter() - self.started


def blend_seconds(pipe, keep_map, steps, repeats=20):
    """Seconds per call of the per-step blend, on latents of the run's shape, for a map that is busy at every step."""
    grid = keep_map.shape[-2] // 8, keep_map.shape[-1] // 8
    keep = torch.nn.functional.interpolate(torch.from_numpy(keep_map)[None, None], size=grid, mode="area")
    frozen = FrozenPixels(release_steps(keep, 1.0, steps), steps)
    frozen.x0, frozen.noise = torch.randn(1, 4, *grid), torch.randn(1, 4, *grid)
    frozen.release_step = frozen.release_step.to(pipe.device)
    frozen.x0, frozen.noise = frozen.x0.to(pipe.device), frozen.noise.to(pipe.device)
    pipe.scheduler.set_timesteps(steps, device=pipe.device)
    latents = torch.randn_like(frozen.x0)
    synchronize(pipe.device)
    started = time.perf_counter()
    for _ in range(repeats):
        for i in range(steps - frozen.first_step):
            frozen.blend(pipe.scheduler, i, latents)
    synchronize(pipe.device)
    return (time.perf_counter() - started) / (repeats * (steps - frozen.first_step))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels, a multiple of 32 (default 256)")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps T (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per case (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args()
    if args.size % 32:  # MoVQ factor 8, and a UNet that halves the latents twice
        parser.error(f"--size {args.size}: this decoder needs a multiple of 32")

    components = small_kandinsky_decoder_components()
    stock = KandinskyV22Img2ImgPipeline(**components).to(args.device)
    ours = KandinskyV22DiffImg2ImgPipeline(**components).to(args.device)
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    calls = UNetCalls(components["unet"])

    size, steps = args.size, args.steps
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    embeds = torch.randn(1, EMBEDDING_WIDTH, generator=torch.Generator().manual_seed(0)).to(args.device)
    common = dict(image=image, image_embeds=embeds, negative_image_embeds=torch.zeros_like(embeds), height=size,
                  width=size, guidance_scale=4.0, num_inference_steps=steps, output_type="np")
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    uniform = np.zeros((size, size), np.float32)
    gradient = np.linspace(0, 1, size, dtype=np.float32)[None].repeat(size, 0)  # strength 1 at the left, 0 at the right
    weak = 1 - 0.3 * (1 - gradient)  # strongest pixel 0.3

    cases = {
        "stock img2img, strength 1": lambda: stock(strength=1.0, generator=seed(), **common),
        "ours, uniform map, strength 1": lambda: ours(map=uniform, generator=seed(), **common),
        "ours, gradient map 0..1": lambda: ours(map=gradient, generator=seed(), **common),
        "ours, map with max strength 0.3": lambda: ours(map=weak, generator=seed(), **common),
    }
    unet_calls = {}
    for name, run in cases.items():
        calls.count = 0
        run()
        unet_calls[name] = calls.count
    clock, outside_seconds = UNetClock(components["unet"], args.device), {name: [] for name in cases}

    def clocked(name, run):
        def clocked_run():
            clock.seconds = 0.0
            started = time.perf_counter()
            run()
            synchronize(args.device)
            outside_seconds[name].append(time.perf_counter() - started - clock.seconds)
        return clocked_run

    results = compare({name: clocked(name, run) for name, run in cases.items()}, repeats=args.repeats,
                      device=args.device)
    outside = {name: statistics.median(seconds) for name, seconds in outside_seconds.items()}

    baseline = results["stock img2img, strength 1"]["seconds"]
    print(f"Kandinsky-shaped decoder, UNet (64, 128, 256), MoVQ factor 8, {size}x{size} px, T = {steps}, CFG on, "
          f"{args.device}, {torch.get_num_threads()} threads, median of {args.repeats} alternating rounds")
    print(f"{'case':36} {'UNet calls':>10} {'seconds':>9} {'vs stock':>9} {'outside UNet':>13} {'peak memory':>12}")
    for name, result in results.items():
        print(f"{name:36} {unet_calls[name]:>10} {result['seconds']:>9.3f} {result['seconds'] / baseline:>9.3f} "
              f"{outside[name]:>12.3f}s {mib(result['peak_bytes']):>12}")
    per_step = lambda name: results[name]["seconds"] / unet_calls[name]  # noqa: E731
    stock_step = per_step("stock img2img, strength 1")
    print(f"overhead per UNet step, uniform map:  {per_step('ours, uniform map, strength 1') / stock_step - 1:+.1%}")
    print(f"overhead per UNet step, gradient map: {per_step('ours, gradient map 0..1') / stock_step - 1:+.1%}")
    for name in ("ours, uniform map, strength 1", "ours, gradient map 0..1"):
        extra = (outside[name] - outside["stock img2img, strength 1"]) / unet_calls[name]
        print(f"time outside the UNet, {name[6:]}: {extra * 1000:+.1f} ms per step against stock")
    blend = blend_seconds(ours, gradient, steps)
    print(f"the blend alone: {blend * 1000:.2f} ms per step, {blend / stock_step:.2%} of a stock step")
    print(f"max strength 0.3: {unet_calls['ours, map with max strength 0.3']} UNet calls against {steps} for all steps "
          f"(the authors' code); time ratio {results['ours, map with max strength 0.3']['seconds'] / baseline:.2f}")


if __name__ == "__main__":
    main()
