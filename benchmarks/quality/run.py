"""The quality benchmark: every guidance method tuned the same way on a validation split, then
judged once on a held-out test split.

    python benchmarks/quality/run.py            # the tables and plots in README.md (about 70 minutes on 2 cores)
    python benchmarks/quality/run.py --quick    # a smoke test of the whole protocol (about a minute)

Protocol (benchmarks/quality/README.md says more):

1. Regimes: the class-conditional DiT without CFG, with CFG 1.5 and with CFG 3, and the
   unconditional UNet. Every method runs on top of the regime's CFG.
2. Validation: the held-out digits are cut into a validation and a test half. Each method (PAG,
   SEG-style blur, ASAG and its three ablations; CFG alone over its scale on the DiT) gets the
   same budget of candidates from its own knobs (spaces.py), each sampled once with a
   validation seed and scored against the validation half; the lowest FID is chosen.
3. Defaults: asag's ASAGConfig defaults come from the validation runs only (ASAG's candidate
   that does best across all regimes, then a line search of its scale).
4. Test: the chosen setting of every method, asag's defaults, the regime's baseline, the
   baseline given as many denoiser evaluations as ASAG (more steps) and PAG at ASAG's
   perturbation size, each on test seeds disjoint from the validation seed, scored against
   the test half; paired differences with ASAG per seed.

Runs are cached in results/runs.jsonl (delete it to start over), so an interrupted benchmark
resumes where it stopped. Writes results/{results.md, validation.csv, test.csv, chosen.json,
fid_vs_scale.png}, and asag/demo/tuned.json (the demo's settings) unless --quick.
"""

import argparse
import csv
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import spaces  # noqa: E402
from spaces import FAMILIES, FAMILY, REGIMES, Regime  # noqa: E402

from asag.demo import evaluation  # noqa: E402
from asag.demo.sampling import Method  # noqa: E402
from asag.guidance import ASAGConfig  # noqa: E402

PORTABLE_LAYERS = (0, 1)  # "mid", "all" in spaces.LAYERS
DEFAULT_SCALES = [0.5, 1.0, 2.0, 3.0, 5.0]
ROBUSTNESS_SCALES = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
METRICS = ["fid", "precision", "recall", "is", "class_accuracy", "perturbation", "displacement"]


class Runs:
    """Sampling runs, cached on disk by everything that determines their result."""

    def __init__(self, bench, path, steps):
        self.bench, self.path, self.steps = bench, path, steps
        self.cache, self.rows = {}, []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    entry = json.loads(line)
                    self.cache[entry["key"]] = entry["result"]

    def get(self, split, regime: Regime, name, method: Method, seed, n, steps=None, **columns):
        steps = steps or self.steps
        perturb = dataclasses.asdict(method.perturb) if method.perturb else None
        key = json.dumps([split, regime.kind, method.cfg_scale, perturb, seed, n, steps], sort_keys=True)
        if key not in self.cache:
            reference = self.bench.validation_reference if split == "validation" else self.bench.test_reference
            result = self.bench.run(regime.kind, method, n, seed, steps, reference=reference)
            result.pop("images")
            self.cache[key] = result
            with open(self.path, "a") as f:
                f.write(json.dumps(dict(key=key, result=result)) + "\n")
            print(f"{split:<10} {regime.title:<20} {name:<34} seed {seed}: FID {result['fid']:7.2f}", flush=True)
        result = self.cache[key]
        self.rows.append(dict(split=split, regime=regime.title, method=name, seed=seed, steps=steps, **columns, **result))
        return result


def validate(runs, args):
    """Each method's candidates in every regime, on the validation split: {(regime, method): (settings, fid)}."""
    chosen, table = {}, {}
    for regime in REGIMES:
        for family in FAMILIES:
            scores = []
            for settings in family.candidates(args.budget):
                method = Method(family.name, regime.cfg_scale, family.config(regime.kind, settings))
                r = runs.get("validation", regime, family.name, method, args.val_seed, args.val_samples,
                             settings=spaces.describe(regime.kind, settings))
                scores.append((r["fid"], settings, r))
            table[(regime.title, family.name)] = scores
            fid, settings, r = min(scores, key=lambda s: s[0])
            chosen[(regime.title, family.name)] = dict(settings=settings, fid=fid, perturbation=r.get("perturbation"))
    dit = next(r for r in REGIMES if r.kind == "dit")
    cfg_scores = [(runs.get("validation", dit, "CFG alone", Method("CFG", w), args.val_seed, args.val_samples,
                            settings=f"cfg {w}")["fid"], w) for w in spaces.cfg_candidates(args.budget)]
    chosen[("DiT", "CFG alone")] = dict(settings=dict(cfg_scale=min(cfg_scores)[1]), fid=min(cfg_scores)[0])
    return chosen, table


