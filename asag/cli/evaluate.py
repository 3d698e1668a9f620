"""``asag evaluate``: a prompt set x N seeds x methods, sharded over processes, then metrics.

One process: ``asag evaluate ...``. Several (one per GPU, or CPU processes):
``accelerate launch -m asag evaluate ...`` or ``torchrun --nproc_per_node 4 -m asag evaluate ...``
(both set RANK / WORLD_SIZE / LOCAL_RANK). Every sample's seed is fixed by its prompt and its
index, each sample is made alone (batch of one), and the samples are split over processes by
position, so the images do not depend on the number of processes. Samples already on disk with
the same settings are not made again (resume by running the same command). Rank 0 computes the
metrics from the files on disk.
"""

import csv
import hashlib
import json
import os
import statistics
from typing import Dict, List, Optional

import numpy as np
import torch

from .images import grid, read_metadata
from .loading import CLIError, default_device
from .commands import methods_of, progress, short
from .session import Session, prompt_entries

RUN_FILE = "run.json"


# ----------------------------------------------------------------------------- prompts, seeds


def read_prompts(path: str) -> List[Dict]:
    """Entries ``{prompt, negative_prompt, label}`` from a .txt (one prompt per line), a .json
    (a list of prompts or of objects) or a .csv (columns prompt, and optionally
    negative_prompt, label / class_label)."""
    if not os.path.isfile(path):
        raise CLIError(f"prompt file {os.path.abspath(path)} does not exist")
    ext = os.path.splitext(path)[1].lower()
    with open(path, newline="", encoding="utf-8") as f:
        if ext == ".json":
            rows = json.load(f)
            if not isinstance(rows, list):
                raise CLIError(f"{path}: expected a JSON list of prompts or of objects with a 'prompt' or 'label'")
        elif ext == ".csv":
            rows = list(csv.DictReader(f))
        else:
            rows = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    entries = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            row = {"prompt": row}
        if not isinstance(row, dict):
            raise CLIError(f"{path}: entry {i} is {type(row).__name__}, expected a prompt or an object")
        label = row.get("label", row.get("class_label"))
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            label = int(label)
        entry = dict(prompt=row.get("prompt") or None, negative_prompt=row.get("negative_prompt") or None,
                     label=None if label in ("", None) else label)
        if entry["prompt"] is None and entry["label"] is None:
            raise CLIError(f"{path}: entry {i} has neither a prompt nor a label")
        entries.append(entry)
    if not entries:
        raise CLIError(f"{path} holds no prompts")
    return entries


def sample_seed(base: int, index: int, entry: Dict, sample: int) -> int:
    """The seed of sample ``sample`` of prompt-file entry ``index``: a hash of both and of the
    entry, so it depends neither on the number of processes nor on the number of samples."""
    key = json.dumps([base, index, entry.get("prompt"), entry.get("label"), sample])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------- processes


class World:
    """This process's rank among the processes accelerate / torchrun started (1 alone)."""

    def __init__(self):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.group = False
        if self.size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
                self.group = True

    def device(self, requested: Optional[str]) -> str:
        if requested:
            return requested
        device = default_device()
        return f"cuda:{self.local_rank}" if device == "cuda" and self.size > 1 else device

    def barrier(self):
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self):
        if self.group:
            import torch.distributed as dist

            dist.destroy_process_group()


# ----------------------------------------------------------------------------- metrics


