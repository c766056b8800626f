"""Wan 2.1 video-to-video: the cost of per-pixel strength, measured side by side with stock in one process.

    python benchmarks/bench_wan.py [--size 128] [--frames 17] [--steps 20] [--repeats 3] [--device cpu]

The transformer keeps Wan 2.1's blocks (WanTransformer3DModel on 1x2x2 patches, self-attention with RMS norm across
heads and 3D rotary embeddings, cross-attention to the text) at a width of 256 and 2 layers, over Wan 2.1's VAE
(8x in space, 4x in time, 16 latent channels, its levels and blocks) at base width 4, with random weights: nothing is
downloaded, and time per step depends on the shapes, not on the weights. The text encoder is the tests' tiny T5,
run once per call by both pipelines, outside the loop; the prompt is padded to stock's 512 tokens. Guidance 5, stock's
default, makes two transformer calls a step. The cases and figures are those of every benchmark (see bench_sd2.py),
on a video of `--frames` equal frames and a still map; "img2img" in the table stands for stock video-to-video. As
in SD, stock Wan keeps the last int(T s) steps at strength s, so a map whose strongest pixel is 0.3 costs
2 int(0.3 T) transformer calls. Peak memory is printed against stock's, beside what the blend holds.

The blend works on the latents (16 channels per latent cell) whatever the model, while a step's cost grows with the
transformer's width and depth: the overhead per step shrinks, relative to the step, as the model grows.
"""

import argparse
import sys
from pathlib import Path

from diffusers import WanVideoToVideoPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
from tests.tiny_models import build_pipeline, test_image  # noqa: E402
from tests.video_models import wan_components  # noqa: E402
from Wan import diff_pipe  # noqa: E402

HEADS, HEAD_DIM, FFN_DIM, LAYERS = 4, 64, 1536, 2  # Wan 2.1 1.3B: 12 heads of 128, 8960, 30 layers
VAE_BASE_DIM, VAE_DIM_MULT, VAE_RES_BLOCKS = 4, [1, 2, 4, 4], 2  # Wan 2.1's VAE: base 96, same levels and blocks
PROMPT = "a red apple on a table"


def main(argv=None):
    parser = harness.bench_parser(__doc__, size=128, multiple=16)
    parser.add_argument("--frames", type=frame_count, default=17, help="frames of the video, 1 + 4k (default 17)")
    args = parser.parse_args(argv)
    harness.quiet_libraries()
    components = wan_components(layers=LAYERS, heads=HEADS, head_dim=HEAD_DIM, ffn_dim=FFN_DIM,
                                vae_base_dim=VAE_BASE_DIM, vae_dim_mult=VAE_DIM_MULT, vae_res_blocks=VAE_RES_BLOCKS)
    stock = build_pipeline(WanVideoToVideoPipeline, components).to(args.device)
    ours = build_pipeline(diff_pipe.WanDiffVideoToVideoPipeline, components).to(args.device)
    inputs = dict(prompt=PROMPT, video=[test_image(args.size)] * args.frames, height=args.size, width=args.size,
                  guidance_scale=5.0, num_inference_steps=args.steps, output_type="np")
    results = harness.measure_family(
        f"Wan 2.1-shaped transformer, {LAYERS} layers of width {HEADS * HEAD_DIM}, VAE 8x/4x, {args.frames} frames "
        f"of {args.size}x{args.size} px", stock, ours, diff_pipe, inputs, args.size, args.repeats, args.device,
        guidance="guidance 5, two transformer calls a step")
    print_peak_memory(results)


def print_peak_memory(results: dict):
    """Each of our cases' peak memory (`side_by_side` results) against stock's, in bytes and as a ratio: the rise
    above the level at the start of a run, and the highest level itself."""
    stock = results["stock"]
    for name, result in results.items():
        if name != "stock":
            figures = [f"{what} {result[key]:,} B vs {stock[key]:,} B ({ratio(result[key], stock[key])})"
                       for what, key in (("rise", "peak_bytes"), ("total", "total_peak_bytes"))]
            print(f"peak memory, {harness.CASES[name]}, against stock: {'; '.join(figures)}", flush=True)


def ratio(ours: int, stock: int) -> str:
    return f"{ours / stock:.3f} x" if stock else "-"


def frame_count(text: str) -> int:
    frames = harness.positive_int(text)
    if (frames - 1) % 4:
        raise argparse.ArgumentTypeError(f"must be 1 + 4k (Wan's VAE encodes frame 0, then 4 at a time), not {frames}")
    return frames


if __name__ == "__main__":
    main()
