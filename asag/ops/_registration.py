"""Python-side registrations of the compiled ops: fake (meta) kernels for torch.compile and
autograd formulas. Imported only when asag._C is loaded (it defines the ops' schemas)."""

import torch

from . import _checks, reference


# The fake kernels check what the real ones check (they also serve meta tensors, and a call
# mixing a meta tensor with real ones is dispatched to them): a wrong call never returns an
# uninitialised tensor.


@torch.library.register_fake("asag::adversarial_logits")
def _adversarial_logits_fake(q, k, lam, tau, scale):
    _checks.check_qk(q, k)
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return q.new_empty(shape, dtype=reference.accumulation_dtype(q.dtype))


@torch.library.register_fake("asag::sinkhorn")
def _sinkhorn_fake(logits, iters, key_mask=None):
    _checks.check_sinkhorn(logits, key_mask)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("asag::sinkhorn_attention")
def _sinkhorn_attention_fake(q, k, v, lam, iters, tau, scale, key_mask=None, attn_bias=None):
    _checks.check_attention(q, k, v, key_mask, attn_bias)
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


torch.library.register_fake("asag::sinkhorn_attention_streaming")(_sinkhorn_attention_fake)


# Backward passes differentiate the reference, recomputed from the saved inputs. The kernels
# are forward-only (guidance needs no gradient); this keeps the ops usable in training code.
# Under create_graph (grad mode on during backward) the recomputation stays connected to the
# inputs, so second derivatives are the reference's too, not silently dropped.


def _reference_grads(fn, inputs, grad_out):
    needs = [isinstance(t, torch.Tensor) and t.requires_grad for t in inputs]
    higher_order = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = inputs if higher_order else [t.detach().requires_grad_(n) if n else t for t, n in zip(inputs, needs)]
        out = fn(*leaves)
        wanted = [t for t, n in zip(leaves, needs) if n]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True, create_graph=higher_order))
    return [next(grads) if n else None for n in needs]


def _setup_attention(ctx, inputs, output):
    q, k, v, lam, iters, tau, scale, key_mask, attn_bias = inputs
    ctx.params = dict(lam=lam, iters=iters, tau=tau, scale=scale)
    ctx.save_for_backward(q, k, v, key_mask, attn_bias)


def _backward_attention(ctx, grad):
    q, k, v, key_mask, attn_bias = ctx.saved_tensors

    def fn(q, k, v, attn_bias):
        return reference.sinkhorn_attention(
            q, k, v, key_mask=key_mask, attn_bias=attn_bias, **ctx.params
        )

    gq, gk, gv, gb = _reference_grads(fn, [q, k, v, attn_bias], grad)
    return gq, gk, gv, None, None, None, None, None, gb


def _setup_logits(ctx, inputs, output):
    q, k, lam, tau, scale = inputs
    ctx.params = dict(lam=lam, tau=tau, scale=scale)
    ctx.save_for_backward(q, k)


def _backward_logits(ctx, grad):
    q, k = ctx.saved_tensors

    def fn(q, k):
        return reference.adversarial_logits(q, k, **ctx.params)

    gq, gk = _reference_grads(fn, [q, k], grad)
    return gq, gk, None, None, None


def _setup_sinkhorn(ctx, inputs, output):
    logits, iters, key_mask = inputs
    ctx.iters = iters
    ctx.save_for_backward(logits, key_mask)


def _backward_sinkhorn(ctx, grad):
    logits, key_mask = ctx.saved_tensors

    def fn(logits):
        return reference.sinkhorn(logits, iters=ctx.iters, key_mask=key_mask)

    (glogits,) = _reference_grads(fn, [logits], grad)
    return glogits, None, None


for _name in ("asag::sinkhorn_attention", "asag::sinkhorn_attention_streaming"):
    torch.library.register_autograd(_name, _backward_attention, setup_context=_setup_attention)
torch.library.register_autograd(
    "asag::adversarial_logits", _backward_logits, setup_context=_setup_logits
)
torch.library.register_autograd("asag::sinkhorn", _backward_sinkhorn, setup_context=_setup_sinkhorn)