def _load_rgb(paths: List[str]) -> torch.Tensor:
    """uint8 (N, 3, H, W) of images (the middle frame of videos), resized to the first's size."""
    from PIL import Image

    images, size = [], None
    for path in paths:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                image.seek(frames // 2)
            picture = image.convert("RGB")
            size = size or picture.size
            images.append(torch.from_numpy(np.array(picture.resize(size))).permute(2, 0, 1))
    return torch.stack(images)


def feature_extractor(name: str):
    """A function uint8 (N, 3, H, W) -> features (N, D): ``inception`` (torchmetrics, weights
    already on disk), ``digits`` (asag's digit classifier) or ``module:function``."""
    if name == "digits":
        from ..demo import models

        classifier, _ = models.load("classifier")

        def digits(images):
            gray = images.float().mean(1, keepdim=True) / 127.5 - 1
            gray = torch.nn.functional.interpolate(gray, size=(8, 8), mode="area")
            with torch.no_grad():
                return classifier.features(gray)

        return digits
    if name == "inception":
        return _inception
    module, sep, attr = name.partition(":")
    if not sep:
        raise CLIError(f"--features {name!r}: use inception, digits or module:function")
    import importlib

    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as error:
        raise CLIError(f"--features {name!r}: cannot import it ({error})") from None


def _inception(images: torch.Tensor) -> torch.Tensor:
    """Inception-v3 features through torchmetrics, from weights already on disk."""
    from ..demo.metrics import inception_features

    try:
        return inception_features(images)
    except ImportError as error:
        raise CLIError(f"--features inception: {error}") from None
    except (OSError, RuntimeError, ValueError) as error:  # no network: the weights' download fails
        folder = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise CLIError(
            f"--features inception: the Inception weights torchmetrics uses are not on disk (looked in {folder}; "
            f"TORCH_HOME moves it): copy them there from a machine with a network, or name other features "
            f"(--features module:function). ({type(error).__name__}: {error})"
        ) from None


def load_clip(model_path: str):
    """(CLIPModel, CLIPProcessor) from a local folder (transformers, save_pretrained)."""
    from transformers import CLIPModel, CLIPProcessor

    if not os.path.isdir(model_path):
        raise CLIError(f"--clip-model {model_path}: no such folder (a CLIP model saved with save_pretrained)")
    return (CLIPModel.from_pretrained(model_path, local_files_only=True).eval(),
            CLIPProcessor.from_pretrained(model_path, local_files_only=True))


def clip_score(images: torch.Tensor, prompts: List[str], clip) -> float:
    """Mean CLIP score, 100 max(cos(image, text), 0), as torchmetrics defines it; ``clip`` is
    a local model folder or what :func:`load_clip` returned."""
    model, processor = load_clip(clip) if isinstance(clip, str) else clip
    scores = []
    with torch.no_grad():
        for start in range(0, len(prompts), 32):
            batch = processor(text=prompts[start:start + 32], images=list(images[start:start + 32]),
                              return_tensors="pt", padding=True, truncation=True)
            img = model.get_image_features(pixel_values=batch["pixel_values"])
            txt = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
            scores += (100 * cos.clamp_min(0)).tolist()
    return statistics.mean(scores)


def reference_paths(folder: str) -> List[str]:
    if not os.path.isdir(folder):
        raise CLIError(f"--reference {os.path.abspath(folder)}: no such folder of images")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp")))
    if len(paths) < 2:
        raise CLIError(f"--reference {os.path.abspath(folder)}: needs at least 2 images, found {len(paths)}")
    return paths


def metrics(paths: List[str], metas: List[Dict], args, clip=None, extract=None, reference_features=None) -> Dict:
    """One method's row: ``clip`` from :func:`load_clip`, ``extract`` from
    :func:`feature_extractor` (both loaded once for all methods)."""
    from ..demo.metrics import fid, precision_recall

    result = dict(images=len(paths), seconds_per_image=statistics.mean(m["seconds"] for m in metas))
    images = _load_rgb(paths)
    if clip is not None:
        prompts = [m["call"].get("prompt") for m in metas]
        if any(p is None for p in prompts):
            raise CLIError("--clip-model needs prompts: the samples have none")
        result["clip_score"] = clip_score(images, prompts, clip)
    if reference_features is not None:
        features = extract(images).double()
        result["fid"] = fid(reference_features, features)
        result["precision"], result["recall"] = precision_recall(reference_features, features, k=args.k)
    return result


# ----------------------------------------------------------------------------- the command


def _settings(args, session, methods, entries) -> Dict:
    """What the samples depend on: a resumed run must match it."""
    return dict(model=args.model, call=session.kwargs, asag=session.runner.base, seed=args.seed,
                dtype=str(session.dtype), methods=[m.label for m in methods], entries=entries)


def _check_run_file(out: str, settings: Dict) -> None:
    path = os.path.join(out, RUN_FILE)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        changed = [k for k in settings if k not in ("methods", "entries") and previous.get(k) != json.loads(json.dumps(settings[k], default=str))]
        if changed:
            raise CLIError(f"{out} holds samples made with other settings ({', '.join(changed)} differ): "
                           "use another --out, or delete the folder to start over")


def evaluate(args) -> Optional[Dict]:
    world = World()
    try:
        return _evaluate(args, world)
    finally:
        world.close()


def _evaluate(args, world: World) -> Optional[Dict]:
    main = world.rank == 0
    if args.prompts:
        entries = read_prompts(args.prompts)
    else:
        entries = prompt_entries(args.prompt)
    session = Session(args, device=world.device(args.device), quiet=not (args.step_progress and main))
    methods = methods_of(args, session)
    settings = _settings(args, session, methods, entries)
    if main:
        _check_run_file(args.out, settings)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, RUN_FILE), "w") as f:
            json.dump(settings, f, indent=1, default=str)
    world.barrier()

    items = [(m, p, i) for m in methods for p in range(len(entries)) for i in range(args.samples)]
    path_of = lambda m, p, i: os.path.join(args.out, m.slug, f"{p:05d}-{i:04d}.png")  # noqa: E731
    mine = items[world.rank::world.size]
    todo = [item for item in mine if not _done(path_of(*item), sample_seed(args.seed, item[1], entries[item[1]], item[2]))]
    bar = None
    if todo and (args.progress == "all" or (args.progress == "rank0" and main)):
        bar = progress(len(mine), f"asag evaluate [rank {world.rank}/{world.size}]", initial=len(mine) - len(todo),
                       position=world.rank if args.progress == "all" else 0)
    for method, p, i in todo:
        session.make(method, entries[p], sample_seed(args.seed, p, entries[p], i), path_of(method, p, i))
        if bar:
            bar.update()
    if bar:
        bar.close()
    world.barrier()
    if not main:
        return None
    return _report(args, methods, entries, items, path_of)


