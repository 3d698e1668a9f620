"""asag.apply on tiny random-weight diffusers and timm models: patch and remove leave the model
bit-identical, clean chunks stay bit-identical under guidance, the perturbed chunk changes,
joint attention keeps its text rows, layer selection picks exactly what it says."""

import pytest
import torch

import asag
import tiny_models
import tiny_models_more  # noqa: F401  (registers more families)
from asag.patching.perturb import Perturbation, perturbed_sdpa, row_ranges

SUPPORTED = [name for name in tiny_models.FAMILIES if name != "sana"]
JOINT = [
    "sd3", "sd35", "flux", "cogvideox", "mochi", "lumina2", "auraflow", "hidream", "hunyuan-video", "flux2",
    "qwenimage", "cogview3plus", "cogview4", "chroma", "easyanimate", "consisid",
]
# What the probe must find: (family, layer name pattern, kind, text first, text tokens).
EXPECTED = [
    ("lumina2", r"noise_refiner\..*", "self", None, None),
    ("lumina2", r"context_refiner\..*", "text", None, None),
    ("lumina2", r"layers\..*", "joint", True, 7),
    ("auraflow", r"single_transformer_blocks\..*", "joint", True, 13),  # 5 text + 8 register tokens
    ("hidream", r"double_stream_blocks\..*", "joint", False, 19),
    ("hidream", r"single_stream_blocks\..*", "joint", False, 19),
    ("hunyuan-video", r"context_embedder\..*", "text", None, None),  # the token refiner
    ("hunyuan-video", r"single_transformer_blocks\..*", "joint", False, 7),
    ("flux2", r"single_transformer_blocks\..*", "joint", True, 6),
    ("flux", r"single_transformer_blocks\..*", "joint", True, 5),
    ("mochi", r"transformer_blocks\..*", "joint", False, 6),
    ("mochi", r"time_embed\..*", "text", None, None),  # attention pooling of the text
    ("unet-motion", r".*motion_modules\..*", "temporal", None, None),
    ("unet-svd", r".*temporal_transformer_blocks\..*attn1", "temporal", None, None),  # frames before channels
    ("unet-svd", r".*\.transformer_blocks\..*attn1", "self", None, None),
    ("timm-eva", r"model\.blocks\..*", "joint", True, 1),  # the class token is not an image token
    ("timm-rope", r"model\.blocks\..*", "joint", True, 1),
]


def _sample(out):
    if isinstance(out, tuple):
        return out[0]
    return getattr(out, "sample", out)


def _run(model, inputs):
    with torch.no_grad():
        return _sample(model(**inputs))


def _hook_counts(model):
    return [
        (len(m._forward_pre_hooks), len(m._forward_hooks), len(m._forward_hooks_always_called))
        for m in model.modules()
    ]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", SUPPORTED)
def test_patch_and_remove_leave_the_model_bit_identical(family):
    model, inputs = tiny_models.build(family)
    x = inputs(2)
    base = _run(model, x)
    state, hooks = _state(model), _hook_counts(model)
    attrs = {name: sorted(vars(m)) for name, m in model.named_modules()}
    handle = asag.apply(model, example_inputs=inputs(1))
    assert handle.selected and all(l.kind in ("self", "joint") for l in handle.selected)
    assert torch.equal(_run(model, x), base)  # patched, no guidance: exactly the same
    handle.remove()
    assert torch.equal(_run(model, x), base)
    assert _hook_counts(model) == hooks
    assert {name: sorted(vars(m)) for name, m in model.named_modules()} == attrs
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.parametrize("family", SUPPORTED)
def test_guidance_changes_only_the_perturbed_chunk(family):
    model, inputs = tiny_models.build(family)
    x = inputs(3)
    base = _run(model, x)
    handle = asag.apply(model, layers="all", example_inputs=inputs(1))
    with handle.guidance(chunks=3, perturbed=[2], lam=3.0, iters=5):
        guided = _run(model, x)
    assert torch.equal(guided[:2], base[:2])  # clean chunks: bit-identical
    assert (guided[2] - base[2]).abs().max() > 1e-5  # the perturbed chunk differs
    assert torch.isfinite(guided).all()
    with handle.guidance(chunks=3, perturbed=[2], lam=0.0, iters=0):
        plain = _run(model, x)
    torch.testing.assert_close(plain, base, atol=1e-5, rtol=1e-4)  # lam = iters = 0: SDPA
    handle.remove()


