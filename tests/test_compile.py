"""asag under torch.compile with inductor on CPU: compiling before or after asag.enable gives
the eager images, with no recompile from asag's per-step settings and no graph break outside
the perturbed layers (benchmarks/compile_check.py prints the same for a 30-step run)."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "compile_check.py"


@pytest.fixture(scope="module")
def rows():
    spec = importlib.util.spec_from_file_location("compile_check", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--steps", "4"])


def test_compile_before_or_after_enable(rows):
    assert len(rows) == 4
    for row in rows:
        assert row["max_diff"] < 1e-5, row
        assert row["breaks_outside"] == 0, row
        assert row["recompiles"] <= 2, row
