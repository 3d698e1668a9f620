"""setup.py's build decisions, checked without compiling (setup.py --version runs them)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(**env):
    full = dict(os.environ, **env)
    return subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=ROOT, env=full, capture_output=True, text=True, timeout=300
    )


def test_force_cuda_without_toolkit_fails_with_the_reason():
    done = _setup(ASAG_FORCE_CUDA="1", CUDA_HOME="/nonexistent", CUDA_PATH="")
    assert done.returncode != 0
    assert "ASAG_FORCE_CUDA=1 but the CUDA kernels cannot be built" in done.stderr
    assert "no CUDA toolkit found" in done.stderr


def test_skip_cuda_builds_cpu_kernels_only():
    done = _setup(ASAG_SKIP_CUDA="1")
    assert done.returncode == 0, done.stderr
    assert "building the CPU kernels only (ASAG_SKIP_CUDA=1)" in done.stdout


def test_missing_toolkit_is_not_an_error():
    done = _setup(CUDA_HOME="/nonexistent", CUDA_PATH="")
    assert done.returncode == 0, done.stderr
    assert "building the CPU kernels only" in done.stdout and "no CUDA toolkit found" in done.stdout