@pytest.mark.parametrize("family", JOINT)
def test_joint_attention_keeps_text_rows(family):
    """Selecting one joint layer at a time: its text rows (text output) are unchanged in the
    perturbed chunk, its image rows change, and the clean chunk is untouched."""
    model, inputs = tiny_models.build(family)
    handle = asag.apply(model, layers="all", example_inputs=inputs(1))
    joint = [l for l in handle.selected if l.kind == "joint"]
    assert joint, handle
    x = inputs(2)
    for layer in joint:
        handle.select(layer.name)
        outputs = []
        hook = layer.module.register_forward_hook(lambda m, a, out: outputs.append(out))
        _run(model, x)
        with handle.guidance(chunks=2, perturbed=[1], lam=3.0, iters=5):
            _run(model, x)
        hook.remove()
        base, guided = outputs
        if isinstance(base, tuple):  # (image rows, text rows)
            (base_img, base_txt), (img, txt) = base, guided
        else:  # one sequence (Flux single-stream blocks)
            t = layer.text_tokens
            text = slice(0, t) if layer.text_first else slice(base.shape[1] - t, base.shape[1])
            image = slice(t, None) if layer.text_first else slice(0, base.shape[1] - t)
            base_img, base_txt, img, txt = base[:, image], base[:, text], guided[:, image], guided[:, text]
        assert torch.equal(txt, base_txt), layer.name
        assert torch.equal(img[0], base_img[0]), layer.name
        assert (img[1] - base_img[1]).abs().max() > 0, layer.name
    handle.remove()


def _perturb(sdpa, p, joint=None):
    batch = sdpa["query"].shape[0]
    return perturbed_sdpa(sdpa, p, row_ranges(p, batch, batch, 0), joint)


@pytest.mark.parametrize("family,pattern,kind,text_first,text_tokens", EXPECTED)
def test_layers_are_classified_by_what_runs(family, pattern, kind, text_first, text_tokens):
    import re

    model, inputs = tiny_models.build(family)
    handle = asag.apply(model, layers="all", example_inputs=inputs(1))
    hits = [l for l in handle.layers if re.fullmatch(pattern, l.name)]
    assert hits, handle
    for layer in hits:
        assert layer.kind == kind, layer.describe()
        if kind == "joint":
            assert (layer.text_first, layer.text_tokens) == (text_first, text_tokens), layer.describe()
    handle.remove()


@pytest.mark.parametrize("family", ["lumina2", "hunyuan-video"])
def test_text_only_blocks_are_never_perturbed(family):
    model, inputs = tiny_models.build(family)
    handle = asag.apply(model, layers="all", example_inputs=inputs(1))
    text = [l for l in handle.layers if l.kind == "text"]
    assert text and not any(l in handle.selected for l in text)
    outputs = {l.name: [] for l in text}
    hooks = [l.module.register_forward_hook(lambda m, a, out, n=l.name: outputs[n].append(out)) for l in text]
    x = inputs(2)
    _run(model, x)
    with handle.guidance(chunks=2, perturbed=[1], lam=3.0, iters=5):
        _run(model, x)
    for h in hooks:
        h.remove()
    for name, (plain, guided) in outputs.items():
        assert torch.equal(plain, guided), name
    handle.remove()


def test_temporal_layers_only_when_named():
    model, inputs = tiny_models.build("unet-motion")
    handle = asag.apply(model, layers="all", example_inputs=inputs(1))
    assert handle.selected and all(l.kind == "self" for l in handle.selected)
    handle.select(r".*motion_modules\.0\..*attn1")
    assert handle.selected and all(l.kind == "temporal" for l in handle.selected)
    x = inputs(2)
    base = _run(model, x)
    with handle.guidance(chunks=2, perturbed=[1], lam=3.0, iters=3):
        guided = _run(model, x)
    assert torch.equal(guided[0], base[0]) and (guided[1] - base[1]).abs().max() > 1e-5
    handle.remove()


