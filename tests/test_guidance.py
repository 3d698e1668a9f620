"""ASAG guidance: the formula, schedules, validation, diffusers pipelines end to end (tiny
random-weight components on CPU), the diffusers guider and hand-written sampling loops."""


import pytest
import torch

import asag
import tiny_models
import tiny_pipelines
from asag.guidance.config import AUTO_SCALE
from asag.guidance import ASAGConfig, Schedule, combine, guided_prediction, rescale
from asag.patching.handle import thread_state

# The pipelines tiny_pipelines itself defines: other test modules register more (some of which asag
# refuses) into the same dict, and which of them are imported first depends on collection order.
PIPELINES = [name for name, build in tiny_pipelines.PIPELINES.items() if build.__module__ == "tiny_pipelines"]


def test_formula_against_hand_computation():
    u, c, a = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([2.5])
    # eps_u + w_cfg (eps_c - eps_u) + w_asag (eps_c - eps_adv) = 1 + 7*2 + 2*0.5
    assert combine(c, a, 2.0, eps_uncond=u, cfg_scale=7.0).item() == pytest.approx(16.0)
    assert combine(c, a, 2.0).item() == pytest.approx(4.0)  # no CFG: eps_c + w (eps_c - eps_adv)
    assert combine(c, a, 2.0, eps_uncond=u, cfg_scale=1.0).item() == pytest.approx(4.0)
    assert combine(c, a, 0.0, eps_uncond=u, cfg_scale=7.0).item() == pytest.approx(15.0)  # plain CFG


def test_rescale_matches_lin_et_al():
    g = torch.Generator().manual_seed(0)
    eps, cond = torch.randn(2, 4, 8, 8, generator=g) * 3, torch.randn(2, 4, 8, 8, generator=g)
    out = rescale(eps, cond, 1.0)
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    half = rescale(eps, cond, 0.5)
    torch.testing.assert_close(half, 0.5 * out + 0.5 * eps)
    assert torch.equal(rescale(eps, cond, 0.0), eps)


def test_schedules_behave_as_named():
    assert Schedule(4, 1, "constant")(0.7) == 4
    assert [Schedule(4, 1, "linear")(p) for p in (0, 0.5, 1)] == [4, 2.5, 1]
    cosine = Schedule(4, 1, "cosine")
    assert cosine(0) == 4 and cosine(1) == pytest.approx(1) and cosine(0.5) == pytest.approx(2.5)
    assert cosine(0.1) > Schedule(4, 1, "linear")(0.1)  # flat start: stays strong early
    values = [cosine(i / 9) for i in range(10)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never switches itself back on


def test_config_values_and_interval():
    cfg = ASAGConfig(scale=3, lam=2, lam_end=0.5, lam_schedule="linear", start=0.2, stop=0.8)
    assert cfg.lam_at(0) == 2 and cfg.lam_at(1) == 0.5 and cfg.lam_at(0.5) == pytest.approx(1.25)
    assert [cfg.active_at(p) for p in (0.0, 0.2, 0.5, 0.8, 0.9)] == [False, True, True, True, False]
    assert ASAGConfig().lam_end == pytest.approx(ASAGConfig().lam / 2)  # default: lam / 2, cosine
    assert ASAGConfig(lam=4).lam_at(1) == pytest.approx(2)  # lam is the first step's value
    assert not ASAGConfig(scale=0).active_at(0.5)
    assert ASAGConfig(scale=2, scale_end=0, scale_schedule="linear").scale_at(0.5) == 1


def test_automatic_scale_depends_on_whether_cfg_runs():
    auto = ASAGConfig()
    assert auto.scale is None and auto.active_at(0.5)
    assert auto.scale_at(0.3, cfg=True) == AUTO_SCALE[True] and auto.scale_at(0.3, cfg=False) == AUTO_SCALE[False]
    assert ASAGConfig(scale_end=0, scale_schedule="linear").scale_at(0.5, cfg=False) == AUTO_SCALE[False] / 2
    with pytest.raises(ValueError, match="pass cfg"):
        auto.scale_at(0.3)
    assert ASAGConfig(scale=1.5).scale_at(0.3, cfg=True) == 1.5  # a scale given is used as it is
    assert "auto (0.5 with CFG, 3 without)" in auto.describe_scale()


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_guided_prediction_uses_the_automatic_scale_for_its_cfg(cfg_scale):
    model = tiny_models.timm_dit_model().eval()
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.3])
    kw = dict(cond={"y": torch.tensor([3, 4])}, uncond={"y": torch.tensor([10, 10])}, cfg_scale=cfg_scale, progress=0.3)
    with torch.no_grad():
        auto = guided_prediction(model, x, t, **kw)
        explicit = guided_prediction(model, x, t, scale=AUTO_SCALE[cfg_scale > 1], **kw)
        other = guided_prediction(model, x, t, scale=AUTO_SCALE[cfg_scale <= 1], **kw)
    assert torch.equal(auto, explicit) and not torch.equal(auto, other)
    asag.remove(model)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(scale=-1), "scale must be >= 0"),
        (dict(scale=float("nan")), "scale must be a finite number"),
        (dict(lam=-0.5), "lam must be >= 0"),
        (dict(tau=0), "tau must be > 0"),
        (dict(iters=-1), "iters must be an int >= 0"),
        (dict(iters=2.5), "iters must be an int >= 0"),
        (dict(lam_schedule="exp"), "lam_schedule must be one of"),
        (dict(scale_schedule="step"), "scale_schedule must be one of"),
        (dict(start=0.5, stop=0.5), "start must be < stop"),
        (dict(stop=1.5), "stop must be <= 1"),
        (dict(rescale=2.0), "rescale must be <= 1"),
        (dict(mode="parallel"), "mode must be one of"),
    ],
)
def test_config_validation_names_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ASAGConfig(**kwargs)