def choose_defaults(runs, table, args):
    """asag's defaults from validation only: the ASAG candidate with the lowest FID relative to
    the best candidate of each regime, averaged over the regimes; then its scale, line-searched
    per regime and chosen separately with CFG on and off."""
    n_candidates = len(table[(REGIMES[0].title, "ASAG")])
    relative = [0.0] * n_candidates
    for regime in REGIMES:
        fids = [fid for fid, _, _ in table[(regime.title, "ASAG")]]
        for i, fid in enumerate(fids):
            relative[i] += fid / min(fids) / len(REGIMES)
    # A default must name layers every model has: the "mid" and "all" presets.
    portable = [i for i in range(n_candidates) if table[(REGIMES[0].title, "ASAG")][i][1]["layers"] in PORTABLE_LAYERS]
    best = min(portable or range(n_candidates), key=relative.__getitem__)
    shape = dict(table[(REGIMES[0].title, "ASAG")][best][1])
    shape.pop("scale")
    line = {}
    for regime in REGIMES:
        fids = []
        for scale in DEFAULT_SCALES:
            config = FAMILY["ASAG"].config(regime.kind, dict(shape, scale=scale))
            r = runs.get("validation", regime, "ASAG defaults search", Method("ASAG", regime.cfg_scale, config),
                         args.val_seed, args.val_samples, settings=f"scale {scale}")
            fids.append(r["fid"])
        line[regime.title] = [fid / min(fids) for fid in fids]
    scales = {}
    for cfg_on in (True, False):
        group = [line[r.title] for r in REGIMES if r.cfg_on == cfg_on]
        mean = [statistics.mean(g[i] for g in group) for i in range(len(DEFAULT_SCALES))]
        scales["with_cfg" if cfg_on else "without_cfg"] = DEFAULT_SCALES[mean.index(min(mean))]
    return dict(shape=shape, relative_fid=relative[best], **scales), line


def defaults_config(defaults, regime: Regime) -> ASAGConfig:
    scale = defaults["with_cfg"] if regime.cfg_on else defaults["without_cfg"]
    return FAMILY["ASAG"].config(regime.kind, dict(defaults["shape"], scale=scale))


def robustness(runs, chosen, args):
    """FID against the guidance scale for PAG, SEG and ASAG, their other knobs as chosen."""
    for regime in REGIMES:
        for name in ("PAG", "SEG (blur)", "ASAG"):
            settings = chosen[(regime.title, name)]["settings"]
            for scale in ROBUSTNESS_SCALES:
                config = FAMILY[name].config(regime.kind, dict(settings, scale=scale))
                runs.get("validation", regime, name, Method(name, regime.cfg_scale, config), args.val_seed,
                         args.val_samples, table="scale", scale=scale)


def test_rows(runs, chosen, defaults, args):
    """The test runs of every regime: [(regime, name, settings text, results per seed)]."""
    out = []
    for regime in REGIMES:
        plus = f"CFG {regime.cfg_scale} + " if regime.cfg_on else ""
        base = Method(f"CFG {regime.cfg_scale}" if regime.cfg_on else "no guidance", regime.cfg_scale)
        rows = [(base.name, "", base, None)]
        asag_evals = Method("", regime.cfg_scale, ASAGConfig()).evaluations(regime.kind == "dit")
        matched = round(args.steps * asag_evals / base.evaluations(regime.kind == "dit"))
        rows.append((f"{base.name}, {matched} steps (ASAG's evaluations)", "", base, matched))
        if regime.kind == "dit":
            w = chosen[("DiT", "CFG alone")]["settings"]["cfg_scale"]
            rows.append(("CFG alone, scale tuned", f"cfg {w}", Method("CFG", w), None))
        for family in FAMILIES:
            settings = chosen[(regime.title, family.name)]["settings"]
            config = family.config(regime.kind, settings)
            rows.append((plus + family.name, spaces.describe(regime.kind, settings), Method(family.name, regime.cfg_scale, config), None))
        config = defaults_config(defaults, regime)
        rows.append((plus + "ASAG, asag's defaults", f"scale {config.scale}", Method("ASAG", regime.cfg_scale, config), None))
        rows.append(matched_size_row(runs, chosen, regime, plus, args))
        for name, settings, method, steps in rows:
            results = [runs.get("test", regime, name, method, seed, args.test_samples, steps, settings=settings)
                       for seed in args.seeds]
            out.append((regime, name, settings, method, steps or args.steps, results))
    return out


