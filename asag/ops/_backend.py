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


# What the extension compiled, read once (a pybind call torch.compile could not trace).
_BUILD = _extension.build_info() if _extension.available() else {}
_ARCH_REASONS: dict = {}


def _archs(spec: str):
    """(major, minor, ptx) of a TORCH_CUDA_ARCH_LIST such as "8.0;9.0+PTX"."""
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if item:
            number, ptx = item.replace("+PTX", ""), item.endswith("+PTX")
            major, _, minor = number.partition(".")
            yield int(major), int(minor or 0), ptx


def arch_runs(spec: str, capability) -> bool:
    """Whether kernels compiled for ``spec`` run on a GPU of ``capability`` (major, minor): it
    runs SASS of its major version and a lower or equal minor, or PTX of a lower or equal
    version (JIT-compiled by the driver)."""
    archs = list(_archs(spec))
    major_have, minor_have = capability
    return not archs or any(
        (major == major_have and minor <= minor_have) or (ptx and (major, minor) <= (major_have, minor_have))
        for major, minor, ptx in archs
    )


def _arch_reason(device: torch.device):
    """Why the compiled CUDA kernels have no code for this GPU, or None."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCH_REASONS:
        have = torch.cuda.get_device_capability(index)
        _ARCH_REASONS[index] = None if arch_runs(_BUILD.get("cuda_archs") or "", have) else (
            f"asag's CUDA kernels were compiled for {_BUILD.get('cuda_archs')}, which this GPU "
            f"(compute capability {have[0]}.{have[1]}) cannot run: rebuild with TORCH_CUDA_ARCH_LIST including it"
        )
    return _ARCH_REASONS[index]


def kernel_unsupported_reasons(device: torch.device, streaming: bool = False) -> List[str]:
    """Every reason the compiled kernel cannot serve a call on ``device`` (empty: it can);
    ``streaming``: the streaming path's kernel."""
    if not _extension.available():
        return [_extension.UNAVAILABLE_REASON]
    reasons = []
    if streaming and device.type == "cuda" and _BUILD.get("cuda_kernels") and not _BUILD.get("cuda_streaming"):
        reasons.append("asag._C has no CUDA streaming kernel")
    if device.type == "cuda" and not _BUILD.get("cuda_kernels"):
        reasons.append(
            "asag._C was built without CUDA kernels (rebuild with the CUDA toolkit and "
            "CUDA_HOME set; see asag.build_info())"
        )
    elif device.type == "cuda" and not torch.compiler.is_compiling():
        reason = _arch_reason(device)
        if reason:
            reasons.append(reason)
    elif device.type not in ("cpu", "cuda", "meta"):
        reasons.append(f"asag has no kernel for device type {device.type!r}")
    return reasons


def use_kernel(backend: str, device: torch.device, op: str, streaming: bool = False) -> bool:
    """True to run the compiled op, False to run the reference (see module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    reasons = kernel_unsupported_reasons(device, streaming)
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