def _denoiser_state(pipe):
    d = asag.guidance.pipeline.denoiser_of(pipe)
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in d.modules()]
    return hooks, {k: v.clone() for k, v in d.state_dict().items()}


def _same_state(a, b):
    return a[0] == b[0] and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_end_to_end(name):
    pipe, kwargs = tiny_pipelines.build(name)
    before = _denoiser_state(pipe)
    base = tiny_pipelines.run(pipe, kwargs)
    with asag.enable(pipe, scale=0.0):
        assert torch.equal(tiny_pipelines.run(pipe, kwargs), base)  # scale 0: bit-identical
    with asag.enable(pipe, scale=3.0, lam=2.0, iters=3) as guidance:
        guided = tiny_pipelines.run(pipe, kwargs)
        assert guidance.handle.selected
    assert (guided - base).abs().max() > 1e-4  # scale > 0 changes the images
    assert torch.isfinite(guided).all()
    with asag.enable(pipe, scale=3.0, lam=2.0, iters=3, mode="sequential"):
        sequential = tiny_pipelines.run(pipe, kwargs)
    torch.testing.assert_close(sequential, guided, atol=1e-4, rtol=1e-4)  # batched == sequential
    assert _same_state(_denoiser_state(pipe), before)  # the denoiser is exactly as it was
    assert torch.equal(tiny_pipelines.run(pipe, kwargs), base)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_pipeline_default_scale_follows_the_pipelines_cfg(guidance_scale):
    pipe, kwargs = tiny_pipelines.build("sd")
    kwargs = dict(kwargs, guidance_scale=guidance_scale)
    if guidance_scale == 1.0:  # without CFG the pipeline wants no negative embeddings
        kwargs.pop("negative_prompt_embeds", None)
    results = []
    for scale in (None, AUTO_SCALE[True], AUTO_SCALE[False]):
        with asag.enable(pipe, scale=scale) as guidance:
            results.append(tiny_pipelines.run(pipe, kwargs))
        assert set(guidance.scales) == {AUTO_SCALE[guidance_scale > 1] if scale is None else scale}
    auto, with_cfg, without_cfg = results
    assert torch.equal(auto, with_cfg if guidance_scale > 1 else without_cfg)
    assert not torch.equal(with_cfg, without_cfg)


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_interval_excluding_every_step_is_bit_identical(name):
    pipe, kwargs = tiny_pipelines.build(name)
    base = tiny_pipelines.run(pipe, kwargs)
    calls = []
    with asag.enable(pipe, scale=3.0, start=0.0, stop=0.1) as guidance:  # 4 steps: 0, 1/3, 2/3, 1
        original = guidance.progress
        guidance.progress = lambda a, k: calls.append(original(a, k)) or original(a, k)
        partial = tiny_pipelines.run(pipe, kwargs)
    assert calls[:4] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert not torch.equal(partial, base)  # only the first step is guided
    with asag.enable(pipe, scale=3.0, start=0.9, stop=0.95):  # between the last two steps
        assert torch.equal(tiny_pipelines.run(pipe, kwargs), base)


