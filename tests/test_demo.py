"""The demo's metrics, the shipped checkpoints and `asag demo --quick`."""

import os
import subprocess
import sys

import pytest
import torch

from asag.demo import metrics, models


def test_fid_of_a_set_against_itself_is_about_zero_and_against_noise_large():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 16, generator=g)
    b = torch.randn(500, 16, generator=g)
    assert abs(metrics.fid(a, a)) < 1e-6
    assert metrics.fid(a, b) < 0.5  # two samples of one distribution
    assert metrics.fid(a, torch.rand(500, 16, generator=g) * 10 + 3) > 50


def test_precision_recall_and_inception_score():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(300, 8, generator=g)
    p, r = metrics.precision_recall(real, real.clone())
    assert p == 1.0 and r == 1.0
    far = torch.randn(300, 8, generator=g) + 100
    assert metrics.precision_recall(real, far) == (0.0, 0.0)
    collapsed = real[:1].repeat(300, 1)  # mode collapse: precise, no recall
    p, r = metrics.precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.1
    uniform = torch.full((100, 10), 0.1)
    assert metrics.inception_score(uniform) == pytest.approx(1.0)
    confident = torch.eye(10).repeat(10, 1)
    assert metrics.inception_score(confident) == pytest.approx(10.0, rel=1e-4)


@pytest.mark.parametrize("name", ["dit", "unet", "classifier"])
def test_shipped_checkpoints_load_and_are_small(name):
    path = os.path.join(models.CHECKPOINTS, f"{name}.pt")
    assert os.path.getsize(path) < 10 * 2**20
    model, meta = models.load(name)
    assert "seed" in meta and "command" in meta
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_classifier_recognises_held_out_digits():
    from asag.demo import data

    classifier, meta = models.load("classifier")
    _, _, x, y = data.load_digits_split(meta["seed"])
    with torch.no_grad():
        assert (classifier(x).argmax(-1) == y).float().mean() > 0.95


def test_asag_demo_quick(tmp_path):
    out = tmp_path / "grid.png"
    done = subprocess.run(
        [sys.executable, "-m", "asag", "demo", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.exists() and out.stat().st_size > 1000
    for name in ("no guidance", "CFG 1.5 + ASAG (tuned)", "CFG 1.5 + PAG (tuned)", "ASAG (defaults)", "FID"):
        assert name in done.stdout


def test_held_out_digits_split_into_disjoint_stratified_validation_and_test_halves():
    from asag.demo import data

    (x_val, y_val), (x_test, y_test) = data.held_out_splits(0)
    _, _, x, y = data.load_digits_split(0)
    assert len(x_val) + len(x_test) == len(x) and abs(len(x_val) - len(x_test)) <= 1
    assert ((y_val.bincount(minlength=10) - y_test.bincount(minlength=10)).abs() <= 1).all()
    rows = lambda a: sorted(map(tuple, a.flatten(1).tolist()))  # noqa: E731
    assert rows(torch.cat([x_val, x_test])) == rows(x)  # the halves partition the held-out digits


def test_quality_benchmark_gives_every_method_the_same_budget_of_valid_candidates():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "quality"))
    import spaces

    for family in spaces.FAMILIES:
        candidates = family.candidates(10)
        assert len(candidates) == 10 and candidates == family.candidates(10)  # deterministic
        assert len({c["layers"] for c in candidates}) == 4  # Latin hypercube: every layer choice drawn
        for kind in ("dit", "unet"):
            for settings in candidates:
                config = family.config(kind, settings)
                assert 0.25 <= config.scale <= 8
                for name, value in family.fixed.items():
                    assert getattr(config, name) == value
    assert len(spaces.cfg_candidates(10)) == 10


@pytest.mark.parametrize("scale", [None, 1.5])
def test_enable_on_the_exported_pipeline_equals_guided_prediction_in_a_hand_written_loop(tmp_path, scale, monkeypatch):
    """The pipeline path (asag.enable, roles read from the pipeline, automatic scale without
    CFG) and the sampler-level path (asag.guided_prediction) give the same samples."""
    import diffusers
    import diffusers.pipelines.ddim.pipeline_ddim as ddim

    import asag
    from asag.demo.export import export_pipeline

    pipe = diffusers.DDIMPipeline.from_pretrained(export_pipeline(str(tmp_path)))
    unet, scheduler = pipe.unet, pipe.scheduler
    size = unet.config.sample_size
    noise = torch.randn(2, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    scheduler.set_timesteps(4)
    x, steps = noise.clone(), scheduler.timesteps
    with torch.no_grad():
        for i, t in enumerate(steps):
            eps = asag.guided_prediction(unet, x, t, progress=i / (len(steps) - 1), scale=scale)
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    asag.remove(unet)
    monkeypatch.setattr(ddim, "randn_tensor", lambda *a, **k: noise.clone())
    with asag.enable(pipe, scale=scale):
        images = pipe(num_inference_steps=4, output_type="np", eta=0.0).images
    assert torch.equal(torch.from_numpy(images).permute(0, 3, 1, 2), (x / 2 + 0.5).clamp(0, 1))


def test_asag_config_defaults_are_what_the_benchmark_chose_on_validation():
    """ASAGConfig's defaults are copied from benchmarks/quality/results/chosen.json: they must
    not drift apart."""
    import json

    from asag.guidance.config import AUTO_SCALE, LAM_END_RATIO, ASAGConfig

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "quality", "results", "chosen.json")
    with open(path) as f:
        chosen = json.load(f)["defaults"]
    config = ASAGConfig()
    assert chosen["shape"]["layers"] == 0 and config.layers == "mid"  # the first layer choice is "mid"
    assert config.lam == chosen["shape"]["lam"] and config.iters == chosen["shape"]["iters"]
    assert LAM_END_RATIO == chosen["shape"]["lam_end_ratio"] and config.lam_end == config.lam * LAM_END_RATIO
    assert AUTO_SCALE == {True: chosen["with_cfg"], False: chosen["without_cfg"]}
