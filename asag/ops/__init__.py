"""Sinkhorn-attention ops: ``sinkhorn_attention``, ``adversarial_logits``, ``sinkhorn``.

Each runs asag's compiled kernel (registered as ``torch.ops.asag.*``) or the pure-PyTorch
reference in :mod:`asag.ops.reference`; see each function's ``backend`` argument.
"""

from . import reference
from ._backend import kernel_unsupported_reasons
from .functional import adversarial_logits, sinkhorn, sinkhorn_attention

__all__ = [
    "adversarial_logits",
    "kernel_unsupported_reasons",
    "reference",
    "sinkhorn",
    "sinkhorn_attention",
]
