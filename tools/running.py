"""Running a family's edit for the command line: on the whole frame, or on the crop of the change
(--crop-margin, tools/crop.py), and stopping between steps on Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading

from tools import caching
from tools.cli import warn
from tools.crop import edit_on_crop


def edit_images(pipe, args: argparse.Namespace, edit=None, **call) -> list:
    """`pipe(**call)`'s images, or a video pipeline's videos (or `edit`'s, which calls it); with --crop-margin, only
    the box around the pixels that the map releases is edited, and pasted into the input (tools/crop.py). --cache and
    --compile are turned on first (tools/caching.py)."""
    caching.prepare(pipe, args)
    with stopping_between_steps(pipe, call):
        if args.crop_margin is None:
            output = (edit or pipe)(**call)
            return output.images if hasattr(output, "images") else output.frames
        return edit_on_crop(pipe, args.crop_margin, args.crop_upscale, edit, **call)[0]


@contextlib.contextmanager
def stopping_between_steps(pipe, call: dict, keyword: str = "callback_on_step_end"):
    """Ctrl-C during the block: the first sets ``pipe._interrupt``, so that stock's loop runs no further step, and
    the block then ends as KeyboardInterrupt (``main``'s "interrupted", nothing written); a second stops at once.
    A later stage (SDXL's refiner) resets ``_interrupt`` as it starts and Kandinsky's loop never reads it, so a step
    callback added to ``call`` as ``keyword`` ends those after their step: IF's stages and the x4 upscaler read
    neither ``_interrupt`` nor ``callback_on_step_end``, only the older ``callback(step, timestep, tensor)``, so IF
    passes ``keyword="callback"``. Only the main thread takes signals (not the app's)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    asked = []

    def interrupt(signum, frame):
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)
        pipe._interrupt = True
        warn("stopping after this step; press Ctrl-C again to stop at once")

    def step_end(*arguments):  # (pipe, step, timestep, tensors), or the older style's (step, timestep, tensor)
        if asked:
            raise KeyboardInterrupt
        return arguments[-1]  # the new style's tensors, handed back unchanged; the older style ignores it

    call.setdefault(keyword, step_end)
    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if asked:
        raise KeyboardInterrupt
