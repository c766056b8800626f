"""Loading a family (its run.py) and its pipeline for the command line: `from_pretrained` on a Hub id or a local
folder, with another family's checkpoint, a gated model and every other failure to load told in one line."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path

from tools.cli import EXIT_RUN_FAILED, REPO_ROOT, SCHEDULERS, CliError, one_line, warn

# Which run.py takes a checkpoint, by the longest start of its model_index.json "_class_name" that fits: another
# family's checkpoint would load and then fail deep inside a step, so load_pipeline refuses it at once.
FAMILIES = {
    "StableDiffusion": ("an SD 1.x/2.x checkpoint", "SD2/run.py"),
    "StableDiffusionXL": ("an SDXL checkpoint", "SDXL/run.py"),
    "StableDiffusion3": ("an SD3 checkpoint", "SD3/run.py"),
    "StableDiffusionUpscale": ("an x4 upscaler", "IF/run.py --stage3-model"),
    "KandinskyV22": ("a Kandinsky 2.2 checkpoint", "Kandinsky/run.py"),
    "KandinskyV22Prior": ("a Kandinsky 2.2 prior", "Kandinsky/run.py --prior"),
    "IF": ("a DeepFloyd IF checkpoint", "IF/run.py"),
    "Flux": ("a Flux checkpoint", "Flux/run.py"),
    "FluxKontext": ("a FLUX.1 Kontext checkpoint", "Flux/run.py --kontext"),
    "FluxFill": ("a FLUX.1 Fill checkpoint", "Flux/run.py --fill"),
    "Flux2": ("a FLUX.2 checkpoint", "no run.py here: Flux2/run.py takes FLUX.2 [klein]"),
    "Flux2Klein": ("a FLUX.2 [klein] checkpoint", "Flux2/run.py"),
    "Chroma": ("a Chroma checkpoint", "Chroma/run.py"),
    "QwenImage": ("a Qwen-Image checkpoint", "QwenImage/run.py"),
    "QwenImageEdit": ("a Qwen-Image-Edit checkpoint", "QwenImage/run.py --edit"),
    "ZImage": ("a Z-Image checkpoint", "ZImage/run.py"),
    "Wan": ("a Wan checkpoint", "Wan/run.py"),
    "WanImageToVideo": ("a Wan image-to-video checkpoint", "no run.py here: Wan/run.py takes Wan 2.1 text-to-video"),
    "WanVACE": ("a Wan VACE checkpoint", "no run.py here: Wan/run.py takes Wan 2.1 text-to-video"),
    "WanAnimate": ("a Wan Animate checkpoint", "no run.py here: Wan/run.py takes Wan 2.1 text-to-video"),
}
# Wan 2.2's checkpoints have Wan 2.1's class name, and stock video-to-video, which runs one transformer on Wan 2.1's
# VAE, would take them and silently run a part of them: by what their model_index.json holds besides it.
WAN_22 = {"transformer_2": "two experts, a second transformer for the low-noise steps",
          "expand_timesteps": "a timestep per token, on Wan 2.2's own VAE"}


def load_pipeline(pipeline_class, model: str, *, torch_dtype, device: str, offload: bool = False,
                  flag: str = "--model", **from_pretrained_kwargs):
    """``pipeline_class.from_pretrained(model)`` (a Hub id or a local folder) on ``device``, or offloaded onto the
    current GPU. Another family's checkpoint and every failure to load end as one-line ``CliError``s."""
    path = model_path(model, flag)
    try:
        # By the stock class that ours extends: FluxDiffFillPipeline is a FluxFillPipeline, not a Flux img2img one.
        stock = next((cls for cls in pipeline_class.__mro__ if cls.__module__.startswith("diffusers.")), pipeline_class)
        if expected := family_of(stock.__name__):
            from huggingface_hub import hf_hub_download
            index = path / "model_index.json" if path.is_dir() else hf_hub_download(
                model, "model_index.json", cache_dir=from_pretrained_kwargs.get("cache_dir"))
            index = json.loads(Path(index).read_text())
            found = index.get("_class_name", "?")
            if family_of(found) != expected:
                raise CliError(f"{flag} {model}: {described(found)}; here {flag} takes {FAMILIES[expected][0]}")
            if expected == "Wan" and (key := next((key for key in WAN_22 if is_set(index.get(key))), None)):
                raise CliError(f"{flag} {model}: a Wan 2.2 checkpoint ({WAN_22[key]}), which stock Wan 2.1 "
                               "video-to-video does not run; pass a Wan 2.1 text-to-video checkpoint, such as "
                               "Wan-AI/Wan2.1-T2V-1.3B-Diffusers or Wan-AI/Wan2.1-T2V-14B-Diffusers")
        pipe = pipeline_class.from_pretrained(str(path) if path.is_dir() else model, dtype=torch_dtype,
                                              **from_pretrained_kwargs)
    except (OSError, ValueError, ImportError) as error:
        raise CliError(load_failure(error, model, flag, pipeline_class, path.is_dir()), EXIT_RUN_FAILED) from error
    if offload:  # for .to(), "cuda" is the current GPU; for offloading, it is GPU 0
        import torch
        pipe.enable_model_cpu_offload(device=f"cuda:{torch.cuda.current_device()}" if device == "cuda" else device)
    else:
        pipe.to(device)
    if device == "cpu":  # said after loading, so that a failed load prints its error alone
        warn_once("running on the CPU in fp32; this takes minutes")
    return pipe


