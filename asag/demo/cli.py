"""``asag demo``: ASAG at work on the shipped digit models, in about a minute and a half on a 2-core CPU.

Samples the same seeds with no guidance, CFG 1.5, and CFG 1.5 plus PAG, SEG-style blur and
ASAG on the class-conditional DiT, and with no guidance, PAG, SEG and ASAG on the
unconditional UNet: PAG, SEG and ASAG each with the settings the quality benchmark chose for
it on its validation split ("tuned"), and ASAG once more with asag's defaults. Writes a
labelled PNG grid and prints the metrics table.
"""

import argparse
import os
import time

import torch

from . import evaluation


def _tqdm(desc):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return lambda it: tqdm(it, desc=desc, leave=False)


def _grid(panels, path, cell=32, columns=20, gap=2):
    """A PNG of `panels`: list of (title, [(row label, images (N, 1, 8, 8) in [-1, 1])])."""
    from PIL import Image, ImageDraw

    label_w, title_h = 196, 18
    rows = sum(len(r) for _, r in panels)
    width = label_w + columns * (cell + gap)
    height = rows * (cell + gap) + len(panels) * title_h
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for title, row_list in panels:
        draw.text((4, y + 3), title, fill="black")
        y += title_h
        for label, images in row_list:
            draw.text((4, y + cell // 2 - 5), label, fill="black")
            pixels = ((images[:columns, 0] + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
            for i, img in enumerate(pixels):
                tile = Image.fromarray(255 - img, mode="L").resize((cell, cell), Image.NEAREST)
                canvas.paste(tile.convert("RGB"), (label_w + i * (cell + gap), y))
            y += cell + gap
    canvas.save(path)


def _table(rows):
    header = f"{'model':<5} {'method':<28} {'FID':>7} {'prec':>6} {'recall':>6} {'IS':>6} {'class acc':>9} {'evals':>6} {'time':>6}"
    lines = [header, "-" * len(header)]
    for kind, name, r in rows:
        acc = f"{r['class_accuracy']:.3f}" if "class_accuracy" in r else "-"
        evals = str(r.get("evaluations", "-"))
        secs = f"{r['seconds']:.1f}s" if "seconds" in r else "-"
        lines.append(f"{kind:<5} {name:<28} {r['fid']:>7.2f} {r['precision']:>6.3f} {r['recall']:>6.3f} {r['is']:>6.2f} {acc:>9} {evals:>6} {secs:>6}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="asag demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=360, help="samples per method (default 360; the metrics' reference is the 450 held-out digits)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="asag_demo.png", help="the PNG grid to write")
    parser.add_argument("--quick", action="store_true", help="a few samples and steps (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.steps = 40, 6
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    bench = evaluation.Bench()
    print(f"asag demo: {args.samples} samples per method, {args.steps} DDIM steps, seed {args.seed}; "
          f"models trained by benchmarks/quality/train.py (seed {bench.dit_meta['seed']})")
    rows, panels = [("real", "held-out digits vs train", bench.real_baseline(args.samples))], []
    for kind, title in (("dit", "class-conditional DiT (timm attention)"), ("unet", "unconditional UNet2DModel (diffusers)")):
        panel = []
        for method in evaluation.comparison_methods(kind):
            result = bench.run(kind, method, args.samples, args.seed, args.steps, progress=_tqdm(f"{kind}: {method.name}"))
            rows.append((kind, method.name, result))
            panel.append((method.name, result["images"]))
        panels.append((title, panel))
    _grid(panels, args.out)
    print()
    print(_table(rows))
    print(f"\nFID, precision, recall: in the feature space of the project's digit classifier, against the "
          f"{len(bench.reference)} held-out digits. IS: an Inception-Score analogue from the same classifier. "
          f"class acc: share of DiT samples classified as the requested class.")
    print(f"wrote {os.path.abspath(args.out)} in {time.perf_counter() - start:.0f}s")
    return rows
