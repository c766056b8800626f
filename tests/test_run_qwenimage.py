"""What only QwenImage/run.py does: true classifier-free guidance, on by default. tests/test_run_contract.py checks
what every run.py does, Qwen-Image's among them."""

import pytest
from conftest import build_pipeline
from flow_models import count_transformer_calls
from flow_models2 import qwenimage_components

import QwenImage.run as qwen_run
from QwenImage.diff_pipe import QwenImageDiffImg2ImgPipeline
from tools import cli


@pytest.mark.parametrize("flags, calls_per_step", [([], 2), (["--guidance-scale", "1"], 1)])
def test_guidance_is_true_cfg_and_on_by_default_without_a_negative_prompt(inputs, flags, calls_per_step):
    # Stock runs true CFG only with a negative prompt; run.py always gives one (" " for none, as diffusers' example).
    image, map_path = inputs
    args = cli.parse_args(
        qwen_run.build_parser(),
        ["--image", str(image), "--map", str(map_path), "--prompt", "x", "--negative-prompt", "", "--steps", "3",
         "--device", "cpu", *flags],
    )
    pipe = build_pipeline(QwenImageDiffImg2ImgPipeline, qwenimage_components())
    calls = count_transformer_calls(pipe)
    image_in, map_in = cli.load_inputs(args)
    _, steps_run = qwen_run.edit(pipe, args, images=[image_in], maps=[map_in], prompts=["x"],
                                 negative_prompts=[args.negative_prompt], seeds=[0])
    assert steps_run == 3 and len(calls) == calls_per_step * 3
