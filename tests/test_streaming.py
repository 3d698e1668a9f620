"""The streaming path of sinkhorn_attention (no Nq x Nk matrix): the CPU kernel, the CUDA
kernel through the emulation, and the PyTorch reference, against the materialised path and the
float64 reference; the choice between the paths; memory; a video-sized model end to end."""

import pytest
import torch

import asag
from asag.ops import reference
from helpers import make_qkv, max_err, random_key_mask, reference64, requires_kernel

try:
    import asag._cuda_emulation  # noqa: F401

    HAVE_EMULATION = True
except ImportError:
    HAVE_EMULATION = False

STD = 2.5
H100 = dict(shared_memory=227 * 1024, memory_budget=1 << 40, sm_count=2)

# (B, H, Nq, Nk, D, Dv): tile and row-block remainders, Nq != Nk, D not a multiple of the
# tiles' depth, Dv above one output pass.
SHAPES = [(1, 1, 1, 1, 8, 8), (2, 2, 7, 9, 16, 16), (1, 2, 70, 130, 40, 72), (1, 1, 130, 65, 24, 136), (2, 1, 150, 201, 64, 64)]


def _tolerance(dtype, ref):
    return (8e-6 if dtype == torch.float32 else 1e-12) * ref.abs().max().item()


def _params(b, nk, masked):
    if not masked:
        return dict(lam=2.0, iters=4)
    mask = random_key_mask(b, nk, seed=7)
    bias = torch.randn(1, 1, 1, nk, generator=torch.Generator().manual_seed(8))  # broadcast over B, H, Nq
    return dict(lam=1.5, iters=3, key_mask=mask, attn_bias=bias)


@requires_kernel
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask-bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_streaming_matches_float64_and_the_materialised_path(shape, masked, dtype):
    q, k, v = make_qkv(*shape, dtype=dtype, seed=sum(shape), std=STD)
    params = _params(shape[0], shape[3], masked)
    ref = reference64(q, k, v, scale=shape[4] ** -0.5, **params)
    streamed = asag.ops.sinkhorn_attention(q, k, v, backend="kernel", path="streaming", **params)
    assert streamed.dtype == dtype and max_err(streamed, ref) <= _tolerance(dtype, ref)
    materialised = asag.ops.sinkhorn_attention(q, k, v, backend="kernel", path="materialized", **params)
    assert max_err(streamed, materialised) <= _tolerance(dtype, ref)
    torch_streamed = asag.ops.sinkhorn_attention(q, k, v, backend="torch", path="streaming", **params)
    assert max_err(torch_streamed, ref) <= _tolerance(dtype, ref)


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_streaming_half_precision(dtype):
    q, k, v = make_qkv(1, 2, 70, 130, 40, dtype=dtype, seed=2, std=STD)
    params = dict(lam=2.0, iters=3)
    streamed = asag.ops.sinkhorn_attention(q, k, v, backend="kernel", path="streaming", **params)
    materialised = asag.ops.sinkhorn_attention(q, k, v, backend="kernel", path="materialized", **params)
    assert streamed.dtype == dtype
    ulp = torch.finfo(dtype).eps * materialised.abs().max().item()
    assert max_err(streamed, materialised) <= ulp


@requires_kernel
def test_cpu_streaming_exact_columns_and_empty_rows():
    """Columns that underflow take the exact update (recomputed over row blocks); a batch row
    with no valid key and a query whose keys are all masked give zeros."""
    b, h, nq, nk, d = 2, 1, 150, 97, 16
    g = torch.Generator().manual_seed(9)
    e = torch.zeros(d)
    e[0] = 1.0
    q = torch.randn(b, h, nq, d, generator=g) + 4.0 * e
    k = torch.randn(b, h, nk, d, generator=g)
    k[..., :20, :] = -400.0 * e
    v = torch.randn(b, h, nk, d, generator=g)
    mask = torch.ones(b, nk, dtype=torch.bool)
    mask[1] = False
    allowed = torch.ones(b, h, nq, nk, dtype=torch.bool)
    allowed[0, 0, 3] = False
    params = dict(lam=1.0, iters=4, key_mask=mask, attn_bias=allowed)
    ref = reference64(q, k, v, scale=d ** -0.5, **params)
    out = asag.ops.sinkhorn_attention(q, k, v, backend="kernel", path="streaming", **params)
    assert max_err(out, ref) <= _tolerance(torch.float32, ref)
    assert (out[1] == 0).all() and (out[0, 0, 3] == 0).all()


