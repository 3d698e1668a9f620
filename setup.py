"""Builds asag._C: C++ CPU kernels always, CUDA kernels when the CUDA toolkit is there.

Knobs (environment variables):
  ASAG_FORCE_CUDA=1       build the CUDA kernels or fail (no toolkit -> error)
  ASAG_SKIP_CUDA=1        never build the CUDA kernels
  CUDA_HOME               the CUDA toolkit (set it: torch otherwise guesses /usr/local)
  TORCH_CUDA_ARCH_LIST    GPU archs, default "8.0;9.0+PTX"
  MAX_JOBS, NVCC_THREADS  parallel compile jobs / nvcc threads per job
  DEBUG=1                 -O0 -g, host and device
"""

import glob
import os
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
RIGHT_COMMAND = "pip install --no-build-isolation ."


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _import_installed_torch():
    """Imports the torch the user installed, also from inside pip's isolated build env.

    asag must compile against the torch it will run with. An isolated build (plain
    `pip install .`) hides the user's site-packages; we ask the same interpreter, outside the
    isolation, where its torch lives and build against that one.
    """
    try:
        import torch  # noqa: F401

        return torch
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"
    found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    site_dir = found.stdout.strip().splitlines()[-1] if found.returncode == 0 else ""
    if site_dir and os.path.isdir(os.path.join(site_dir, "torch")):
        sys.path.append(site_dir)
        try:
            import torch  # noqa: F811

            print(f"asag: building against the installed torch {torch.__version__} in {site_dir}")
            return torch
        except ImportError:
            pass
    sys.exit(
        "asag: PyTorch is not installed in this Python environment, and asag compiles against "
        "the torch it will run with.\n"
        "Install torch first (e.g. pip install torch==2.14.1), then run:\n"
        f"    {RIGHT_COMMAND}"
    )


torch = _import_installed_torch()


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    return None


# torch's build helpers fix their CUDA folder when they are imported: with nvcc on PATH outside
# the toolkit they would guess /usr/local and the link would fail on -lcudart. Set it first.
if _cuda_home() is not None and not _flag("ASAG_SKIP_CUDA"):
    os.environ["CUDA_HOME"] = _cuda_home()
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda(cuda_sources):
    """Decided from the toolkit and torch's CUDA version, never from a visible GPU."""
    if _flag("ASAG_SKIP_CUDA"):
        return False, "ASAG_SKIP_CUDA=1"
    reasons = []
    if not cuda_sources:
        reasons.append("no CUDA sources in csrc/cuda")
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    home = _cuda_home()
    if home is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)")
    else:
        os.environ["CUDA_HOME"] = home  # torch's cpp_extension reads it
    if reasons and _flag("ASAG_FORCE_CUDA"):
        sys.exit("asag: ASAG_FORCE_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
    return not reasons, "; ".join(reasons)


def _cuda_library_headers(home):
    """A folder with the CUDA library headers (cuSPARSE, cuBLAS, cuSOLVER...) that ATen's CUDA
    headers include but a minimal toolkit lacks, linked from pip's nvidia-* wheels that torch
    depends on. Only missing headers are linked, so the toolkit's own runtime headers win."""
    have = set(os.listdir(os.path.join(home, "include")))
    if "cusparse.h" in have:
        return []
    site_dir = os.path.dirname(os.path.dirname(torch.__file__))
    extra = os.path.join(ROOT, "build", "cuda_library_headers")
    os.makedirs(extra, exist_ok=True)
    for folder in sorted(glob.glob(os.path.join(site_dir, "nvidia", "*", "include"))):
        for name in os.listdir(folder):
            link = os.path.join(extra, name)
            if name not in have and not os.path.lexists(link):
                os.symlink(os.path.join(folder, name), link)
    return [extra]


def _extension():
    debug = _flag("DEBUG")
    cpu_sources = ["csrc/asag.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    with_cuda, why_not = _want_cuda(cuda_sources)
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp", f'-DASAG_TORCH_VERSION="{torch.__version__}"']
    if debug:
        cxx.append("-DASAG_DEBUG")
    args = dict(
        name="asag._C",
        sources=cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_link_args=["-fopenmp"],
    )
    if not with_cuda:
        print(f"asag: building the CPU kernels only ({why_not})")
        return CppExtension(extra_compile_args={"cxx": cxx}, **args)

    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    defines = [
        "-DASAG_WITH_CUDA",
        f'-DASAG_CUDA_ARCHS="{archs}"',
        f'-DASAG_CUDA_VERSION="{torch.version.cuda}"',
    ]
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3"]
    nvcc += ["--expt-relaxed-constexpr", "-lineinfo"] + defines
    nvcc.append(f"--threads={os.environ.get('NVCC_THREADS', '2')}")
    print(f"asag: building the CPU and CUDA kernels for archs {archs}")
    args["sources"] = cpu_sources + cuda_sources
    args["include_dirs"] += _cuda_library_headers(os.environ["CUDA_HOME"])
    return CUDAExtension(extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc}, **args)


def _emulation_extension():
    """asag._cuda_emulation: the CUDA kernels' own source run on the CPU (csrc/emulation), for
    the tests; built everywhere, with or without the CUDA toolkit."""
    cxx = ["-O0", "-g"] if _flag("DEBUG") else ["-O2"]
    return CppExtension(
        name="asag._cuda_emulation",
        sources=["csrc/emulation/cuda_emulation.cpp"],
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_compile_args={"cxx": cxx + ["-pthread", "-std=c++20"]},
        extra_link_args=["-pthread"],
    )


setup(
    packages=find_packages(include=["asag", "asag.*"]),
    ext_modules=[_extension(), _emulation_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
