"""Speed and memory of asag's Sinkhorn attention against the PyTorch reference and SDPA.

For every (N, B*H, iters): our kernel, the eager reference (asag.ops.reference), the same
reference under torch.compile, and scaled_dot_product_attention for scale. Each method is
checked against the float64 reference before it is timed; times are medians of repeats taken
right after a warm-up (idle OpenMP threads wake slowly on a shared machine).

Memory is the peak above what was allocated before the call: on CUDA from the caching
allocator's peak; on the CPU from the process's peak RSS (VmHWM), reset before each call
through /proc/self/clear_refs.

The CPU floor is the exponentials: (iters + 1) exp per logit (docs/method.md section 4), timed
here with torch.exp on a preallocated buffer in the same run.

    python benchmarks/bench_ops.py                 # CPU, the table in README.md
    python benchmarks/bench_ops.py --device cuda   # GPU sizes
"""

import argparse
import csv
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import asag
from asag.ops import reference

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------
# Measuring


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_cpu_peak():
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def measure(fn, device, repeats):
    """(median seconds, peak bytes above the start) of fn()."""
    fn()  # warm-up, right before timing
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes("VmRSS")
        peak = None
        if _reset_cpu_peak():
            fn()
            peak = _rss_bytes("VmHWM") - base
    return statistics.median(times), peak


def exp_rate(device, numel=1 << 26):
    """torch.exp elements per second, in place on a preallocated buffer."""
    x = torch.randn(numel, device=device)
    y = torch.empty_like(x)
    seconds, _ = measure(lambda: torch.exp(x, out=y), device, repeats=5)
    return numel / seconds


def copy_bandwidth(device, numel=1 << 27):
    """Bytes per second of a device-to-device copy (read + write)."""
    x = torch.randn(numel, device=device)
    y = torch.empty_like(x)
    seconds, _ = measure(lambda: y.copy_(x), device, repeats=5)
    return 2 * x.numel() * x.element_size() / seconds


# ---------------------------------------------------------------------------------------
# The methods


