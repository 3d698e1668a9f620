"""Command line: ``asag demo`` (the main job: ASAG on the shipped digit models), ``asag info``
(what was compiled), ``asag example`` (the op against its reference), and on your own
diffusers pipeline: ``asag generate``, ``asag compare``, ``asag sweep``, ``asag evaluate``.

Also runs as ``python -m asag ...``.
"""

import argparse
import json
import time


def _info(_args):
    import asag

    print(json.dumps(asag.build_info(), indent=2))


def _example(args):
    """Runs Sinkhorn attention on random q, k, v through the kernel and the reference, and
    prints agreement, the plan's marginals and the time of each."""
    import torch

    import asag
    from asag.ops import reference

    torch.manual_seed(args.seed)
    b, h, n, d = 1, args.heads, args.n, 64
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    print(f"asag {asag.__version__}: sinkhorn_attention on q, k, v of shape {(b, h, n, d)}, "
          f"lam={args.lam}, iters={args.iters}")
    info = asag.build_info()
    print(f"extension loaded: {info['extension']}" + (f" (CPU ISA {info.get('cpu_isa')})" if info["extension"] else f" ({info['unavailable_reason']})"))
    rows = []
    outputs = {}
    for backend in (["kernel"] if info["extension"] else []) + ["torch"]:
        asag.ops.sinkhorn_attention(q, k, v, lam=args.lam, iters=args.iters, backend=backend)
        t0 = time.perf_counter()
        outputs[backend] = asag.ops.sinkhorn_attention(q, k, v, lam=args.lam, iters=args.iters, backend=backend)
        rows.append((backend, time.perf_counter() - t0))
    truth = reference.sinkhorn_attention(q.double(), k.double(), v.double(), lam=args.lam, iters=args.iters, scale=d**-0.5)
    print(f"\n{'backend':<8} {'time (ms)':>10} {'max |out - float64|':>20}")
    for backend, seconds in rows:
        err = (outputs[backend].double() - truth).abs().max().item()
        print(f"{backend:<8} {seconds * 1e3:>10.1f} {err:>20.2e}")
    logits = asag.ops.adversarial_logits(q, k, lam=args.lam)
    plan = asag.ops.sinkhorn(logits, iters=args.iters)
    print(f"\nplan rows:    max |sum - 1|   = {(plan.sum(-1) - 1).abs().max().item():.2e}")
    print(f"plan columns: max |sum - Nq/Nk| = {(plan.sum(-2) - 1).abs().max().item():.2e} "
          f"(falls as iters grows; softmax alone: "
          f"{(torch.softmax(logits, -1).sum(-2) - 1).abs().max().item():.2e})")
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    same = asag.ops.sinkhorn_attention(q, k, v, lam=0.0, iters=0)
    print(f"lam=0, iters=0 vs SDPA: max diff {(same - sdpa).abs().max().item():.2e}")


def main(argv=None) -> None:
    """The ``asag`` command. Returns None, so that the console script (``sys.exit(main())``)
    exits with status 0 on success; errors exit with status 2."""
    run(argv)


def run(argv=None):
    """Runs one ``asag`` command and returns what it made (paths, sizes, timings): for tests
    and for callers in Python."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        from .demo.cli import main as demo

        demo(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="asag", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    from .cli.loading import CLIError
    from .cli.parser import add_commands

    add_commands(sub)
    sub.add_parser("demo", help="ASAG on the shipped digit models: image grid and metrics (see asag demo -h)")
    sub.add_parser("info", help="print asag.build_info()").set_defaults(func=_info)
    ex = sub.add_parser("example", help="run the Sinkhorn-attention op against the reference")
    ex.add_argument("--n", type=int, default=1024, help="tokens (default 1024)")
    ex.add_argument("--heads", type=int, default=8)
    ex.add_argument("--lam", type=float, default=2.0)
    ex.add_argument("--iters", type=int, default=5)
    ex.add_argument("--seed", type=int, default=0)
    ex.set_defaults(func=_example)
    args = parser.parse_args(argv)
    if args.command == "generate" and not (args.model or args.reproduce):
        parser.error("generate: give a model (or --reproduce PNG)")
    try:
        return args.func(args)
    except CLIError as error:
        parser.exit(2, f"asag {args.command}: error: {error}\n")


if __name__ == "__main__":
    main()
