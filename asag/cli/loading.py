"""Loading a user's diffusers pipeline for the command line: a local folder or a model in the
local Hugging Face cache, never the network, with errors that say what was looked at."""

import os
import re

import torch


class CLIError(Exception):
    """A mistake in the command line or its inputs: printed as one line, no traceback."""


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name, device: str) -> torch.dtype:
    """``auto``: float16 on a GPU, float32 on a CPU."""
    if name in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _cached_snapshot(repo_id: str) -> str:
    """The local folder of a model in the Hugging Face cache, or CLIError naming the cache."""
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception as error:  # huggingface_hub raises several kinds for "not cached"
        raise CLIError(
            f"{repo_id!r} is not a folder, and its weights are not in the local Hugging Face cache "
            f"(looked in {constants.HF_HUB_CACHE}; set HF_HUB_CACHE or HF_HOME to look elsewhere). "
            f"Download it first where there is a network (hf download {repo_id}), or "
            f"give the folder of a pipeline saved with save_pretrained. ({type(error).__name__})"
        ) from None


def pipeline_folder(model: str) -> str:
    """The folder holding the pipeline ``model`` names (a path, or a cached repository id)."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        folder = path
    elif os.path.exists(path):
        raise CLIError(f"{model} is a file: asag needs the folder of a diffusers pipeline (with model_index.json)")
    elif not REPO_ID.fullmatch(model) or model.startswith("."):
        raise CLIError(f"model folder {os.path.abspath(path)} does not exist")
    else:
        folder = _cached_snapshot(model)
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        hint = ""
        if os.path.isfile(os.path.join(folder, "config.json")):
            hint = (" It holds a single model (config.json): save the whole pipeline with "
                    "pipe.save_pretrained(folder) and give that folder.")
        raise CLIError(f"{os.path.abspath(folder)} is not a diffusers pipeline: it has no model_index.json.{hint}")
    return folder


def _dtype_kwarg(dtype) -> dict:
    """``dtype=`` where diffusers takes it (``torch_dtype`` is deprecated there), else ``torch_dtype=``."""
    from diffusers.pipelines import pipeline_utils

    return {"dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype": dtype}


def load_pipeline(model: str, *, device: str, dtype, variant=None, quiet: bool = False):
    """``DiffusionPipeline.from_pretrained`` on local files only, moved to ``device``."""
    from diffusers import DiffusionPipeline

    folder = pipeline_folder(model)
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, variant=variant, **_dtype_kwarg(dtype))
    except (OSError, ValueError, EnvironmentError) as error:
        raise CLIError(f"could not load the diffusers pipeline in {os.path.abspath(folder)}: {error}") from None
    pipe.to(device)
    if quiet:
        pipe.set_progress_bar_config(disable=True)
    return pipe