def methods(lam, iters, scale):
    torch._dynamo.reset()  # a fresh compile per configuration, never the recompile limit's eager fallback
    compiled_reference = torch.compile(reference.sinkhorn_attention, dynamic=False)
    params = dict(lam=lam, iters=iters, scale=scale)
    return {
        "asag kernel": lambda q, k, v: asag.ops.sinkhorn_attention(q, k, v, backend="kernel", **params),
        "eager reference": lambda q, k, v: reference.sinkhorn_attention(q, k, v, **params),
        "compiled reference": lambda q, k, v: compiled_reference(q, k, v, **params),
        "SDPA (softmax only)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    }


def machine_description(device):
    lines = [f"torch {torch.__version__}, asag {asag.__version__}, Python {platform.python_version()}"]
    if device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as info:
                cpu = next(l.split(":", 1)[1].strip() for l in info if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        lines.append(
            f"CPU: {cpu}, {torch.get_num_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
            f"kernel ISA {asag.build_info().get('cpu_isa')}"
        )
    return lines


def run(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU is visible")
    reasons = asag.ops.kernel_unsupported_reasons(device)
    if reasons:
        sys.exit("the asag kernel cannot run here: " + "; ".join(reasons))
    header = machine_description(device)
    rate = exp_rate(device)
    bandwidth = copy_bandwidth(device)
    header.append(f"torch.exp: {rate / 1e9:.2f} G elements/s; copy: {bandwidth / 1e9:.1f} GB/s")
    for line in header:
        print(line)

    rows = []
    for n in args.n:
        for bh in args.bh:
            for iters in args.iters:
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(1, bh, n, args.d, generator=g).to(device) for _ in range(3))
                small = tuple(t[:, :1, :256] for t in (q, k, v))
                truth = reference.sinkhorn_attention(
                    *(t.double() for t in small), lam=args.lam, iters=iters, scale=args.d**-0.5
                )
                logits = bh * n * n
                results = {}
                for name, fn in methods(args.lam, iters, args.d**-0.5).items():
                    too_big = (name == "eager reference" and n > args.max_eager_n) or (
                        name == "compiled reference" and n > args.max_compiled_n)
                    if name in args.skip or too_big:
                        continue
                    if not name.startswith("SDPA"):
                        err = (fn(*small).double() - truth).abs().max().item()
                        assert err < 1e-4, f"{name} is wrong before timing: error {err}"
                    try:
                        results[name] = measure(lambda: fn(q, k, v), device, args.repeats)
                    except (torch.OutOfMemoryError, MemoryError) as error:
                        print(f"| {n} | {bh} | {iters} | {name} | out of memory: {str(error)[:80]} |")
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                kernel_s = results.get("asag kernel", (float("nan"), None))[0]
                for name, (seconds, peak) in results.items():
                    row = dict(
                        device=device.type, n=n, bh=bh, d=args.d, iters=iters, method=name,
                        ms=seconds * 1e3,
                        peak_mb=None if peak is None else peak / 2**20,
                        kernel_speedup=seconds / kernel_s,
                    )
                    if name != "SDPA (softmax only)":
                        # the exp floor: (iters + 1) exponentials per logit at torch.exp's rate
                        row["exp_floor_ms"] = (iters + 1) * logits / rate * 1e3
                        # the memory floor: the fp32 logits written once, read once per row
                        # step, the plan written once, at the measured copy bandwidth
                        row["bytes"] = (iters + 3) * logits * 4
                        row["memory_floor_ms"] = row["bytes"] / bandwidth * 1e3
                    rows.append(row)
                    print(_format_row(row), flush=True)
    return header, rows


# ---------------------------------------------------------------------------------------
# Output


def _columns(device):
    floor = ["exp floor (ms)", "time / floor"] if device == "cpu" else ["memory floor (ms)", "time / floor", "GB/s"]
    return ["N", "B*H", "iters", "method", "time (ms)", "vs kernel", "peak mem (MB)"] + floor


def _format_row(row):
    peak = "n/a" if row["peak_mb"] is None else f"{row['peak_mb']:.0f}"
    cells = [row["n"], row["bh"], row["iters"], row["method"], f"{row['ms']:.1f}",
             f"{row['kernel_speedup']:.2f}x", peak]
    key = "exp_floor_ms" if row["device"] == "cpu" else "memory_floor_ms"
    if key in row:
        cells += [f"{row[key]:.1f}", f"{row['ms'] / row[key]:.2f}"]
        if row["device"] != "cpu":
            cells.append(f"{row['bytes'] / (row['ms'] / 1e3) / 1e9:.0f}")
    else:
        cells += [""] * (len(_columns(row["device"])) - len(cells))
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write(header, rows, out_prefix):
    os.makedirs(os.path.dirname(out_prefix), exist_ok=True)
    with open(out_prefix + ".csv", "w", newline="") as f:
        fields = sorted({key for row in rows for key in row})
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    with open(out_prefix + ".md", "w") as f:
        f.write("Measured with `python benchmarks/bench_ops.py " + " ".join(sys.argv[1:]) + "`\n\n")
        for line in header:
            f.write(f"- {line}\n")
        columns = _columns(rows[0]["device"] if rows else "cpu")
        f.write("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
        for row in rows:
            f.write(_format_row(row) + "\n")
        f.write(
            "\n`vs kernel`: the method's time over the asag kernel's, same run. `exp floor` (CPU): "
            "(iters + 1) exponentials per logit at torch.exp's measured rate. `memory floor` "
            "(GPU): the bytes a materialised Sinkhorn must move ((iters + 3) x 4 bytes per "
            "logit) at the measured copy bandwidth; `GB/s` is those bytes over the time. "
            "`time / floor` includes the two matrix products, which the floors leave out.\n"
        )
    print(f"wrote {out_prefix}.csv and {out_prefix}.md")


def main():
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # Large blocks must go back to the OS when freed, or peak RSS undercounts reused memory.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--n", type=int, nargs="+", help="sequence lengths (default per device)")
    parser.add_argument("--bh", type=int, nargs="+", help="B*H values (default per device)")
    parser.add_argument("--iters", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-eager-n", type=int, default=1 << 30, help="skip the eager reference above this N")
    parser.add_argument("--max-compiled-n", type=int, default=1 << 30, help="skip the compiled reference above this N")
    parser.add_argument("--skip", nargs="*", default=[], help="method names to leave out")
    parser.add_argument("--out", help="output prefix (default benchmarks/results/bench_ops_<device>)")
    args = parser.parse_args()
    if args.device == "cuda":
        args.n = args.n or [1024, 4096, 16384]
        args.bh = args.bh or [8, 64]
    else:
        args.n = args.n or [256, 1024, 4096]
        args.bh = args.bh or [8]
    header, rows = run(args)
    write(header, rows, args.out or os.path.join(HERE, "results", f"bench_ops_{args.device}"))


if __name__ == "__main__":
    main()
