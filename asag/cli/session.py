"""What every command shares: the loaded pipeline, its runner, the call arguments, and one
call's image saved with everything needed to make it again."""

import os
from typing import Dict, List, Optional

from .. import __version__
from .images import pictures, save
from .loading import CLIError, default_device, load_pipeline, resolve_dtype
from .methods import Runner
from .options import MethodSpec, asag_settings, call_kwargs, takes


class Session:
    def __init__(self, args, device: Optional[str] = None, quiet: bool = False):
        self.device = device or args.device or default_device()
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.model = args.model
        self.pipe = load_pipeline(args.model, device=self.device, dtype=self.dtype, variant=args.weights_variant, quiet=quiet)
        self.runner = Runner(self.pipe, asag_settings(args))
        self.kwargs = call_kwargs(self.pipe, args)

    def entry_kwargs(self, entry: Dict) -> Dict:
        """Call arguments for one prompt-file entry (``prompt``, ``negative_prompt``, ``label``)."""
        kwargs = dict(self.kwargs)
        if entry.get("prompt") is not None:
            if not takes(self.pipe, "prompt"):
                raise CLIError(f"{type(self.pipe).__name__} takes no prompt: leave prompts out (it is unconditional or class-conditional)")
            kwargs["prompt"] = entry["prompt"]
        if entry.get("negative_prompt") is not None:
            kwargs["negative_prompt"] = entry["negative_prompt"]
        if entry.get("label") is not None:
            if not takes(self.pipe, "class_labels"):
                raise CLIError(f"a class label was given but {type(self.pipe).__name__} takes no class_labels")
            kwargs["class_labels"] = [entry["label"]]
        return kwargs

    def make(self, method: MethodSpec, entry: Dict, seed: int, path: str) -> Dict:
        """Generates one image (or video) for ``entry`` with ``seed``, saves it at ``path`` with
        its settings, and returns them (with ``seconds``)."""
        kwargs = self.entry_kwargs(entry)
        output, seconds = self.runner(method, kwargs, seed, self.device)
        picture = pictures(output)[0]
        metadata = dict(
            asag_version=__version__, model=self.model, pipeline=type(self.pipe).__name__,
            dtype=str(self.dtype).replace("torch.", ""), device=self.device, seed=seed, label=method.label,
            call={k: v for k, v in kwargs.items()}, seconds=round(seconds, 4), **self.runner.describe(method),
        )
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save(picture, path, metadata)
        metadata["picture"] = picture
        return metadata


def prompt_entries(prompts: Optional[List[str]]) -> List[Dict]:
    """Command-line prompts as entries; none: one entry without a prompt (unconditional)."""
    return [dict(prompt=p, negative_prompt=None, label=None) for p in (prompts or [None])]
