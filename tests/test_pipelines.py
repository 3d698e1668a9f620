"""asag.enable across diffusers pipeline families (tiny random-weight components on CPU).

The invariant every pipeline must pass: with ``lam = 0, iters = 0`` the perturbed branch is
the conditional one, so the images equal the plain pipeline's at any scale, whatever the CFG
layout (one batched call or separate calls), prompts and images per prompt. Scale 0 is
bit-identical; ``disable`` restores the denoisers exactly. Then the cases where a guess would
be wrong: the formula at the scheduler, the number of adversarial branches, the pipeline's own
guidance arithmetic, shared denoisers, refused pipelines and silent no-ops.
"""

import pytest
import torch

import asag
import tiny_pipelines
import tiny_pipelines_extra
import tiny_pipelines_more
from asag.guidance.pipeline import _sample_of, _select_rows, _timestep, denoisers_of
from asag.patching.apply import unwrap
from asag.patching.handle import existing_handle
from asag.patching.perturb import Perturbation

# Refused, each with a clear error (test_refused_pipelines): PAG's batch layout, Sana's linear
# attention, HiDream's batch in a later dimension, Stable Audio's unrecognisable negative rows.
REFUSED = {"sd-pag": ValueError, "sana": ValueError, "hidream": asag.guidance.roles.UnknownRole,
           "stable-audio": asag.guidance.roles.UnknownRole}
# HiDream with as many Llama layers as prompts: its (layers, batch, ...) embeddings look batched
# in their first dimension; the transformer itself then fails on their shape.
PIPELINES = sorted(n for n in tiny_pipelines.PIPELINES if n not in REFUSED and n != "hidream-2-llama-layers")
VARIANTS = ("one", "two_prompts", "two_images")


def _state(pipe):
    out = []
    for d in denoisers_of(pipe):
        hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in d.modules()]
        out.append((hooks, {k: v.clone() for k, v in d.state_dict().items()}))
    return out


def _same_state(a, b):
    return all(ha == hb and all(torch.equal(sa[k], sb[k]) for k in sa) for (ha, sa), (hb, sb) in zip(a, b))


def _kwargs(name, kind):
    pipe, kwargs = tiny_pipelines.build(name)
    module = tiny_pipelines_extra if name in tiny_pipelines_extra.EXTRA else tiny_pipelines_more
    try:
        return pipe, module.variant(name, kwargs, kind)
    except NotImplementedError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("kind", VARIANTS)
@pytest.mark.parametrize("name", PIPELINES)
def test_lam_zero_reproduces_the_plain_pipeline(name, kind):
    pipe, kwargs = _kwargs(name, kind)
    before = _state(pipe)
    base = tiny_pipelines.run(pipe, kwargs)
    with asag.enable(pipe, scale=0.0):
        assert torch.equal(tiny_pipelines.run(pipe, kwargs), base)  # scale 0: untouched
    for mode in ("batched", "sequential"):
        with asag.enable(pipe, scale=3.0, lam=0.0, lam_end=0.0, iters=0, mode=mode, layers="all"):
            same = tiny_pipelines.run(pipe, kwargs)
        torch.testing.assert_close(same, base, atol=2e-4, rtol=2e-4, msg=f"{name} {kind} {mode}")
    assert _same_state(_state(pipe), before)
    assert torch.equal(tiny_pipelines.run(pipe, kwargs), base)


# ---- what runs: the denoiser calls and the prediction each scheduler step gets ----------------


class Recorder:
    """The denoiser calls as the pipeline made them (before asag) and as they ran (after),
    and the prediction each scheduler step received. Attach after asag.enable and a first
    guided run (which probes the model: two more forward passes, once)."""

    def __init__(self, pipe):
        self.pipe, self.denoiser = pipe, unwrap(denoisers_of(pipe)[0])
        self.calls, self.ran, self.steps = [], [], []
        self.hooks = [
            self.denoiser.register_forward_pre_hook(self._made, with_kwargs=True, prepend=True),
            self.denoiser.register_forward_pre_hook(self._run, with_kwargs=True),
        ]
        step = pipe.scheduler.step
        pipe.scheduler.step = lambda out, *a, **k: self.steps.append(out.detach().clone()) or step(out, *a, **k)

    def _made(self, module, args, kwargs):
        self.calls.append((args, dict(kwargs)))

    def _run(self, module, args, kwargs):
        self.ran.append(_sample_of(args, kwargs).shape[0])

    def close(self):
        for h in self.hooks:
            h.remove()
        del self.pipe.scheduler.step

    def batches(self):
        return list(zip([_sample_of(a, k).shape[0] for a, k in self.calls], self.ran))

    def first_step(self):
        t = _timestep(*self.calls[0])
        return [c for c in self.calls if _timestep(*c) == t]