def test_img2img_progress_starts_mid_way():
    pipe, kwargs = tiny_pipelines.build("sd-img2img")
    seen = []
    with asag.enable(pipe, scale=3.0) as guidance:
        original = guidance.progress
        guidance.progress = lambda a, k: seen.append(original(a, k)) or original(a, k)
        tiny_pipelines.run(pipe, kwargs)
    assert seen[0] > 0.3 and seen[-1] == pytest.approx(1.0)


def test_schedule_reaches_the_attention_layers():
    pipe, kwargs = tiny_pipelines.build("sd")
    lams = []
    with asag.enable(pipe, scale=3.0, lam=4.0, lam_end=1.0, lam_schedule="linear") as guidance:
        handle = guidance.handle
        original = handle._on_sdpa
        handle._on_sdpa = lambda entry, a, k: lams.append(thread_state(handle).perturbation.lam) or original(entry, a, k)
        tiny_pipelines.run(pipe, kwargs)
    assert lams == pytest.approx([4.0, 3.0, 2.0, 1.0])


def test_removal_on_exception_mid_sampling():
    pipe, kwargs = tiny_pipelines.build("sdxl")
    before = _denoiser_state(pipe)
    base = tiny_pipelines.run(pipe, kwargs)

    def explode(pipe, step, t, state):
        if step == 1:
            raise KeyboardInterrupt("stop")
        return state

    with pytest.raises(KeyboardInterrupt):
        with asag.enable(pipe, scale=3.0):
            tiny_pipelines.run(pipe, dict(kwargs, callback_on_step_end=explode))
    assert _same_state(_denoiser_state(pipe), before)
    assert torch._C._len_torch_function_stack() == 0
    assert torch.equal(tiny_pipelines.run(pipe, kwargs), base)


def test_enable_twice_replaces_and_disable_restores():
    pipe, kwargs = tiny_pipelines.build("pixart-sigma")
    before = _denoiser_state(pipe)
    first = asag.enable(pipe, scale=2.0)
    second = asag.enable(pipe, scale=3.0, layers="all")
    assert first._hooks == [] and second.config.scale == 3.0
    tiny_pipelines.run(pipe, kwargs)
    assert len(second.handle.selected) == 3
    asag.disable(pipe)
    asag.disable(pipe)  # no-op
    assert _same_state(_denoiser_state(pipe), before)


def test_guidance_rescale_option_runs():
    pipe, kwargs = tiny_pipelines.build("sd")
    with asag.enable(pipe, scale=5.0, rescale=0.7):
        out = tiny_pipelines.run(pipe, kwargs)
    assert torch.isfinite(out).all()


