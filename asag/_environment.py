"""Every ASAG_* environment variable asag reads at run time, parsed in one place.

Build-time knobs (ASAG_FORCE_CUDA, ASAG_SKIP_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS, DEBUG)
are read by setup.py.
"""

import os


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


#: ASAG_DISABLE_EXTENSION=1: do not load asag._C; every op runs the PyTorch reference.
DISABLE_EXTENSION = _flag("ASAG_DISABLE_EXTENSION")
