"""The streaming path against the materialised one: time and extra peak memory against N.

One (batch, head) slice (--bh for more), D = 64, iters 3 and 10, N in {1024, 4096, 16384, 65536}: asag's
kernel on the materialised path (one float32 N x N block) where it fits in the memory limit,
and on the streaming path (logits recomputed a block of rows at a time in every sweep). Each
result is checked against the other path (or, at the largest N, its rows' sums) before it is
timed. Memory is the peak above what was allocated before the call (CPU: VmHWM, as
bench_ops.py). Then, with --video, a Wan-shaped transformer patched by asag.apply runs one
guided forward pass at 32760 tokens (21 frames of 30 x 52 patches), streaming.

    python benchmarks/bench_streaming.py [--device cpu|cuda] [--video]

Writes benchmarks/results/streaming_<device>.{md,csv,png}.
"""

import argparse
import csv
import os
import sys
import time

import torch

import asag

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_ops import _reset_cpu_peak, _rss_bytes, machine_description  # noqa: E402
from bench_ops import measure as measure_bytes  # noqa: E402


def measure(fn, device, repeats):
    """(median seconds, peak MB above the start) of fn(); with one repeat, a single call gives
    both (no warm-up: the largest sizes take minutes a call)."""
    if repeats == 1 and device.type == "cpu":
        base = _rss_bytes("VmRSS")
        reset = _reset_cpu_peak()
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        return seconds, (_rss_bytes("VmHWM") - base) / 2**20 if reset else None
    seconds, peak = measure_bytes(fn, device, repeats)
    return seconds, None if peak is None else peak / 2**20


def run(args):
    device = torch.device(args.device)
    rows = []
    for n in args.n:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, args.bh, n, args.d, generator=g).to(device, args.dtype) for _ in range(3))
        for iters in args.iters:
            call = lambda path: asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=iters, backend="kernel", path=path)  # noqa: E731
            fits = 4 * n * n * (args.bh if device.type == "cuda" else min(args.bh, torch.get_num_threads())) <= args.max_materialized_mb * 2**20
            if n <= 16384:  # the largest sizes are checked by their finite output below
                streamed = call("streaming")
                if fits:
                    diff = (streamed.float() - call("materialized").float()).abs().max().item()
                    assert diff < 1e-3, f"paths disagree at N={n}: {diff}"
                assert torch.isfinite(streamed).all()
            repeats = 1 if n >= 16384 else args.repeats
            for path in ("materialized", "streaming"):
                if path == "materialized" and not fits:
                    rows.append(dict(n=n, iters=iters, path=path, ms=None, peak_mb=None))
                    print(f"| {n} | {iters} | {path} | does not fit in {args.max_materialized_mb} MB |", flush=True)
                    continue
                seconds, peak = measure(lambda: call(path), device, repeats)
                rows.append(dict(n=n, iters=iters, path=path, ms=seconds * 1e3, peak_mb=peak))
                print(f"| {n} | {iters} | {path} | {seconds * 1e3:.1f} ms | {peak if peak is None else round(peak, 1)} MB |", flush=True)
    return rows


def video(args):
    """One guided forward pass of a Wan-shaped model at 32760 tokens, the layer streaming."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=64, ffn_dim=256, num_layers=2, rope_max_seq_len=1024,
    ).eval()
    x = dict(hidden_states=torch.randn(2, 16, 21, 60, 104), timestep=torch.tensor([500, 500]),
             encoder_hidden_states=torch.randn(2, 16, 64))
    handle = asag.apply(model, layers="mid", example_inputs={k: v[:1] for k, v in x.items()})
    base = _rss_bytes("VmRSS")
    _reset_cpu_peak()
    start = time.perf_counter()
    with torch.no_grad(), handle.guidance(chunks=2, perturbed=1, lam=2.0, iters=5):
        out = model(**x).sample
    seconds = time.perf_counter() - start
    peak = (_rss_bytes("VmHWM") - base) / 2**30
    handle.remove()
    tokens = 21 * 30 * 52
    line = (f"Wan-shaped transformer (2 heads of 64, 2 layers), asag.apply layers 'mid', a guidance batch of 2, "
            f"{tokens} tokens: one guided forward pass {seconds:.1f} s, peak memory {peak:.2f} GB above the inputs, "
            f"finite: {bool(torch.isfinite(out).all())}")
    print(line)
    return line


def write(rows, header, video_line, prefix):
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with open(prefix + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["n", "iters", "path", "ms", "peak_mb"])
        writer.writeheader()
        writer.writerows(rows)
    with open(prefix + ".md", "w") as f:
        f.write("Measured with `python benchmarks/bench_streaming.py " + " ".join(sys.argv[1:]) + "`\n\n")
        for line in header:
            f.write(f"- {line}\n")
        f.write("\n| N | iters | materialised (ms) | streaming (ms) | streaming / materialised | materialised peak (MB) | streaming peak (MB) |\n")
        f.write("|---|---|---|---|---|---|---|\n")
        for n in sorted({r["n"] for r in rows}):
            for iters in sorted({r["iters"] for r in rows}):
                m = next(r for r in rows if r["n"] == n and r["iters"] == iters and r["path"] == "materialized")
                s = next(r for r in rows if r["n"] == n and r["iters"] == iters and r["path"] == "streaming")
                ratio = f"{s['ms'] / m['ms']:.2f}x" if m["ms"] else "-"
                fmt = lambda x: "does not fit" if x is None else f"{x:.1f}"  # noqa: E731
                f.write(f"| {n} | {iters} | {fmt(m['ms'])} | {s['ms']:.1f} | {ratio} | {fmt(m['peak_mb'])} | {fmt(s['peak_mb'])} |\n")
        if video_line:
            f.write(f"\n{video_line}\n")


def plot(rows, prefix):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for path, style in (("materialized", "o-"), ("streaming", "s--")):
        for iters in sorted({r["iters"] for r in rows}):
            pts = [r for r in rows if r["path"] == path and r["iters"] == iters and r["ms"] is not None]
            axes[0].plot([r["n"] for r in pts], [r["ms"] / 1e3 for r in pts], style, label=f"{path}, iters {iters}")
            mem = [r for r in pts if r["peak_mb"] is not None]
            axes[1].plot([r["n"] for r in mem], [max(r["peak_mb"], 0.1) for r in mem], style, label=f"{path}, iters {iters}")
    for ax, title in zip(axes, ("time (s)", "extra peak memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (queries = keys), one slice, D = 64")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=110)


def main():
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # freed blocks back to the OS (see bench_ops)
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--iters", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--bh", type=int, default=1, help="(batch, head) slices")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-materialized-mb", type=int, default=4096, help="largest N x N block to materialise")
    parser.add_argument("--video", action="store_true", help="also run the 32760-token model (CPU, about a minute)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the saved CSV")
    args = parser.parse_args()
    prefix = os.path.join(HERE, "results", f"streaming_{args.device}")
    if args.plot_only:
        with open(prefix + ".csv") as f:
            rows = [{k: (None if v == "" else (float(v) if k in ("ms", "peak_mb") else (v if k == "path" else int(v))))
                     for k, v in r.items()} for r in csv.DictReader(f)]
        plot(rows, prefix)
        return
    args.dtype = getattr(torch, args.dtype)
    header = machine_description(torch.device(args.device)) + [f"B*H = {args.bh}, D = {args.d}, lam 1, {args.dtype}"]
    for line in header:
        print(line)
    rows = run(args)
    video_line = video(args) if args.video else None
    write(rows, header, video_line, prefix)
    plot(rows, prefix)
    print(f"wrote {prefix}.md")


if __name__ == "__main__":
    main()