def matched_size_row(runs, chosen, regime, plus, args):
    """PAG on ASAG's chosen layers, its scale set so that its guidance term is as large as
    ASAG's (mean |scale (eps_cond - eps_adv)|, measured on the validation runs): the same
    size of perturbation, a different kind."""
    asag = chosen[(regime.title, "ASAG")]
    layers = asag["settings"]["layers"]
    probe = dict(scale=asag["settings"]["scale"], layers=layers)
    pag = FAMILY["PAG"].config(regime.kind, probe)
    r = runs.get("validation", regime, "PAG size probe", Method("PAG", regime.cfg_scale, pag), args.val_seed, args.val_samples)
    asag_displacement = asag["perturbation"] * asag["settings"]["scale"]
    scale = round(asag_displacement / r["perturbation"], 3)
    settings = dict(scale=scale, layers=layers)
    return (plus + "PAG at ASAG's size", spaces.describe(regime.kind, settings),
            Method("PAG", regime.cfg_scale, FAMILY["PAG"].config(regime.kind, settings)), None)


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values, digits=2):
    mean, std = _mean_std(values)
    return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(runs, tests, chosen, defaults, line, real, args, seconds):
    lines = [
        f"Made by `python benchmarks/quality/run.py` ({'--quick, ' if args.quick else ''}budget {args.budget} "
        f"candidates per method and regime, validation seed {args.val_seed} with {args.val_samples} samples, test "
        f"seeds {args.seeds} with {args.test_samples} samples, {args.steps} DDIM steps) on "
        f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads), torch "
        f"{torch.__version__}. Sampling took {sum(r.get('seconds', 0) for r in runs.cache.values()) / 60:.0f} "
        f"minutes summed over the {len(runs.cache)} cached runs (this invocation: {seconds / 60:.0f} minutes).",
        "",
        f"Real training digits against the test half (the floor): FID {real['fid']:.2f}, precision "
        f"{real['precision']:.3f}, recall {real['recall']:.3f}.",
        "",
        "## Test",
        "",
        "Mean ± standard deviation over the test seeds. ΔFID: the row's FID minus ASAG's (tuned) on the "
        "same seed, mean ± std of the paired differences, and on how many seeds ASAG was better. "
        "|c - c'|: the mean distance of the perturbed prediction from the conditional one; "
        "|w (c - c')|: the guidance term's mean size.",
    ]
    for regime in REGIMES:
        rows = [t for t in tests if t[0] is regime]
        asag = next(t[5] for t in rows if t[1].endswith("ASAG") and "defaults" not in t[1])
        lines += ["", f"### {regime.title}", "",
                  "| method | settings (chosen on validation) | evals | FID ↓ | ΔFID vs ASAG | ASAG better | precision ↑ | recall ↑ | class acc ↑ | abs(c - c') | abs(w (c - c')) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for _, name, settings, method, steps, results in rows:
            deltas = [r["fid"] - a["fid"] for r, a in zip(results, asag)]
            wins = sum(d > 0 for d in deltas)
            evals = method.evaluations(regime.kind == "dit") * steps
            acc = _cell([r.get("class_accuracy") for r in results], 3)
            lines.append(
                f"| {name} | {settings} | {evals} | {_cell([r['fid'] for r in results])} | "
                f"{'-' if results is asag else _cell(deltas)} | {'-' if results is asag else f'{wins}/{len(deltas)}'} | "
                f"{_cell([r['precision'] for r in results], 3)} | {_cell([r['recall'] for r in results], 3)} | {acc} | "
                f"{_cell([r.get('perturbation') for r in results], 3)} | {_cell([r.get('displacement') for r in results], 3)} |"
            )
    lines += ["", "## Validation: the chosen settings", "",
              f"Each method's best of {args.budget} candidates (validation FID, one seed).", "",
              "| regime | method | chosen settings | validation FID | abs(c - c') |", "|---|---|---|---|---|"]
    for (regime, name), entry in chosen.items():
        kind = "dit" if regime.startswith("DiT") else "unet"
        settings = (f"cfg {entry['settings']['cfg_scale']}" if name == "CFG alone"
                    else spaces.describe(kind, entry["settings"]))
        size = entry.get("perturbation")
        lines.append(f"| {regime} | {name} | {settings} | {entry['fid']:.2f} | {'-' if size is None else f'{size:.3f}'} |")
    lines += ["", "## asag's defaults, from validation", "",
              f"ASAG's candidate with layers \"mid\" or \"all\" (presets every model has) with the lowest FID "
              f"relative to each regime's best ASAG candidate "
              f"(mean ratio {defaults['relative_fid']:.3f}): {spaces.describe('dit', defaults['shape'])} "
              f". Its scale, line-searched over "
              f"{DEFAULT_SCALES} in each regime (FID relative to the regime's best scale):", "",
              "| regime | " + " | ".join(f"scale {s}" for s in DEFAULT_SCALES) + " |",
              "|---|" + "---|" * len(DEFAULT_SCALES)]
    for regime, values in line.items():
        lines.append(f"| {regime} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    lines += ["", f"Chosen: scale {defaults['with_cfg']} with CFG, {defaults['without_cfg']} without.", ""]
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(REGIMES), figsize=(4 * len(REGIMES), 3.6))
    for ax, regime in zip(axes, REGIMES):
        for name in ("PAG", "SEG (blur)", "ASAG"):
            pts = sorted((r["scale"], r["fid"]) for r in rows
                         if r.get("table") == "scale" and r["regime"] == regime.title and r["method"] == name)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(regime.title)
        ax.set_xlabel("guidance scale (other knobs as chosen)")
        ax.set_ylabel("validation FID ↓")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=10, help="candidates per method and regime (default 10)")
    parser.add_argument("--val-seed", type=int, default=100)
    parser.add_argument("--val-samples", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="test seeds")
    parser.add_argument("--test-samples", type=int, default=400)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--quick", action="store_true", help="budget 2, 32 samples, 4 steps: checks the protocol runs")
    args = parser.parse_args()
    if args.quick:
        args.budget, args.val_samples, args.test_samples, args.steps, args.seeds = 2, 32, 32, 4, [0, 1]
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    start = time.time()
    bench = evaluation.Bench()
    runs = Runs(bench, os.path.join(args.out, "runs.jsonl"), args.steps)
    chosen, table = validate(runs, args)
    defaults, line = choose_defaults(runs, table, args)
    robustness(runs, chosen, args)
    tests = test_rows(runs, chosen, defaults, args)
    real = bench.real_baseline(len(bench.test_reference), reference=bench.test_reference)

    for split in ("validation", "test"):
        rows = [r for r in runs.rows if r["split"] == split]
        with open(os.path.join(args.out, f"{split}.csv"), "w", newline="") as f:
            fields = sorted({k for r in rows for k in r})
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    demo = {regime.title: {name: dataclasses.asdict(FAMILY[name].config(regime.kind, chosen[(regime.title, name)]["settings"]))
                           for name in ("PAG", "SEG (blur)", "ASAG")} for regime in REGIMES}
    summary = dict(
        defaults=defaults, demo=demo, cfg_alone=chosen[("DiT", "CFG alone")]["settings"]["cfg_scale"],
        chosen={f"{regime} / {name}": entry for (regime, name), entry in chosen.items()},
    )
    with open(os.path.join(args.out, "chosen.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if not args.quick:
        with open(evaluation.TUNED_PATH, "w") as f:
            json.dump(dict(defaults=defaults, demo=demo), f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(runs, tests, chosen, defaults, line, real, args, time.time() - start))
    print(f"wrote {args.out}/results.md")
    plot(runs.rows, os.path.join(args.out, "fid_vs_scale.png"))


if __name__ == "__main__":
    main()