def _pred(out):
    return out if isinstance(out, torch.Tensor) else (out[0] if isinstance(out, tuple) else out.sample)


def _plain(rec, call, rows=None):
    args, kwargs = call
    if rows is not None:
        args, kwargs = _select_rows(args, kwargs, _sample_of(args, kwargs).shape[0], rows, keep=False)
    with torch.no_grad():
        return _pred(rec.denoiser(*args, **kwargs))


def _adversarial(rec, call, rows, lam, iters, layers):
    handle = existing_handle(rec.denoiser)
    with handle.perturbing(Perturbation(1, (0,), lam, iters), layers):
        return _plain(rec, call, rows)


ASAG = dict(scale=2.0, lam=3.0, lam_end=3.0, iters=3, layers="all")


@pytest.mark.parametrize("name,kind,expected", [
    ("cogvideox", "one", [(2, 3)] * 2),  # batched CFG without a do_classifier_free_guidance property
    ("pixart-alpha", "two_prompts", [(4, 6)] * 2),
    ("dit", "one", [(2, 3)] * 2),  # [c, u]: the conditional row comes first
    ("flux", "one", [(1, 2)] * 4),  # no CFG
    ("wan", "two_images", [(2, 4), (2, 2)] * 2),  # CFG as two calls: the negative call is left alone
    ("lumina2", "two_prompts", [(2, 4), (2, 2)] * 2),
    ("flux-true-cfg", "one", [(1, 2), (1, 1)] * 2),
    ("qwenimage", "one", [(1, 2), (1, 1)] * 2),
    ("sd3-skip-layers", "one", [(2, 3), (1, 1)] * 2),  # the skip-layer call gets no branch
    ("animatediff", "two_prompts", [(4, 6)] * 2),
])
def test_one_adversarial_branch_per_conditional_sample(name, kind, expected):
    pipe, kwargs = _kwargs(name, kind)
    with asag.enable(pipe, **ASAG):
        tiny_pipelines.run(pipe, kwargs)
        rec = Recorder(pipe)
        tiny_pipelines.run(pipe, kwargs)
        rec.close()
    assert rec.batches() == expected


@pytest.mark.parametrize("name", ["cogvideox", "cogvideox-dynamic", "pixart-alpha", "dit", "wan", "flux-true-cfg", "sd3-skip-layers"])
def test_the_scheduler_gets_the_asag_formula(name):
    """eps = u + w (c - u) + s (c - c_adv), plus whatever guidance the pipeline adds itself
    (SD3's skip-layer term), checked at the first scheduler step against direct calls."""
    pipe, kwargs = tiny_pipelines.build(name)
    with asag.enable(pipe, **ASAG):
        tiny_pipelines.run(pipe, kwargs)
        rec = Recorder(pipe)
        tiny_pipelines.run(pipe, kwargs)
        first = rec.first_step()
        s, lam, iters = ASAG["scale"], ASAG["lam"], ASAG["iters"]
        if name in ("wan", "flux-true-cfg"):  # two calls: conditional, then unconditional
            cond, uncond = first
            c, u = _plain(rec, cond), _plain(rec, uncond)
            c_adv = _adversarial(rec, cond, [0], lam, iters, "all")
        else:
            order = (1, 0) if name == "dit" else (0, 1)  # DiT batches [c, u]
            both = _plain(rec, first[0])
            u, c = both[order[0]:order[0] + 1], both[order[1]:order[1] + 1]
            c_adv = _adversarial(rec, first[0], [order[1]], lam, iters, "all")
        w = kwargs.get("true_cfg_scale", kwargs.get("guidance_scale"))
        if name == "cogvideox-dynamic":  # the scale CogVideoX sets for this step, after the call
            import math

            t, n = _timestep(*first[0]), kwargs["num_inference_steps"]
            w = 1 + w * ((1 - math.cos(math.pi * ((n - t) / n) ** 5.0)) / 2)
        eps = u + w * (c - u) + s * (c - c_adv)
        if name == "sd3-skip-layers":
            eps = eps + pipe._skip_layer_guidance_scale * (c - _plain(rec, first[1]))
        rec.close()
    got = rec.steps[0][:1]  # DiT steps both halves of its batch with the same prediction
    eps = eps[:, : got.shape[1]] if name in ("pixart-alpha", "dit") else eps  # learned sigma: eps channels
    assert (s * (c - c_adv)).abs().max() > 1e-3  # the ASAG term matters here
    torch.testing.assert_close(got.float(), eps.float(), atol=2e-5, rtol=1e-4)


