"""Chooses between the compiled kernel and the PyTorch reference for one call.

``auto`` takes the kernel when it can serve the call, else the reference, and warns once per
reason. ``kernel`` raises listing every reason it cannot. ``torch`` is the reference.
"""

import warnings
from typing import List

import torch

from .. import _extension

BACKENDS = ("auto", "kernel", "torch")
_warned = set()


def kernel_unsupported_reasons(device: torch.device) -> List[str]:
    """Every reason the compiled kernel cannot serve a call on ``device`` (empty: it can)."""
    if not _extension.available():
        return [_extension.UNAVAILABLE_REASON]
    reasons = []
    if device.type == "cuda" and not _extension.build_info()["cuda_kernels"]:
        reasons.append(
            "asag._C was built without CUDA kernels (rebuild with the CUDA toolkit and "
            "CUDA_HOME set; see asag.build_info())"
        )
    elif device.type not in ("cpu", "cuda", "meta"):
        reasons.append(f"asag has no kernel for device type {device.type!r}")
    return reasons


def use_kernel(backend: str, device: torch.device, op: str) -> bool:
    """True to run the compiled op, False to run the reference (see module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    reasons = kernel_unsupported_reasons(device)
    if not reasons:
        return True
    if backend == "kernel":
        raise RuntimeError(
            f"asag.ops.{op}(backend='kernel') cannot run: " + "; ".join(reasons)
        )
    message = f"asag.ops.{op}: using the PyTorch reference because " + "; ".join(reasons)
    if message not in _warned and not torch.compiler.is_compiling():
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return False