def test_auto_path_follows_the_budget(monkeypatch):
    from asag.ops import functional

    assert functional.choose_path("auto", 4096, 4096) == "materialized"  # 64 MiB of logits
    assert functional.choose_path("auto", 16384, 16384) == "streaming"  # 1 GiB
    with pytest.raises(ValueError, match="path must be one of"):
        functional.choose_path("fast", 8, 8)
    monkeypatch.setattr(asag._environment, "MATERIALIZED_BYTES", 4 * 50 * 50)
    assert functional.choose_path("auto", 50, 50) == "materialized"
    assert functional.choose_path("auto", 50, 51) == "streaming"
    calls = []
    original = reference.sinkhorn_attention_streaming
    monkeypatch.setattr(reference, "sinkhorn_attention_streaming", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    q, k, v = make_qkv(1, 1, 60, 60, 8)
    asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=2, backend="torch")
    assert calls == [1]


def test_build_info_names_the_paths():
    info = asag.build_info()
    assert info["materialized_bytes"] == asag._environment.MATERIALIZED_BYTES
    if info["extension"]:
        assert info["cpu_streaming"] is True and "cuda_streaming" in info


@requires_kernel
def test_streaming_memory_stays_linear():
    """At N = 8192 the materialised path holds a 256 MiB logits block; the streaming path's
    extra memory is its row blocks and vectors: a few MiB per thread."""
    import os

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs /proc/self/clear_refs to measure peak memory")

    def peak_mb(fn):
        def field(name):
            with open("/proc/self/status") as status:
                return next(int(l.split()[1]) for l in status if l.startswith(name + ":")) / 1024

        fn()  # warm up the allocator and BLAS
        base = field("VmRSS")
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        fn()
        return field("VmHWM") - base

    q, k, v = make_qkv(1, 1, 8192, 8192, 16, seed=1)
    streamed = peak_mb(lambda: asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=1, backend="kernel", path="streaming"))
    assert streamed < 40, streamed


@pytest.mark.skipif(not HAVE_EMULATION, reason="asag._cuda_emulation not built")
@requires_kernel
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_cuda_streaming_kernel_through_the_emulation(dtype, masked):
    """The CUDA streaming kernels' own source, tensor-core tiles included for half inputs
    (WMMA, emulated), against the CPU streaming kernel and float64: several row and column
    tiles, D not a multiple of the tile depth, Dv over two output passes, two slices."""
    shape = (2, 1, 70, 130, 40, 72) if dtype != torch.float64 else (1, 2, 40, 70, 24, 40)
    q, k, v = make_qkv(*shape, dtype=dtype, seed=4, std=STD)
    params = _params(shape[0], shape[3], masked)
    out = torch.ops.asag_emu.sinkhorn_attention_streaming(
        q, k, v, params["lam"], params["iters"], 1.0, shape[4] ** -0.5, params.get("key_mask"),
        params.get("attn_bias"), **H100,
    )
    cpu = asag.ops.sinkhorn_attention(q, k, v, backend="kernel", path="streaming", **params)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if dtype in (torch.float32, torch.float64):
        ref = reference64(q, k, v, scale=shape[4] ** -0.5, **params)
        assert max_err(out, ref) <= _tolerance(dtype, ref)
    else:
        assert max_err(out, cpu) <= torch.finfo(dtype).eps * cpu.abs().max().item()


@requires_kernel
def test_a_video_model_end_to_end_on_the_streaming_path(monkeypatch):
    """asag.apply on a Wan-shaped transformer whose self-attention sees 2048 tokens per
    frame-sequence, with the streaming path forced by a small budget: the same outputs as the
    materialised path (the benchmark runs it at 32760 tokens)."""
    pytest.importorskip("diffusers")
    import diffusers

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64,
    ).eval()
    x = dict(hidden_states=torch.randn(2, 4, 8, 16, 64), timestep=torch.tensor([10, 10]),
             encoder_hidden_states=torch.randn(2, 5, 16))  # 8 x 8 x 32 = 2048 tokens
    handle = asag.apply(model, layers="all", example_inputs={k: v[:1] for k, v in x.items()})
    with torch.no_grad(), handle.guidance(chunks=2, perturbed=1, lam=2.0, iters=3):
        materialised = model(**x).sample
        monkeypatch.setattr(asag._environment, "MATERIALIZED_BYTES", 1 << 20)  # 1 MiB: stream
        streamed = model(**x).sample
    handle.remove()
    torch.testing.assert_close(streamed, materialised, atol=2e-5, rtol=1e-4)