def _done(path: str, seed: int) -> bool:
    meta = read_metadata(path) if os.path.exists(path) else None
    return meta is not None and meta.get("seed") == seed


def _report(args, methods, entries, items, path_of) -> Dict:
    clip = load_clip(args.clip_model) if args.clip_model else None
    extract = feature_extractor(args.features) if args.reference else None
    reference = extract(_load_rgb(reference_paths(args.reference))).double() if args.reference else None
    rows = []
    for method in methods:
        paths = [path_of(m, p, i) for m, p, i in items if m is method]
        metas = [read_metadata(path) for path in paths]
        rows.append(dict(method=method.label, **metrics(paths, metas, args, clip, extract, reference)))
    columns = ["method", "images", "seconds_per_image"] + [c for c in ("clip_score", "fid", "precision", "recall") if c in rows[0]]
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = min(args.grid_samples, len(entries) * args.samples)
    cells = [[_picture(path_of(method, *divmod(k, args.samples))) for k in range(shown)] for method in methods]
    column_labels = [_column_label(entries, *divmod(k, args.samples)) for k in range(shown)]
    grid(cells, [m.label for m in methods], column_labels, cell=args.cell).save(os.path.join(args.out, "grid.png"))
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        table.append("| " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    text = (f"{len(entries)} prompt(s) x {args.samples} sample(s), {len(methods)} method(s), from {args.model}"
            + (f"; FID/precision/recall against {args.reference} in {args.features} features" if args.reference else "")
            + "\n\n" + "\n".join(table) + "\n\n![samples](grid.png)\n")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    print("\n".join(table))
    print(f"wrote {os.path.abspath(os.path.join(args.out, 'results.md'))}, results.csv and grid.png")
    return dict(rows=rows)


def _picture(path):
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.copy()


def _column_label(entries, p, i):
    entry = entries[p]
    what = entry["prompt"] if entry["prompt"] is not None else (f"label {entry['label']}" if entry["label"] is not None else "")
    return f"{short(what)} #{i}".strip()


def _fmt(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)