class _ManualAttention(torch.nn.Module):
    """Attention with a hand-written softmax and a switch to SDPA, as many codebases have."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.use_sdpa = heads, torch.nn.Linear(dim, 3 * dim), False

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.use_sdpa:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.softmax(q @ k.transpose(-1, -2) / (c // self.heads) ** 0.5, dim=-1) @ v
        return out.transpose(1, 2).reshape(b, n, c)


def test_manual_softmax_attention_is_named_and_can_be_registered():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_ManualAttention(), _ManualAttention())
    x = torch.randn(2, 6, 16)
    with pytest.raises(ValueError, match=r"compute a softmax by hand: 0, 1.*register_attention"):
        asag.apply(model, example_inputs=(x[:1],))
    base = model(x)
    asag.register_attention(_ManualAttention, sdpa_flag="use_sdpa")
    try:
        handle = asag.apply(model, layers="all", example_inputs=(x[:1],))
        assert [l.kind for l in handle.layers] == ["self", "self"]
        with handle.guidance(chunks=2, perturbed=[1], lam=2.0, iters=3):
            guided = model(x)
        assert model[0].use_sdpa is False  # the switch is restored
        torch.testing.assert_close(guided[0], base[0], atol=1e-6, rtol=1e-5)
        assert (guided[1] - base[1]).abs().max() > 1e-4
        handle.remove()
    finally:
        from asag.patching import registry

        registry._REGISTRY[:] = [e for e in registry._REGISTRY if e.name != "_ManualAttention"]


def test_custom_module_calling_sdpa_is_found_without_registration():
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 48)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.proj(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), Custom(), Custom())
    x = torch.randn(2, 6, 16)
    handle = asag.apply(model, layers="all", example_inputs=(x[:1],))
    assert [(l.name, l.kind) for l in handle.layers] == [("1", "self"), ("2", "self")]
    base = model(x)
    with handle.guidance(chunks=2, perturbed=[1], lam=2.0, iters=3):
        guided = model(x)
    assert torch.equal(guided[0], base[0]) and not torch.equal(guided[1], base[1])
    handle.remove()


def test_joint_math_reduces_to_attention_and_keeps_text_shares():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, 8, generator=g) for _ in range(3))
    base = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    sdpa = dict(query=q, key=k, value=v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
    for text_first in (True, False):
        same = _perturb(sdpa, Perturbation(2, (1,), 0.0, 0), (4, text_first))
        torch.testing.assert_close(same, base, atol=1e-6, rtol=1e-5)
        adv = _perturb(sdpa, Perturbation(2, (1,), 5.0, 5), (4, text_first))
        text = slice(0, 4) if text_first else slice(8, 12)
        assert torch.equal(adv[:, :, text], base[:, :, text]) and torch.equal(adv[0], base[0])
        assert (adv[1] - base[1]).abs().max() > 1e-3


def test_handle_lists_layers_with_kind_and_shape():
    model, inputs = tiny_models.build("sd15-unet")
    handle = asag.apply(model, example_inputs=inputs(1))
    kinds = {l.name.rsplit(".", 1)[-1]: l.kind for l in handle.layers}
    assert kinds == {"attn1": "self", "attn2": "cross"}
    mid = handle.selected
    assert [l.name for l in mid] == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert mid[0].heads == 8 and mid[0].tokens == 16 and mid[0].head_dim == 8
    assert "self" in repr(handle) and "* mid_block" in repr(handle)
    handle.remove()


def test_first_guided_call_probes_automatically():
    model, inputs = tiny_models.build("cogvideox")
    x = inputs(2)
    base = _run(model, x)
    handle = asag.apply(model)
    assert not handle.resolved and not handle.selected
    with handle.guidance(chunks=2, perturbed=[1], lam=2.0, iters=3):
        guided = _run(model, x)
    assert handle.resolved and handle.selected[0].kind == "joint"
    assert torch.equal(guided[0], base[0]) and not torch.equal(guided[1], base[1])
    handle.remove()


def _deep_timm_dit():
    torch.manual_seed(0)
    return tiny_models.timm_dit_model(depth=12).eval()


def test_layer_selection_is_exact():
    model = _deep_timm_dit()
    handle = asag.apply(model, layers="blocks.1")
    assert [l.name for l in handle.selected] == ["blocks.1.attn"]  # never blocks.10 / blocks.11
    handle.select([0, -1])
    assert [l.name for l in handle.selected] == ["blocks.0.attn", "blocks.11.attn"]
    handle.select(r"blocks\.1\d\.attn")
    assert [l.name for l in handle.selected] == ["blocks.10.attn", "blocks.11.attn"]
    handle.select("blocks.3.attn")
    assert [l.name for l in handle.selected] == ["blocks.3.attn"]
    handle.select("mid")
    assert [l.name for l in handle.selected] == ["blocks.6.attn"]
    handle.select("all")
    assert len(handle.selected) == 12
    handle.remove()


def test_unet_presets():
    model, inputs = tiny_models.build("sdxl-unet")
    handle = asag.apply(model, layers="up", example_inputs=inputs(1))
    assert handle.selected and all(l.name.startswith("up_blocks.") and l.kind == "self" for l in handle.selected)
    handle.select("down")
    assert handle.selected and all(l.name.startswith("down_blocks.") for l in handle.selected)
    handle.remove()


@pytest.mark.parametrize(
    "layers,message",
    [
        ("blocks.99", "matches no attention layer"),
        ("nonsense", "matches no attention layer"),
        (40, "out of range"),
        ([], "layers is empty"),
    ],
)
def test_selection_errors(layers, message):
    with pytest.raises(ValueError, match=message):
        asag.apply(_deep_timm_dit(), layers=layers)


def test_selecting_cross_attention_is_refused():
    model, inputs = tiny_models.build("pixart")
    with pytest.raises(ValueError, match="transformer_blocks.0.attn2 is cross"):
        asag.apply(model, layers="transformer_blocks.0.attn2", example_inputs=inputs(1))
    assert _hook_counts(model) == _hook_counts(tiny_models.build("pixart")[0])  # not half-patched


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="found no attention module"):
        asag.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_sana_linear_attention_is_refused_clearly():
    model, inputs = tiny_models.build("sana")
    with pytest.raises(ValueError, match="linear attention"):
        asag.apply(model, example_inputs=inputs(1))


def test_apply_is_idempotent_and_with_form_restores_on_exception():
    model = _deep_timm_dit()
    hooks = _hook_counts(model)
    first = asag.apply(model)
    counts = _hook_counts(model)
    second = asag.apply(model, layers="all")
    assert second is first and len(second.selected) == 12
    second.select("mid")
    assert _hook_counts(model) == counts
    first.remove()
    assert _hook_counts(model) == hooks
    with pytest.raises(RuntimeError, match="boom"):
        with asag.apply(model) as handle:
            with handle.guidance(chunks=2, perturbed=[1], lam=1.0, iters=2):
                raise RuntimeError("boom")
    assert _hook_counts(model) == hooks


def test_exception_inside_a_patched_layer_leaves_no_mode_behind():
    model = _deep_timm_dit()
    handle = asag.apply(model, layers="all")
    x = dict(x=torch.randn(3, 1, 8, 8), t=torch.tensor([1] * 3), y=torch.tensor([1] * 3))
    with pytest.raises(ValueError, match="batch of 2 equal chunks"):
        with handle.guidance(chunks=2, perturbed=[1], lam=1.0, iters=2):
            model(**x)
    assert torch._C._len_torch_function_stack() == 0
    x2 = dict(x=torch.randn(2, 1, 8, 8), t=torch.tensor([1] * 2), y=torch.tensor([1] * 2))
    with torch.no_grad():
        assert torch.equal(model(**x2), handle.model(**x2))
    handle.remove()


def test_timm_fused_attn_is_restored():
    model = _deep_timm_dit()
    model.blocks[6].attn.fused_attn = False
    x = dict(x=torch.randn(2, 1, 8, 8), t=torch.tensor([1, 1]), y=torch.tensor([2, 2]))
    base = _run(model, x)
    handle = asag.apply(model)
    with handle.guidance(chunks=2, perturbed=[1], lam=2.0, iters=3):
        guided = _run(model, x)
    assert model.blocks[6].attn.fused_attn is False
    torch.testing.assert_close(guided[0], base[0])  # fused vs manual attention: float tolerance
    assert not torch.allclose(guided[1], base[1])
    handle.remove()
    assert torch.equal(_run(model, x), base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model, inputs = tiny_models.build("dit")
    model = model.to(dtype)
    x = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs(2).items()}
    base = _run(model, x)
    handle = asag.apply(model, example_inputs=x)
    with handle.guidance(chunks=2, perturbed=[1], lam=2.0, iters=4):
        guided = _run(model, x)
    assert guided.dtype == dtype and torch.isfinite(guided).all()
    assert torch.equal(guided[0], base[0]) and not torch.equal(guided[1], base[1])
    handle.remove()


def test_torch_compile_after_apply():
    model, inputs = tiny_models.build("dit")
    x = inputs(2)
    handle = asag.apply(model, example_inputs=inputs(1))
    with handle.guidance(chunks=2, perturbed=[1], lam=2.0, iters=3):
        eager = _run(model, x)
    compiled = torch.compile(model)
    with handle.guidance(chunks=2, perturbed=[1], lam=2.0, iters=3):
        got = _run(compiled, x)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_run(compiled, x), _run(model, x), atol=1e-5, rtol=1e-5)
    handle.remove()


def _group_offload(model):
    from diffusers.hooks import apply_group_offloading

    cpu = torch.device("cpu")
    apply_group_offloading(model, onload_device=cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)


def _accelerate_offload(model):
    from accelerate import cpu_offload

    cpu_offload(model, execution_device=torch.device("cpu"))


@pytest.mark.parametrize("family,offload", [("dit", _group_offload), ("pixart", _accelerate_offload)])
def test_offload_hooks(family, offload):
    model, inputs = tiny_models.build(family)
    x = inputs(2)
    base = _run(model, x)
    offload(model)
    handle = asag.apply(model, example_inputs=inputs(1))
    with handle.guidance(chunks=2, perturbed=[1], lam=2.0, iters=3):
        guided = _run(model, x)
    assert torch.equal(guided[0], base[0]) and not torch.equal(guided[1], base[1])
    handle.remove()
    assert torch.equal(_run(model, x), base)


def test_comparison_variants():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g) for _ in range(3))
    base = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    sdpa = dict(query=q, key=k, value=v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
    pag = _perturb(sdpa, Perturbation(2, (1,), 0.0, 0, variant="identity"))
    assert torch.equal(pag[1], v[1]) and torch.equal(pag[0], base[0])  # PAG: output = value
    noisy = [_perturb(sdpa, Perturbation(2, (1,), 3.0, 0, variant="noise", seed=s)) for s in (0, 0, 1)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], noisy[2])  # seeded
    same = _perturb(sdpa, Perturbation(2, (1,), 0.0, 0, variant="noise"))
    torch.testing.assert_close(same, base)
    blurred = _perturb(sdpa, Perturbation(2, (1,), 100.0, 0, variant="blur"))
    uniform_q = q[1].mean(dim=-2, keepdim=True).expand_as(q[1])  # huge sigma: every query alike
    torch.testing.assert_close(blurred[1], torch.nn.functional.scaled_dot_product_attention(uniform_q, k[1], v[1]), atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="variant must be one of"):
        Perturbation(2, (1,), 1.0, 0, variant="other")


def test_processors_that_never_call_sdpa_are_refused():
    from diffusers.models.attention_processor import AttnProcessor

    model, inputs = tiny_models.build("sd15-unet")
    model.set_attn_processor(AttnProcessor())  # the manual baddbmm/softmax processor, like sliced/xformers
    with pytest.raises(ValueError, match="never called torch.nn.functional.scaled_dot_product_attention"):
        asag.apply(model, example_inputs=inputs(1))


def test_causal_gqa_and_masked_sdpa_calls():
    """lam = iters = 0 reproduces SDPA for causal, grouped-query and masked calls, and the
    mask is sliced along with the batch."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(4, 4, 9, 8, generator=g)
    k, v = (torch.randn(4, 2, 9, 8, generator=g) for _ in range(2))
    mask = torch.rand(4, 1, 9, 9, generator=g) > 0.3
    mask[..., 0] = True
    for extra in (dict(is_causal=True, enable_gqa=True), dict(attn_mask=mask, enable_gqa=True)):
        base = torch.nn.functional.scaled_dot_product_attention(q, k, v, **extra)
        sdpa = dict(dict(query=q, key=k, value=v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False), **extra)
        out = _perturb(sdpa, Perturbation(2, (1,), 0.0, 0))
        torch.testing.assert_close(out, base, atol=1e-5, rtol=1e-5)
        adv = _perturb(sdpa, Perturbation(2, (1,), 3.0, 4))
        assert torch.equal(adv[:2], base[:2]) and torch.isfinite(adv).all()
