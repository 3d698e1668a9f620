"""Every ASAG_* environment variable asag reads at run time, parsed in one place.

Build-time knobs (ASAG_FORCE_CUDA, ASAG_SKIP_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS, DEBUG)
are read by setup.py.
"""

import os


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


#: ASAG_DISABLE_EXTENSION=1: do not load asag._C; every op runs the PyTorch reference.
DISABLE_EXTENSION = _flag("ASAG_DISABLE_EXTENSION")


def _bytes(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(float(value))
    except ValueError:
        raise ValueError(f"{name} must be a number of bytes, got {value!r}") from None


#: ASAG_MATERIALIZED_BYTES: the largest float32 Nq x Nk logits block of one (batch, head)
#: slice that sinkhorn_attention(path="auto") materialises; above it the streaming path runs.
#: Default 512 MiB (square attention up to 11585 tokens).
MATERIALIZED_BYTES = _bytes("ASAG_MATERIALIZED_BYTES", 512 * 2**20)
