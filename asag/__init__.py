"""asag: Adversarial Sinkhorn Attention Guidance (arXiv 2511.07499) for PyTorch.

``asag.ops`` holds the Sinkhorn-attention ops (C++/CUDA kernels with a PyTorch reference);
``asag.apply(model)`` attaches it to a diffusers or timm model's self-attention layers;
``asag.build_info()`` says what the installed extension compiled.
"""

from . import ops
from ._extension import build_info
from .patching import ASAGHandle, apply, register_attention, remove
from .guidance import ASAGConfig, disable, enable, guided_prediction

__version__ = "0.1.0"

__all__ = [
    "ASAGConfig",
    "ASAGHandle",
    "apply",
    "build_info",
    "disable",
    "enable",
    "guided_prediction",
    "ops",
    "register_attention",
    "remove",
    "__version__",
]
