"""What is particular to ZImageDiffImg2ImgPipeline: the prompt lists it is given stay as given. The contract of
every family (tests/test_contract.py) checks the rest.
"""

from conftest import build_pipeline, test_image
from families import FAMILIES, band_map


def test_prompt_lists_are_left_as_given():
    # Stock Z-Image writes the chat-formatted prompts into the list it is given; a second call would format them twice.
    entry = FAMILIES["zimage"]
    ours = build_pipeline(entry.ours, entry.components())
    prompts, negative_prompts = ["a red apple"], ["blurry"]
    ours(prompts, negative_prompt=negative_prompts, image=test_image(), map=band_map(1.0, 0.0), num_inference_steps=2,
         output_type="latent", max_sequence_length=32)
    assert (prompts, negative_prompts) == (["a red apple"], ["blurry"])
