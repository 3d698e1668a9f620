"""``asag generate``, ``asag compare`` and ``asag sweep``: images from a user's pipeline with
ASAG, side by side with other methods, and over a grid of settings."""

import os
import statistics
from typing import Dict, List

from .images import grid, read_metadata
from .loading import CLIError
from .methods import default_methods
from .options import MethodSpec, convert, parse_method
from .session import Session, prompt_entries


def progress(total: int, desc: str, **options):
    """A progress bar over images (tqdm comes with diffusers)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="image", **options)


def short(text, width=40):
    text = "" if text is None else str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def generate(args) -> List[str]:
    if args.reproduce:
        return reproduce(args)
    session = Session(args, quiet=not args.step_progress)
    method = parse_method(args.method)
    session.runner.check(method)
    paths = []
    entries = prompt_entries(args.prompt)
    bar = progress(len(entries) * len(args.seeds), "asag generate")
    for p, entry in enumerate(entries):
        for seed in args.seeds:
            path = os.path.join(args.out, f"{p:03d}-seed{seed}.png")
            session.make(method, entry, seed, path)
            paths.append(path)
            bar.update()
    bar.close()
    print(f"wrote {len(paths)} image(s) to {os.path.abspath(args.out)} (settings in each PNG: asag generate --reproduce FILE)")
    return paths


def reproduce(args) -> List[str]:
    """Makes an image again from the settings saved in it."""
    meta = read_metadata(args.reproduce)
    if meta is None:
        raise CLIError(f"{args.reproduce} holds no asag settings (it was not written by asag generate/compare/sweep/evaluate)")
    args.model = args.model or meta["model"]
    args.dtype = meta.get("dtype", "auto")
    session = Session(args, quiet=not args.step_progress)
    call = dict(meta["call"])
    entry = dict(prompt=call.pop("prompt", None), negative_prompt=call.pop("negative_prompt", None))
    labels = call.pop("class_labels", None)
    entry["label"] = labels[0] if labels else None
    session.kwargs = call
    method = MethodSpec(meta["method"], {}, meta.get("label", meta["method"]))
    if meta["method"] == "asag":
        session.runner.base = dict(meta["asag"])
    if meta["method"] == "pag":
        method.settings = dict(meta["pag"])
    path = os.path.join(args.out, "reproduced-" + os.path.basename(args.reproduce))
    session.make(method, entry, meta["seed"], path)
    print(f"wrote {os.path.abspath(path)}")
    return [path]


def methods_of(args, session) -> List[MethodSpec]:
    methods = [parse_method(m, session.runner.base) for m in args.method] if args.method else default_methods(session.runner)
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise CLIError(f"--method given twice: {labels}")
    for method in methods:
        session.runner.check(method)
    return methods


def _time_table(times: Dict[str, List[float]]) -> str:
    lines = ["| method | images | seconds per image (median) | relative to the first |", "|---|---|---|---|"]
    first = None
    for label, values in times.items():
        median = statistics.median(values)
        first = first or median
        lines.append(f"| {label} | {len(values)} | {median:.3f} | {median / first:.2f}x |")
    return "\n".join(lines)


def compare(args) -> Dict:
    session = Session(args, quiet=not args.step_progress)
    methods = methods_of(args, session)
    entries = prompt_entries(args.prompt)
    columns = [(p, entry, seed) for p, entry in enumerate(entries) for seed in args.seeds]
    bar = progress(len(methods) * len(columns), "asag compare")
    cells, times = [], {}
    for method in methods:
        row = []
        for p, entry, seed in columns:
            path = os.path.join(args.out, method.slug, f"{p:03d}-seed{seed}.png")
            meta = session.make(method, entry, seed, path)
            row.append(meta["picture"])
            times.setdefault(method.label, []).append(meta["seconds"])
            bar.update()
        cells.append(row)
    bar.close()
    column_labels = [f"seed {seed}" if len(entries) == 1 else f"{short(entry['prompt'], 60)} (seed {seed})"
                     for p, entry, seed in columns]
    title = short(entries[0]["prompt"], 120) if len(entries) == 1 and entries[0]["prompt"] else type(session.pipe).__name__
    picture = grid(cells, [m.label for m in methods], column_labels, cell=args.cell, title=title)
    os.makedirs(args.out, exist_ok=True)
    grid_path = os.path.join(args.out, "compare.png")
    picture.save(grid_path)
    table = _time_table(times)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(f"{type(session.pipe).__name__} from {args.model} on {session.device} ({str(session.dtype).replace('torch.', '')})"
                f"\n\n![compare](compare.png)\n\n{table}\n")
    print(table)
    print(f"wrote {os.path.abspath(grid_path)} ({picture.width}x{picture.height}: {len(methods)} methods x {len(columns)} images)")
    return dict(grid=grid_path, times=times, size=picture.size)


def _values(spec: str):
    name, sep, text = spec.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not text:
        raise CLIError(f"--vary expects NAME=V1,V2,..., got {spec!r}")
    texts = text.split(";") if name == "layers" else text.split(",")  # layer lists use commas themselves
    return name, [(t.strip(), convert(name, t.strip())) for t in texts]


def sweep(args) -> Dict:
    if not 1 <= len(args.vary) <= 2:
        raise CLIError("--vary: give one or two parameters (e.g. --vary scale=1,2,4 --vary lam=1,4)")
    session = Session(args, quiet=not args.step_progress)
    (row_name, row_values), (col_name, col_values) = [_values(v) for v in args.vary] + ([(None, [(None, None)])] if len(args.vary) == 1 else [])
    if row_name == col_name:
        raise CLIError(f"--vary names {row_name} twice")
    entry = prompt_entries([args.prompt] if args.prompt else None)[0]
    methods = [[MethodSpec("asag", {row_name: r, **({col_name: c} if col_name else {})},
                           f"asag:{row_name}={r_text}" + (f",{col_name}={c_text}" if col_name else ""))
                for c_text, c in col_values] for r_text, r in row_values]
    for method in (m for row in methods for m in row):  # every cell's settings, before any image
        session.runner.check(method)
    bar = progress(len(row_values) * len(col_values), "asag sweep")
    cells = []
    for row in methods:
        cells.append([])
        for method in row:
            cells[-1].append(session.make(method, entry, args.seed, os.path.join(args.out, f"{method.slug}.png"))["picture"])
            bar.update()
    bar.close()
    title = f"{short(entry['prompt'], 80) + ', ' if entry['prompt'] else ''}seed {args.seed}"
    column_labels = [f"{col_name} = {c}" for c, _ in col_values] if col_name else [""]
    picture = grid(cells, [f"{row_name} = {r}" for r, _ in row_values], column_labels, cell=args.cell, title=title)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sweep.png")
    picture.save(path)
    print(f"wrote {os.path.abspath(path)} ({len(row_values)} x {len(col_values)})")
    return dict(grid=path, size=picture.size)
