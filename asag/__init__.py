"""asag: Adversarial Sinkhorn Attention Guidance (arXiv 2511.07499) for PyTorch.

``asag.ops`` holds the Sinkhorn-attention ops (C++/CUDA kernels with a PyTorch reference);
``asag.build_info()`` says what the installed extension compiled.
"""

from . import ops
from ._extension import build_info

__version__ = "0.1.0"

__all__ = ["build_info", "ops", "__version__"]
