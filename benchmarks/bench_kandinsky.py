"""Kandinsky 2.2: the cost of per-pixel strength, measured side by side with stock img2img in one process.

    python benchmarks/bench_kandinsky.py [--size 256] [--steps 20] [--repeats 3] [--device cpu]

The decoder has Kandinsky 2.2's layout (a UNet of ResNet and simple cross-attention blocks conditioned on an image
embedding, and a spatially normalised MoVQ of factor 8) at a small width, with random weights: nothing is
downloaded, and time per step depends on the shapes, not on the weights. The prior is left out: it runs the same for
both, before the decoder. The cases and the figures printed are those of every benchmark (see bench_sd2.py).
"""

import sys
from pathlib import Path

import torch
from diffusers import KandinskyV22Img2ImgPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
from Kandinsky import diff_pipe  # noqa: E402
from tests.tiny_models import build_pipeline, kandinsky_decoder_components, test_image  # noqa: E402

WIDTHS = (64, 128, 256)
EMBEDDING_WIDTH = 256  # Kandinsky 2.2: 1280 (CLIP-bigG image embeddings)


def main(argv=None):
    args = harness.bench_parser(__doc__).parse_args(argv)
    harness.quiet_libraries()
    components = kandinsky_decoder_components(widths=WIDTHS, layers_per_block=2, attention_head_dim=32,
                                              movq_widths=(32, 64, 64, 64), embedding_width=EMBEDDING_WIDTH,
                                              scheduler="ddpm")
    stock = build_pipeline(KandinskyV22Img2ImgPipeline, components).to(args.device)
    ours = build_pipeline(diff_pipe.KandinskyV22DiffImg2ImgPipeline, components).to(args.device)
    embeds = harness.embeddings((1, EMBEDDING_WIDTH), args.device)
    inputs = dict(image=test_image(args.size), image_embeds=embeds, negative_image_embeds=torch.zeros_like(embeds),
                  height=args.size, width=args.size, guidance_scale=4.0, num_inference_steps=args.steps,
                  output_type="np")
    harness.measure_family(f"Kandinsky-shaped decoder, UNet {WIDTHS}, MoVQ factor 8, {args.size}x{args.size} px",
                           stock, ours, diff_pipe, inputs, args.size, args.repeats, args.device)


if __name__ == "__main__":
    main()
