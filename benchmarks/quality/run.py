"""The paper's comparison and ablations at small scale, on the shipped digit models.

    python benchmarks/quality/run.py                   # the tables and plots in README.md
    python benchmarks/quality/run.py --seeds 0 1 --samples 200 --steps 15   # quicker

For both models (class-conditional DiT with CFG, unconditional UNet): no guidance, CFG, PAG,
SEG-style blur, ASAG, the ASAG ablations (w/o Sinkhorn, w/o adversarial cost, w/o adaptive
schedule), matched compute (the baseline given as many denoiser evaluations as ASAG uses,
through more steps), and sweeps of the ASAG / PAG / SEG scale and of ASAG's lam. Every
configuration runs for several seeds; tables give mean and standard deviation. Writes
benchmarks/quality/results/{results.csv, results.md, fid_vs_scale.png, fid_vs_lam.png}.
"""

import argparse
import csv
import os
import platform
import statistics
import time

import torch

from asag.demo import evaluation
from asag.demo.sampling import Method
from asag.guidance import ASAGConfig

HERE = os.path.dirname(os.path.abspath(__file__))
METRICS = ["fid", "precision", "recall", "is", "class_accuracy"]


def _runs(bench, kind, method, args, tag, **extra):
    rows = []
    for seed in args.seeds:
        steps = extra.get("steps", args.steps)
        r = bench.run(kind, method, args.samples, seed, steps)
        r.pop("images")
        rows.append(dict(model=kind, method=method.name, table=tag, seed=seed, steps=steps, **{k: v for k, v in extra.items() if k != "steps"}, **r))
        print(f"{kind:<5} {tag:<10} {method.name:<42} seed {seed}: FID {r['fid']:.2f}", flush=True)
    return rows


def _summary(rows, keys):
    groups = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    out = []
    for key, group in groups.items():
        entry = dict(zip(keys, key))
        for m in METRICS + ["evaluations"]:
            values = [g[m] for g in group if m in g]
            if values:
                entry[m] = statistics.mean(values)
                entry[m + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def _markdown(summary, title, keys):
    cols = ["FID ↓", "precision ↑", "recall ↑", "IS ↑", "class acc ↑", "evals"]
    lines = [f"### {title}", "", "| " + " | ".join(keys + cols) + " |", "|" + "---|" * (len(keys) + len(cols))]
    for e in summary:
        cells = [str(e[k]) for k in keys]
        for m in METRICS:
            cells.append(f"{e[m]:.3f} ± {e[m + '_std']:.3f}" if m in e else "-")
        cells.append(str(int(e["evaluations"])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(summary, x_key, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("dit", "unet")):
        for method in sorted({e["method"] for e in summary if e["model"] == kind}):
            pts = sorted((e[x_key], e["fid"], e["fid_std"]) for e in summary if e["model"] == kind and e["method"] == method)
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        ax.set_title(f"{kind}: {title}")
        ax.set_xlabel(x_key)
        ax.set_ylabel("FID (classifier features) ↓")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=360)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--lams", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    start = time.time()
    bench = evaluation.Bench()
    rows = []
    for kind in ("dit", "unet"):
        conditional = kind == "dit"
        for method in evaluation.comparison_methods(conditional) + evaluation.ablation_methods(conditional):
            rows += _runs(bench, kind, method, args, "main")
        cfg = evaluation.CFG_SCALE if conditional else 1.0
        asag_evals = evaluation.asag_method(cfg_scale=cfg).evaluations(conditional)
        base = Method("CFG" if conditional else "no guidance", cfg)
        matched = round(args.steps * asag_evals / base.evaluations(conditional))
        base.name += f" ({matched} steps: ASAG's evaluations)"
        rows += _runs(bench, kind, base, args, "main", steps=matched)
        for scale in args.scales:
            for name, settings in (
                ("ASAG", dict(evaluation.ASAG, scale=scale)),
                ("PAG", dict(scale=scale, variant="identity", lam=0.0)),
                ("SEG (blur)", dict(scale=scale, variant="blur", lam=evaluation.SEG_SIGMA, lam_schedule="constant")),
            ):
                rows += _runs(bench, kind, Method(name, cfg, ASAGConfig(**settings)), args, "scale", scale=scale)
        for lam in args.lams:
            rows += _runs(bench, kind, evaluation.asag_method("ASAG", cfg, lam=lam), args, "lam", lam=lam)
    real = bench.real_baseline(args.samples)

    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        fields = sorted({k for r in rows for k in r})
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    main_summary = _summary([r for r in rows if r["table"] == "main"], ["model", "method"])
    scale_summary = _summary([r for r in rows if r["table"] == "scale"], ["model", "method", "scale"])
    lam_summary = _summary([r for r in rows if r["table"] == "lam"], ["model", "method", "lam"])
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"Made by `python benchmarks/quality/run.py` with seeds {args.seeds}, {args.samples} samples per "
                f"run, {args.steps} DDIM steps, on {platform.processor() or platform.machine()} "
                f"({torch.get_num_threads()} threads), torch {torch.__version__}, in {time.time() - start:.0f}s.\n\n")
        f.write(f"Real training digits against the held-out ones (the floor): FID {real['fid']:.3f}, precision "
                f"{real['precision']:.3f}, recall {real['recall']:.3f}, IS {real['is']:.2f}.\n\n")
        f.write(_markdown(main_summary, "Comparison and ablations", ["model", "method"]) + "\n")
        f.write(_markdown(scale_summary, "Guidance scale sweep", ["model", "method", "scale"]) + "\n")
        f.write(_markdown(lam_summary, "ASAG lam sweep", ["model", "method", "lam"]))
    print(f"wrote {args.out}/results.md")
    _plot(scale_summary, "scale", os.path.join(args.out, "fid_vs_scale.png"), "FID vs guidance scale")
    _plot(lam_summary, "lam", os.path.join(args.out, "fid_vs_lam.png"), "ASAG: FID vs lam")


if __name__ == "__main__":
    main()