def is_set(value) -> bool:
    """Whether a model_index.json entry is set: a component other than [null, null], or a flag that is true."""
    return any(value) if isinstance(value, list) else bool(value)


def model_path(model: str, flag: str = "--model") -> Path:
    """``model`` as a path, checked to be a folder or to look like a Hub id (``CliError`` naming ``flag`` if not)."""
    path = Path(model).expanduser()
    if not path.is_dir() and (path.exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model)):
        raise CliError(f"{flag} {model}: neither a diffusers folder (with model_index.json) nor a Hugging Face Hub id")
    return path


warn_once = functools.cache(warn)  # one warning however many models a run loads


def described(class_name: str) -> str:
    """What a pipeline of ``class_name`` is, and which run.py takes it: "an SDXL checkpoint (...), for SDXL/run.py"."""
    what, where = FAMILIES.get(family_of(class_name), ("a pipeline", "no run.py here"))
    return f"{what} ({class_name}), for {where}"


def pipeline_folder(model: str) -> str | None:
    """``described`` for a local folder that holds a whole pipeline (model_index.json), else None: a flag that takes
    one model (a ControlNet, a depth model) says what such a folder is instead of what file it lacks."""
    try:
        return described(json.loads((Path(model).expanduser() / "model_index.json").read_text()).get("_class_name"))
    except (OSError, ValueError, AttributeError):
        return None


def family_of(class_name: str) -> str | None:
    """The ``FAMILIES`` key of a pipeline class name, or None."""
    return max((start for start in FAMILIES if class_name.startswith(start)), key=len, default=None)


def load_failure(error: BaseException, model: str, flag: str, pipeline_class, local: bool) -> str:
    """The one line that says why ``pipeline_class`` (a pipeline or model class) could not load ``model``."""
    causes = [error]  # diffusers wraps the Hub's errors in OSError
    while (cause := causes[-1].__cause__ or causes[-1].__context__) is not None and cause not in causes:
        causes.append(cause)
    # Not the bare word "gated": a missing repo's message says "private or gated".
    if any(type(cause).__name__ == "GatedRepoError" or re.search(r"access (a )?gated repo", str(cause), re.I)
           for cause in causes):
        return (f"{model} is a gated model: accept its licence at https://huggingface.co/{model} and log in with "
                "`hf auth login`, then run again")
    if isinstance(error, ImportError):
        return f"loading {model} needs a package that is not installed: {one_line(error)}"
    if local or isinstance(error, ValueError):
        first = (str(error).strip() or type(error).__name__).splitlines()[0]
        return f"{flag} {model}: cannot load it as a {pipeline_class.__name__}: {one_line(first)}"
    from huggingface_hub import constants
    why = ("HF_HUB_OFFLINE=1 forbids downloading it; unset HF_HUB_OFFLINE to download it" if constants.HF_HUB_OFFLINE
           else "the Hugging Face Hub cannot be reached or has no such model (private ones need `hf auth login`)")
    return (f"cannot load model {model}: it is not fully cached locally and {why}, or pass {flag} PATH to load a "
            "local diffusers folder")


def set_scheduler(pipe, name: str) -> None:
    """Swaps in the scheduler ``--scheduler`` names, built from the current one's config; "default" keeps it."""
    if name == "default":
        return
    import diffusers
    try:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
    except (ValueError, TypeError, NotImplementedError) as error:
        raise CliError(f"--scheduler {name} does not work with this model: {one_line(error)}") from error


def make_generator(seed: int):
    """A CPU generator: diffusers draws the noise on it and moves it, so a seed means the same on every device."""
    import torch
    return torch.Generator("cpu").manual_seed(seed)


def families(root: Path = REPO_ROOT) -> dict[str, Path]:
    """``{"sd2": <repo>/SD2/run.py, ...}``: every folder of the repository that holds a run.py, by lower-case name."""
    return {path.parent.name.lower(): path for path in sorted(root.glob("*/run.py"))}


def load_family(name: str, root: Path = REPO_ROOT):
    """``<root>/<FAMILY>/run.py``, imported by path: a module with ``build_parser``, ``load_pipelines`` and ``edit``."""
    found = families(root)
    if name.lower() not in found:
        raise CliError(f"--family {name}: no model folder of that name with a run.py here (families: "
                       f"{', '.join(found) or 'none'})")
    return _import(found[name.lower()])


def image_families() -> dict[str, Path]:
    """``families`` but those whose run.py edits videos (``VIDEO = True``): what the image tools offer."""
    return {name: path for name, path in families().items() if not getattr(load_family(name), "VIDEO", False)}


def image_family(name: str, tool: str):
    """``load_family`` for a tool that edits images (``tool``: its name), which a video family's run.py refuses."""
    module = load_family(name)
    if getattr(module, "VIDEO", False):
        raise CliError(f"--family {name} edits videos, which {tool} does not: run {name_of(module)} itself")
    return module


def name_of(module) -> str:
    return str(Path(module.__file__).resolve().relative_to(REPO_ROOT))


@functools.cache
def _import(path: Path):
    spec = importlib.util.spec_from_file_location(f"_differential_diffusion_{path.parent.name.lower()}_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