def test_the_pipelines_own_guidance_rescale_is_kept():
    pipe, kwargs = tiny_pipelines.build("sdxl")
    rescaled = dict(kwargs, guidance_rescale=0.7)
    base, plain_rescaled = tiny_pipelines.run(pipe, kwargs), tiny_pipelines.run(pipe, rescaled)
    assert (plain_rescaled - base).abs().max() > 1e-4
    with asag.enable(pipe, scale=3.0, lam=0.0, lam_end=0.0, iters=0):
        torch.testing.assert_close(tiny_pipelines.run(pipe, rescaled), plain_rescaled, atol=1e-5, rtol=1e-4)
    with asag.enable(pipe, scale=3.0):
        guided, guided_rescaled = tiny_pipelines.run(pipe, kwargs), tiny_pipelines.run(pipe, rescaled)
    assert (guided_rescaled - guided).abs().max() > 1e-4  # the pipeline still rescales


@pytest.mark.parametrize("name", ["cogvideox", "wan"])
def test_asag_rescale_acts_on_the_combination(name):
    from asag.guidance import rescale

    pipe, kwargs = tiny_pipelines.build(name)
    with asag.enable(pipe, **ASAG, rescale=0.5):
        tiny_pipelines.run(pipe, kwargs)
        rec = Recorder(pipe)
        tiny_pipelines.run(pipe, kwargs)
        rec.close()
    with asag.enable(pipe, **ASAG):
        tiny_pipelines.run(pipe, kwargs)
        plain = Recorder(pipe)
        tiny_pipelines.run(pipe, kwargs)
        plain.close()
        c = _plain(plain, plain.calls[0])
        c = c if name == "wan" else c[1:]  # wan: the conditional call; cogvideox: [u, c]
    torch.testing.assert_close(rec.steps[0], rescale(plain.steps[0], c, 0.5), atol=2e-5, rtol=1e-4)


# ---- sharing, refusing, never a silent no-op ----------------------------------------------------


def test_a_shared_denoiser_is_guided_only_by_the_enabled_pipeline():
    import diffusers

    p1, kwargs = tiny_pipelines.build("sd")
    p2 = diffusers.StableDiffusionPipeline(**p1.components)
    p2.set_progress_bar_config(disable=True)
    base = tiny_pipelines.run(p2, kwargs)
    g1 = asag.enable(p1, scale=3.0)
    assert torch.equal(tiny_pipelines.run(p2, kwargs), base)  # p2 is not guided
    guided1 = tiny_pipelines.run(p1, kwargs)
    g2 = asag.enable(p2, scale=1.5, layers="all")
    guided2 = tiny_pipelines.run(p2, kwargs)
    assert not torch.equal(guided2, base) and not torch.equal(guided2, guided1)
    assert torch.equal(tiny_pipelines.run(p1, kwargs), guided1)  # p1 keeps its own settings
    asag.disable(p1)
    assert torch.equal(tiny_pipelines.run(p2, kwargs), guided2)  # disabling p1 leaves p2 alone
    assert torch.equal(tiny_pipelines.run(p1, kwargs), base)
    g2.disable()
    assert not g1.enabled and not g2.enabled
    assert torch.equal(tiny_pipelines.run(p2, kwargs), base)


