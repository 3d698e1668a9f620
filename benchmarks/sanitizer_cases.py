"""Small calls of every CUDA kernel path, for compute-sanitizer (memcheck, racecheck).

Covers: each op, every dtype, masks and biases, Nq/Nk not multiples of the block sizes,
rows that cache in shared memory, rows that do not (Nk > 8192) and column partials kept in
global memory (Nk > 16384).
"""

import torch

import asag


def main():
    torch.manual_seed(0)
    cases = [(2, 3, 37, 53, 40), (1, 2, 33, 9000, 16), (1, 1, 5, 17000, 8), (1, 1, 1, 1, 8)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for b, h, nq, nk, d in cases:
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for n in (nq, nk, nk))
            mask = torch.rand(b, nk, device="cuda") > 0.3
            bias = torch.randn(1, h, nq, nk, device="cuda", dtype=dtype)
            asag.ops.sinkhorn_attention(q, k, v, lam=2.0, iters=3, key_mask=mask, attn_bias=bias, backend="kernel")
            logits = asag.ops.adversarial_logits(q, k, lam=2.0, backend="kernel")
            asag.ops.sinkhorn(logits, iters=3, key_mask=mask, backend="kernel")
            # peaked logits: columns underflow and take the exact log-domain path
            asag.ops.sinkhorn(logits * 1e4, iters=2, backend="kernel")
    torch.cuda.synchronize()
    print("sanitizer cases done")


if __name__ == "__main__":
    main()
