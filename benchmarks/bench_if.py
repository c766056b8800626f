"""DeepFloyd IF: the cost of per-pixel strength at stages I and II, side by side with stock IF in one process.

    python benchmarks/bench_if.py [--size 64] [--stage2-size 128] [--steps 20] [--stage2-steps 10] [--repeats 3]
                                  [--device cpu]

The models have IF's layout (pixel-space UNets with learned variance, text-pooled conditioning, a 6-channel stage II
reading the upscaled stage I image) at a small width, with random weights: nothing is downloaded, and time per step
depends on the shapes, not on the weights. Text embeddings are given, since encoding is the same for both. The map
is given at stage II's size, as a user's would be. For each stage, the cases and the figures printed are those of
every benchmark (see bench_sd2.py).
"""

import sys
from pathlib import Path

import torch
from diffusers import IFImg2ImgPipeline, IFImg2ImgSuperResolutionPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
from IF import diff_pipe_I, diff_pipe_II  # noqa: E402
from tests.tiny_models import build_pipeline, if_stage1_components, if_stage2_components, test_image  # noqa: E402

WIDTHS = (32, 64, 128)
TEXT_WIDTH = 256  # T5-XXL's is 4096; only the layers that read it get cheaper
UNET_SIZES = dict(widths=WIDTHS, layers_per_block=2, attention_head_dim=64, text_width=TEXT_WIDTH)


def main(argv=None):
    parser = harness.bench_parser(__doc__, size=64, multiple=4)
    parser.add_argument("--stage2-size", type=harness.multiple_of(4), default=128,
                        help="stage II image side in pixels (default 128; IF's is 256)")
    parser.add_argument("--stage2-steps", type=harness.positive_int, default=10,
                        help="stage II num_inference_steps T (default 10)")
    args = parser.parse_args(argv)
    harness.quiet_libraries()
    embeds = harness.embeddings((1, 77, TEXT_WIDTH), args.device)
    text = dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), output_type="pt")
    image = test_image(args.stage2_size)

    components = if_stage1_components(args.size, **UNET_SIZES)
    stock = build_pipeline(IFImg2ImgPipeline, components).to(args.device)
    ours = build_pipeline(diff_pipe_I.IFDiffImg2ImgPipeline, components).to(args.device)
    harness.measure_family(f"IF-shaped stage I, UNet {WIDTHS}, {args.size}x{args.size} px", stock, ours,
                           diff_pipe_I, dict(image=image, num_inference_steps=args.steps, **text), args.stage2_size,
                           args.repeats, args.device)

    components = if_stage2_components(args.stage2_size, **UNET_SIZES)
    stock = build_pipeline(IFImg2ImgSuperResolutionPipeline, components).to(args.device)
    ours = build_pipeline(diff_pipe_II.IFDiffImg2ImgSuperResolutionPipeline, components).to(args.device)
    low_res = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    inputs = dict(image=low_res.to(args.device), original_image=image, num_inference_steps=args.stage2_steps, **text)
    harness.measure_family(f"IF-shaped stage II, UNet {WIDTHS}, {args.size} -> {args.stage2_size} px", stock, ours,
                           diff_pipe_II, inputs, args.stage2_size, args.repeats, args.device)


if __name__ == "__main__":
    main()