def test_called_directly_the_denoiser_is_not_guided():
    pipe, kwargs = tiny_pipelines.build("sd")
    unet = pipe.unet
    x = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor([10, 10]), encoder_hidden_states=torch.randn(2, 5, 24))
    with torch.no_grad():
        base = unet(**x).sample
        with asag.enable(pipe, scale=3.0):
            tiny_pipelines.run(pipe, kwargs)
            assert torch.equal(unet(**x).sample, base)


def test_pag_pipelines_are_refused():
    pipe, _ = tiny_pipelines.build("sd-pag")
    before = _state(pipe)
    with pytest.raises(ValueError, match="PAG"):
        asag.enable(pipe)
    assert _same_state(_state(pipe), before)


@pytest.mark.parametrize("name", sorted(n for n in REFUSED if n != "sd-pag"))
def test_refused_pipelines_say_why_and_stay_intact(name):
    pipe, kwargs = tiny_pipelines.build(name)
    before = _state(pipe)
    base = tiny_pipelines.run(pipe, kwargs)
    with pytest.raises(REFUSED[name]) as error:
        with asag.enable(pipe, scale=2.0, layers="all"):
            tiny_pipelines.run(pipe, kwargs)
    message = str(error.value)
    assert ("linear attention" in message) if name == "sana" else ("guided_prediction" in message)
    assert _same_state(_state(pipe), before)
    assert torch.equal(tiny_pipelines.run(pipe, kwargs), base)


@pytest.mark.parametrize("switch", ["slicing", "processor"])
def test_attention_that_bypasses_sdpa_after_the_probe_raises(switch):
    from diffusers.models.attention_processor import AttnProcessor

    pipe, kwargs = tiny_pipelines.build("sd")
    with asag.enable(pipe, scale=3.0):
        tiny_pipelines.run(pipe, kwargs)  # probed with SDPA processors
        if switch == "slicing":
            pipe.enable_attention_slicing(1)
        else:
            pipe.unet.set_attn_processor(AttnProcessor())
        with pytest.raises(RuntimeError, match="reached no attention layer"):
            tiny_pipelines.run(pipe, kwargs)
    assert torch._C._len_torch_function_stack() == 0


def test_interrupt_inside_the_denoiser_leaves_the_pipeline_clean():
    pipe, kwargs = tiny_pipelines.build("sd")
    base = tiny_pipelines.run(pipe, kwargs)
    guidance = asag.enable(pipe, scale=3.0)
    guided = tiny_pipelines.run(pipe, kwargs)
    layer = guidance.layers[0][0].module
    hook = layer.to_q.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        tiny_pipelines.run(pipe, kwargs)
    hook.remove()
    x = dict(sample=torch.randn(3, 4, 8, 8), timestep=torch.tensor([10] * 3), encoder_hidden_states=torch.randn(3, 5, 24))
    with torch.no_grad():
        direct = pipe.unet(**x).sample  # a plain call on this thread: not perturbed
    guidance.disable()
    with torch.no_grad():
        assert torch.equal(pipe.unet(**x).sample, direct)
    assert torch._C._len_torch_function_stack() == 0
    with asag.enable(pipe, scale=3.0):
        assert torch.equal(tiny_pipelines.run(pipe, kwargs), guided)
    assert torch.equal(tiny_pipelines.run(pipe, kwargs), base)


def test_friendly_errors_and_repr():
    pipe, kwargs = tiny_pipelines.build("sd")
    with pytest.raises(TypeError, match=r"asag.apply\(pipe.unet\).*asag.enable"):
        asag.apply(pipe)
    with pytest.raises(TypeError, match="takes a diffusers pipeline"):
        asag.enable("a photo of a cat")
    with pytest.raises(TypeError, match="not a model"):
        asag.enable(pipe.unet)
    guidance = asag.enable(pipe, scale=2.5, layers="mid")
    assert "scale 2.5" in repr(guidance) and "resolved at the first guided call" in repr(guidance)
    tiny_pipelines.run(pipe, kwargs)
    assert "mid_block.attentions.0.transformer_blocks.0.attn1" in repr(guidance)
    guidance.disable()
    assert "disabled" in repr(guidance)


# ---- the diffusers guider in modular pipelines ---------------------------------------------------


