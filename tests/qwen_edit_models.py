"""Tiny random-weight Qwen-Image-Edit components, for offline tests in seconds: Qwen-Image's (tests/flow_models2.py)
with a processor that reads the prompt's image, and a smaller area for stock's fixed working size."""

from contextlib import contextmanager

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_inpaint as edit_inpaint
from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

from tests.flow_models2 import qwen2_5_vl_encoder, qwen_tokenizer, qwenimage_components

# The tokens of the prompt template that Qwen-Image-Edit wraps around the image, by the config's name for their ids.
VISION_TOKENS = {"vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "image": "<|image_pad|>",
                 "video": "<|video_pad|>"}  # the processor looks the video token up too
# Stock edits at about 1024 x 1024 px whatever the image's size: 65536 tokens with the tiny VAE's 2 px latents (and as
# many of the image's). At 512 px, a quarter of that, one stock call of one step took 20 s of CPU here, against 0.05 s
# at 32 px. The tests run stock and ours at this area instead (`small_working_area`). Any area in [16**2, 48**2) keeps a
# 32 px square image at 32 px, as 1024**2 keeps a 1024 px one; 2048 also keeps the contract's thinnest image (7 x 45 px,
# in tests/test_contract.py) one 32 px column wide, where 1024 would round it to none.
TEST_AREA = 2048


def qwen_vl_tokenizer():
    """Qwen-Image's tiny tokenizer with the vision tokens, each one token."""
    tokenizer = qwen_tokenizer()
    tokenizer.add_tokens(list(VISION_TOKENS.values()), special_tokens=True)
    return tokenizer


def qwen_vl_processor(tokenizer):
    """Qwen2-VL's processor on `tokenizer`: it resizes the image to whole 28 px cells (2x2 patches of 14 px), one
    `<|image_pad|>` token a cell, at least 1 and at most 16 cells. It needs a video processor too, which stock never
    calls."""
    sizes = dict(min_pixels=28 * 28, max_pixels=16 * 28 * 28)
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(**sizes))


def qwenimage_edit_components(scheduler=None, **sizes):
    """Components for ``QwenImageEditInpaintPipeline``: Qwen-Image's (with `sizes`), whose Qwen2.5-VL encoder reads
    the image too, where the tokenizer's vision tokens stand."""
    tokenizer = qwen_vl_tokenizer()
    text_encoder = qwen2_5_vl_encoder(tokenizer)
    text_encoder.config.update({f"{name}_token_id": tokenizer.convert_tokens_to_ids(token)
                                for name, token in VISION_TOKENS.items()})
    return {**qwenimage_components(scheduler, **sizes), "tokenizer": tokenizer, "text_encoder": text_encoder,
            "processor": qwen_vl_processor(tokenizer)}


@contextmanager
def small_working_area(area: int = TEST_AREA):
    """Stock's own `calculate_dimensions` at `area` instead of 1024**2, for stock and ours alike, which both call it
    through its module; restored on leaving."""
    stock = edit_inpaint.calculate_dimensions
    edit_inpaint.calculate_dimensions = lambda target_area, ratio: stock(area, ratio)
    try:
        yield
    finally:
        edit_inpaint.calculate_dimensions = stock

