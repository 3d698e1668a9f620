"""No state leaks: interrupts mid-forward, deep copies, threads and removed handles."""

import copy
import threading

import pytest
import torch

import asag
import tiny_models


def _run(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else (out[0] if isinstance(out, tuple) else out.sample)


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


class _Interrupt:
    """Raises KeyboardInterrupt from inside the n-th call of a module's forward."""

    def __init__(self, module):
        self.hook = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.hook.remove()
        raise KeyboardInterrupt("stop")


@pytest.mark.parametrize("family", ["timm-dit", "sd15-unet"])
def test_interrupt_inside_attention_leaves_nothing_behind(family):
    model, inputs = tiny_models.build(family)
    x = inputs(2)
    base = _run(model, x)
    handle = asag.apply(model, layers="mid", example_inputs=inputs(1))
    layer = handle.selected[0]
    timm = hasattr(layer.module, "fused_attn")
    if timm:
        layer.module.fused_attn = False
    inner = next(m for m in layer.module.modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(KeyboardInterrupt):
        with handle.guidance(chunks=2, perturbed=[1], lam=3.0, iters=3):
            _Interrupt(inner)  # raised while the selected layer's mode is on the stack
            _run(model, x)
    assert torch._C._len_torch_function_stack() == 0
    if timm:
        assert layer.module.fused_attn is False
        layer.module.fused_attn = True
    with handle.guidance(chunks=2, perturbed=[1], lam=3.0, iters=3):
        guided = _run(model, x)
    assert torch.equal(guided[0], base[0])  # only the selected layer, only the perturbed chunk
    handle.select("all")
    with handle.guidance(chunks=2, perturbed=[1], lam=0.0, iters=0):
        plain = _run(model, x)
    torch.testing.assert_close(plain, base, atol=1e-5, rtol=1e-4)
    handle.remove()
    assert torch.equal(_run(model, x), base)


def test_deepcopy_gives_an_independent_patched_model():
    model, inputs = tiny_models.build("dit")
    x = inputs(2)
    base = _run(model, x)
    handle = asag.apply(model, example_inputs=inputs(1))
    clone = copy.deepcopy(model)
    twin = asag.apply(clone)
    assert twin is not handle and twin.model is clone and asag.apply(clone) is twin
    assert [l.name for l in twin.selected] == [l.name for l in handle.selected]
    with handle.guidance(chunks=2, perturbed=[1], lam=3.0, iters=3):
        assert torch.equal(_run(clone, x), base)  # the original's guidance does not reach the copy
        guided = _run(model, x)
    with twin.guidance(chunks=2, perturbed=[1], lam=3.0, iters=3):
        torch.testing.assert_close(_run(clone, x), guided)  # the copy's own handle works
    hooks = _hooks(tiny_models.build("dit")[0])
    twin.remove()
    assert _hooks(clone) == hooks
    handle.remove()
    assert _hooks(model) == hooks


def test_guidance_belongs_to_its_thread():
    model, inputs = tiny_models.build("timm-dit")
    x = inputs(2)
    base = _run(model, x)
    handle = asag.apply(model, layers="all")
    results, inside, release = [], threading.Event(), threading.Event()

    def other():
        inside.wait()
        for _ in range(5):
            results.append(torch.equal(_run(model, x), base))
        release.set()

    thread = threading.Thread(target=other)
    thread.start()
    with handle.guidance(chunks=2, perturbed=[1], lam=3.0, iters=3):
        inside.set()
        guided = _run(model, x)
        release.wait(30)
    thread.join()
    assert results == [True] * 5
    assert not torch.equal(guided[1], base[1])
    handle.remove()


def test_removed_handle_refuses_use():
    model, inputs = tiny_models.build("timm-dit")
    handle = asag.apply(model)
    hooks = _hooks(model)
    handle.remove()
    after = _hooks(model)
    with pytest.raises(RuntimeError, match="removed"):
        handle.select("all")
    with pytest.raises(RuntimeError, match="removed"):
        with handle.guidance(chunks=2, perturbed=[1], lam=1.0, iters=1):
            pass
    assert _hooks(model) == after and after < hooks


def test_perturbed_accepts_an_index():
    model, inputs = tiny_models.build("timm-dit")
    x = inputs(2)
    handle = asag.apply(model)
    with handle.guidance(chunks=2, perturbed=1, lam=2.0, iters=2):
        a = _run(model, x)
    with handle.guidance(chunks=2, perturbed=[1], lam=2.0, iters=2):
        b = _run(model, x)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="perturbed must list chunk indices"):
        with handle.guidance(chunks=2, perturbed=2, lam=2.0, iters=2):
            pass
    handle.remove()


def test_a_swapped_processor_is_never_a_silent_no_op():
    from diffusers.models.attention_processor import AttnProcessor

    model, inputs = tiny_models.build("sd15-unet")
    handle = asag.apply(model, example_inputs=inputs(1))
    model.set_attn_processor(AttnProcessor())  # manual softmax: bypasses SDPA
    with pytest.raises(RuntimeError, match="reached no attention layer"):
        with handle.guidance(chunks=2, perturbed=[1], lam=2.0, iters=2):
            _run(model, inputs(2))
    assert torch._C._len_torch_function_stack() == 0
    handle.remove()
