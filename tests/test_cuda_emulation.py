"""The CUDA kernels' own source, run on the CPU through the emulation of csrc/emulation
(every CUDA thread an OS thread, real barriers and warp shuffles, NaN-filled shared memory and
work buffers), driven by the very host code the GPU build uses. Each case reaches one path of
the kernels; the results must match the float64 reference as closely as float32 arithmetic
allows, and the CPU kernel."""

import pytest
import torch

import asag
from helpers import make_qkv, max_err, random_key_mask, reference64, requires_kernel

pytestmark = requires_kernel

try:
    import asag._cuda_emulation  # noqa: F401  (registers torch.ops.asag_emu)

    HAVE_EMULATION = True
except ImportError:
    HAVE_EMULATION = False

pytestmark = [requires_kernel, pytest.mark.skipif(not HAVE_EMULATION, reason="asag._cuda_emulation not built")]

KB = 1024
H100 = dict(shared_memory=227 * KB, memory_budget=1 << 40, sm_count=2)  # an H100's opt-in


def emulated_attention(q, k, v, *, lam, iters, tau=1.0, key_mask=None, attn_bias=None, device=H100):
    scale = q.shape[-1] ** -0.5
    return torch.ops.asag_emu.sinkhorn_attention(
        q, k, v, lam, iters, tau, scale, key_mask, attn_bias,
        device["shared_memory"], device["memory_budget"], device["sm_count"],
    )


def fp32_tolerance(ref):
    """What float32 arithmetic achieves against float64 here: about 1e-6 of the output's
    size (measured errors sit at 1e-7 to 6e-7 of it)."""
    return 2e-6 * ref.abs().max().item()


def check(out, q, k, v, **params):
    ref = reference64(q, k, v, scale=q.shape[-1] ** -0.5, **params)
    assert torch.isfinite(out).all()
    assert max_err(out, ref) <= fp32_tolerance(ref), max_err(out, ref) / ref.abs().max().item()
    cpu = asag.ops.sinkhorn_attention(q, k, v, backend="kernel", **params)
    assert max_err(out, cpu) <= fp32_tolerance(ref)
    return ref


# (name, (B, H, Nq, Nk, D), device): Nk picks the row-step path (shared memory per block:
# the row's column partials, and a cache of the row itself while two rows fit in 64 KB).
PATHS = [
    ("row cached, under 48 KB", (1, 2, 40, 97, 16), H100),
    ("row cached, 56 KB: opt-in above 48 KB", (1, 1, 9, 7000, 8), H100),
    ("no opt-in: partials only", (1, 1, 9, 7000, 8), dict(H100, shared_memory=48 * KB)),
    ("partials in shared memory, row not cached", (1, 1, 9, 10000, 8), H100),
    ("partials in global memory", (1, 1, 9, 17000, 8), H100),
]


@pytest.mark.parametrize("name,shape,device", PATHS, ids=[p[0] for p in PATHS])
def test_row_step_paths(name, shape, device):
    q, k, v = make_qkv(*shape, seed=sum(shape), std=1.5)
    params = dict(lam=2.0, iters=3)
    check(emulated_attention(q, k, v, device=device, **params), q, k, v, **params)


def test_global_partials_with_mask_and_bias():
    b, h, nq, nk, d = 1, 1, 70, 17000, 8
    q, k, v = make_qkv(b, h, nq, nk, d, seed=11, std=1.5)
    key_mask = random_key_mask(b, nk, seed=3)
    bias = torch.randn(b, 1, 1, nk, generator=torch.Generator().manual_seed(4))
    params = dict(lam=1.5, iters=2, key_mask=key_mask, attn_bias=bias)
    check(emulated_attention(q, k, v, **params), q, k, v, **params)