def test_guided_prediction_in_a_custom_loop():
    model = tiny_models.timm_dit_model().eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.3])
    cond, uncond = dict(y=torch.tensor([3, 4])), dict(y=torch.tensor([10, 10]))
    with torch.no_grad():
        eps = guided_prediction(model, x, t, cond=cond, uncond=uncond, cfg_scale=4.0, scale=2.0, lam=3.0, lam_end=3.0, iters=5)
        seq = guided_prediction(model, x, t, cond=cond, uncond=uncond, cfg_scale=4.0, scale=2.0, lam=3.0, lam_end=3.0, iters=5, mode="sequential")
        torch.testing.assert_close(seq, eps, atol=1e-4, rtol=1e-4)
        handle = asag.apply(model)
        e_u, e_c = model(x, t, **uncond), model(x, t, **cond)
        with handle.guidance(chunks=1, perturbed=[0], lam=3.0, iters=5):
            e_adv = model(x, t, **cond)
        torch.testing.assert_close(eps, e_u + 4.0 * (e_c - e_u) + 2.0 * (e_c - e_adv), atol=1e-4, rtol=1e-4)
        off = guided_prediction(model, x, t, cond=cond, uncond=uncond, cfg_scale=4.0, scale=2.0, start=0.5, progress=0.1)
        torch.testing.assert_close(off, e_u + 4.0 * (e_c - e_u), atol=1e-4, rtol=1e-4)
        uncond_only = guided_prediction(model, x, t, cond=cond, scale=2.0, lam=3.0, lam_end=3.0, iters=5)
        torch.testing.assert_close(uncond_only, e_c + 2.0 * (e_c - e_adv), atol=1e-4, rtol=1e-4)
    handle.remove()


def test_diffusers_guider_contract():
    from diffusers.guiders.guider_utils import BaseGuidance

    from asag.guidance import AdversarialSinkhornGuidance

    guider = AdversarialSinkhornGuidance(guidance_scale=4.0, asag_scale=2.0, lam=3.0, lam_end=3.0, stop=0.5)
    assert isinstance(guider, BaseGuidance)
    model = tiny_models.timm_dit_model().eval()
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.1])
    data = {"y": (torch.tensor([3]), torch.tensor([10]))}
    guider.set_state(step=0, num_inference_steps=4, timestep=t)
    assert guider.num_conditions == 3
    batches = guider.prepare_inputs(data)
    preds = []
    with torch.no_grad():
        for batch in batches:
            guider.prepare_models(model)
            preds.append(model(x, t, y=batch.y))
            guider.cleanup_models(model)
    for batch, pred in zip(batches, preds):
        batch.noise_pred = pred
    out = guider(batches).pred
    e_c, e_u, e_adv = preds
    assert not torch.equal(e_adv, e_c)
    torch.testing.assert_close(out, e_u + 4.0 * (e_c - e_u) + 2.0 * (e_c - e_adv))
    guider.set_state(step=3, num_inference_steps=4, timestep=t)  # past stop: CFG only
    assert guider.num_conditions == 2
    asag.remove(model)


def test_lora_adapters_keep_working():
    from peft import LoraConfig

    pipe, kwargs = tiny_pipelines.build("sd")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    base = tiny_pipelines.run(pipe, kwargs)
    with asag.enable(pipe, scale=0.0):
        assert torch.equal(tiny_pipelines.run(pipe, kwargs), base)
    with asag.enable(pipe, scale=2.0) as guidance:
        guided = tiny_pipelines.run(pipe, kwargs)
        assert guidance.handle.selected[0].kind == "self"
    assert (guided - base).abs().max() > 1e-4
    assert torch.equal(tiny_pipelines.run(pipe, kwargs), base)


def test_several_images_per_prompt():
    pipe, kwargs = tiny_pipelines.build("sdxl")
    kwargs = dict(kwargs, num_images_per_prompt=2)
    base = tiny_pipelines.run(pipe, kwargs)
    assert base.shape[0] == 2
    with asag.enable(pipe, scale=0.0):
        assert torch.equal(tiny_pipelines.run(pipe, kwargs), base)
    with asag.enable(pipe, scale=2.0):
        batched = tiny_pipelines.run(pipe, kwargs)
    with asag.enable(pipe, scale=2.0, mode="sequential"):
        sequential = tiny_pipelines.run(pipe, kwargs)
    torch.testing.assert_close(sequential, batched, atol=1e-4, rtol=1e-4)
    assert (batched - base).abs().max() > 1e-4