def _modular(kind):
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks, WanBlocks

    source, kwargs = tiny_pipelines.build("wan" if kind == "wan" else "sdxl")
    blocks = WanBlocks() if kind == "wan" else StableDiffusionXLAutoBlocks()
    blocks.sub_blocks.pop("text_encoder")  # prompt embeddings are passed directly
    pipe = blocks.init_pipeline()
    pipe.update_components(**{k: v for k, v in source.components.items() if v is not None and k in pipe.components})
    pipe.set_progress_bar_config(disable=True)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
             "height", "width", "num_frames", "num_inference_steps")
    args = {k: v for k, v in kwargs.items() if k in names}
    output = "videos" if kind == "wan" else "images"
    return pipe, lambda: pipe(**args, generator=torch.Generator().manual_seed(0), output=output, output_type="pt")


@pytest.mark.parametrize("kind", ["wan", "sdxl"])
def test_guider_in_modular_pipelines(kind):
    from diffusers.guiders import ClassifierFreeGuidance

    from asag.guidance import AdversarialSinkhornGuidance

    pipe, run = _modular(kind)
    denoiser = pipe.transformer if kind == "wan" else pipe.unet
    hooks = lambda: sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in denoiser.modules())  # noqa: E731
    before = hooks()
    outputs = {}
    for name, guider in [
        ("cfg", ClassifierFreeGuidance(guidance_scale=5.0)),
        ("off", AdversarialSinkhornGuidance(guidance_scale=5.0, asag_scale=0.0)),
        ("lam0", AdversarialSinkhornGuidance(guidance_scale=5.0, asag_scale=2.0, lam=0.0, lam_end=0.0, iters=0)),
        ("asag", AdversarialSinkhornGuidance(guidance_scale=5.0, asag_scale=2.0, lam=3.0)),
        ("cfg again", ClassifierFreeGuidance(guidance_scale=5.0)),
    ]:
        pipe.update_components(guider=guider)
        outputs[name] = torch.as_tensor(run())
        assert hooks() == before, name  # nothing stays on the denoiser between steps or after a swap
    assert torch.equal(outputs["off"], outputs["cfg"])
    torch.testing.assert_close(outputs["lam0"], outputs["cfg"], atol=1e-4, rtol=1e-4)
    assert (outputs["asag"] - outputs["cfg"]).abs().max() > 1e-3
    assert torch.equal(outputs["cfg again"], outputs["cfg"])


class _Opaque:
    """A hand-made 'pipeline' whose variables asag cannot read: it must refuse, not guess."""

    def __init__(self, unet, first, second):
        self.unet, self.first, self.second = unet, first, second

    def __call__(self):
        x = torch.randn(1, 4, 8, 8)
        hidden = torch.cat([self.first, self.second])
        with torch.no_grad():
            return self.unet(torch.cat([x, x]), torch.tensor([10, 10]), encoder_hidden_states=hidden).sample


def test_calls_whose_roles_are_unknown_raise():
    pipe, _ = tiny_pipelines.build("sd")
    opaque = _Opaque(pipe.unet, torch.randn(1, 5, 24), torch.randn(1, 5, 24))
    opaque()
    with asag.enable(opaque, scale=2.0):
        with pytest.raises(asag.guidance.roles.UnknownRole, match=r"guided_prediction.*AdversarialSinkhornGuidance"):
            opaque()
    same = torch.randn(1, 5, 24)
    with asag.enable(pipe, scale=2.0):  # prompt and negative prompt encode identically
        with pytest.raises(asag.guidance.roles.UnknownRole, match="match both a prompt and a negative prompt"):
            tiny_pipelines.run(pipe, dict(tiny_pipelines.build("sd")[1], prompt_embeds=same, negative_prompt_embeds=same))


def test_added_key_value_attention_is_joint_with_text_keys_only():
    """Kandinsky's UNet attends from its own tokens to [image-embedding tokens, own tokens]:
    the image-to-image block is perturbed, the share that goes to the added keys kept."""
    pipe, kwargs = tiny_pipelines.build("kandinsky22")
    with asag.enable(pipe, scale=3.0, layers="all") as guidance:
        tiny_pipelines.run(pipe, kwargs)
        layers = guidance.layers[0]
    assert layers and all(l.kind == "joint" and not l.text_queries and l.text_first for l in layers)