@pytest.mark.parametrize("budget_slices", [1, 4])
def test_masks_and_broadcast_biases_across_chunks(budget_slices):
    """A small memory budget splits the 6 slices into chunks: the kernels index masks, biases
    and marginals by the chunk's first slice (slice0)."""
    b, h, nq, nk, d = 2, 3, 9, 45, 16
    q, k, v = make_qkv(b, h, nq, nk, d, seed=5, std=2.0)
    key_mask = random_key_mask(b, nk, seed=6)
    key_mask[1] = False  # a batch row with no valid key: its outputs are zeros
    bias = torch.randn(1, h, 1, nk, generator=torch.Generator().manual_seed(7))  # per head, per key
    per_slice = 4 * (nq * nk + (nq // 32 + 1) * nk + nk + nq) + 4 * nk
    device = dict(H100, memory_budget=budget_slices * per_slice)
    params = dict(lam=2.0, iters=3, key_mask=key_mask, attn_bias=bias)
    out = emulated_attention(q, k, v, device=device, **params)
    check(out, q, k, v, **params)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_underflowing_columns_take_the_exact_update():
    """Keys that no query reaches in float32 (their column of the plan underflows below 1e-30)
    are updated exactly in the log domain by the exact-column kernel."""
    b, h, nq, nk, d = 1, 2, 40, 97, 16
    g = torch.Generator().manual_seed(9)
    e = torch.zeros(d)
    e[0] = 1.0
    q = torch.randn(b, h, nq, d, generator=g) + 4.0 * e  # every query points along e
    k = torch.randn(b, h, nk, d, generator=g)
    k[..., :20, :] = -400.0 * e  # ... and these keys far against it: logits below -100
    v = torch.randn(b, h, nk, d, generator=g)
    params = dict(lam=1.0, iters=4)
    plan = torch.softmax(asag.ops.adversarial_logits(q, k, lam=1.0, backend="torch"), dim=-1)
    assert (plan.sum(-2)[..., :20] < 1e-30).all()  # the fallback has work to do
    check(emulated_attention(q, k, v, **params), q, k, v, **params)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_every_dtype(dtype):
    q, k, v = make_qkv(1, 2, 19, 45, 16, dtype=dtype, seed=12, std=1.5)
    params = dict(lam=2.0, iters=3)
    out = emulated_attention(q, k, v, **params)
    cpu = asag.ops.sinkhorn_attention(q, k, v, backend="kernel", **params)
    assert out.dtype == dtype
    ulp = torch.finfo(dtype).eps * cpu.abs().max().item()
    assert max_err(out, cpu) <= (1e-12 if dtype == torch.float64 else ulp)


def test_logits_and_sinkhorn_ops():
    q, k, _ = make_qkv(2, 2, 21, 33, 16, seed=13, std=2.0)
    logits = torch.ops.asag_emu.adversarial_logits(q, k, 2.0, 0.7, 0.25, **H100)
    expect = asag.ops.adversarial_logits(q, k, lam=2.0, tau=0.7, scale=0.25, backend="kernel")
    torch.testing.assert_close(logits, expect, atol=1e-5, rtol=1e-5)
    mask = random_key_mask(2, 33, seed=14)[:, None, :].expand(2, 2, 33)
    plan = torch.ops.asag_emu.sinkhorn(logits, 4, mask, **H100)
    ref = asag.ops.sinkhorn(logits.double(), iters=4, key_mask=mask, backend="torch")
    assert max_err(plan, ref) <= 2e-6
    torch.testing.assert_close(plan.sum(-1), torch.ones_like(plan.sum(-1)), atol=1e-6, rtol=0)


_SANITIZED_RUN = """
import sys, torch
torch.ops.load_library(sys.argv[1])
sys.path.insert(0, sys.argv[2])
from helpers import make_qkv, random_key_mask, reference64
worst = 0.0
for shape in [(1, 2, 40, 97, 16), (1, 1, 9, 7000, 8), (1, 1, 9, 10000, 8), (1, 1, 33, 17000, 8)]:
    q, k, v = make_qkv(*shape, seed=1, std=2.0)
    mask = random_key_mask(shape[0], shape[3], seed=2)
    out = torch.ops.asag_emu.sinkhorn_attention(q, k, v, 2.0, 2, 1.0, shape[-1] ** -0.5, mask, None, 227 * 1024, 1 << 40, 2)
    ref = reference64(q, k, v, lam=2.0, iters=2, scale=shape[-1] ** -0.5, key_mask=mask)
    worst = max(worst, ((out.double() - ref).abs().max() / ref.abs().max()).item())
print("worst", worst)
"""


def test_emulated_kernels_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """The emulation built with ASan and UBSan, every row-step path run in a fresh process
    with the sanitizer runtimes preloaded: any report fails the test."""
    import os
    import pathlib
    import subprocess
    import sys

    libs = [subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
            for name in ("libasan.so", "libubsan.so")]
    if not all(os.path.isabs(lib) and os.path.exists(lib) for lib in libs):
        pytest.skip("gcc's sanitizer runtimes are not installed")
    from torch.utils import cpp_extension

    root = pathlib.Path(__file__).resolve().parents[1]
    library = tmp_path / "asag_emulation_sanitized.so"
    import sysconfig

    include = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{root / 'csrc/include'}",
                                                                   f"-I{sysconfig.get_paths()['include']}"]
    libdirs = [f"-L{p}" for p in cpp_extension.library_paths()]
    command = ["g++", "-shared", "-fPIC", "-O1", "-g", "-pthread", "-std=c++20", "-fsanitize=address,undefined",
               "-fno-omit-frame-pointer", "-DTORCH_EXTENSION_NAME=asag_emulation_sanitized",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *include,
               str(root / "csrc/emulation/cuda_emulation.cpp"), "-o", str(library), *libdirs,
               "-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python"]
    build = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-4000:]
    env = dict(os.environ, LD_PRELOAD=":".join(libs), ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    run = subprocess.run([sys.executable, "-c", _SANITIZED_RUN, str(library), str(root / "tests")],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "ERROR: AddressSanitizer" not in run.stderr and "runtime error" not in run.stderr, run.stderr[-4000:]
    assert float(run.stdout.split("worst")[-1]) < 2e-6
