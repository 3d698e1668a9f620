"""Loads the compiled extension asag._C, and says why not when it cannot.

`import asag` always works: without the extension the ops run the PyTorch reference.
A failed import is recorded with its message (a link error is not hidden).
"""

from typing import Optional

from . import _environment

_C = None
#: Why the extension is not available (None when it is).
UNAVAILABLE_REASON: Optional[str] = None

if _environment.DISABLE_EXTENSION:
    UNAVAILABLE_REASON = "the extension is disabled by ASAG_DISABLE_EXTENSION=1"
else:
    try:
        import torch  # noqa: F401  (loads libtorch before the extension links against it)

        from . import _C  # type: ignore[attr-defined,no-redef]
    except ImportError as error:
        UNAVAILABLE_REASON = f"asag._C could not be imported ({error})"
        _C = None


def available() -> bool:
    return _C is not None


def build_info() -> dict:
    """What this installation of asag compiled, and the versions it runs with.

    Keys: ``extension`` (loaded?), ``unavailable_reason``, ``cpu_kernels``, ``cpu_isa`` (the
    instruction set the CPU kernels' hot loops use here), ``cuda_kernels``, ``cuda_archs``,
    ``cuda_version`` (compiled for), ``torch_version`` (compiled against), ``openmp``,
    ``debug``, ``cpu_streaming`` / ``cuda_streaming`` (the streaming path's kernels),
    ``materialized_bytes`` (above this many bytes of one slice's float32 logits,
    ``sinkhorn_attention(path="auto")`` streams), and ``torch_runtime`` / ``cuda_runtime``
    (what is running now).
    """
    import torch

    info = {
        "extension": available(),
        "unavailable_reason": UNAVAILABLE_REASON,
        "cpu_kernels": False,
        "cuda_kernels": False,
    }
    if _C is not None:
        info.update(_C.build_info())
    info["materialized_bytes"] = _environment.MATERIALIZED_BYTES
    info["torch_runtime"] = torch.__version__
    info["cuda_runtime"] = torch.version.cuda
    return info
