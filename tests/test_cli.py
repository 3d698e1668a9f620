"""The command line on a user's own pipelines: tiny pipelines saved with save_pretrained and
loaded back by the real loading code (local files only)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

import cli_pipelines  # noqa: E402
from asag.__main__ import run as main  # noqa: E402
from asag.cli import images as cli_images  # noqa: E402

SMALL = ["--steps", "3", "--height", "16", "--width", "16"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return cli_pipelines.save_sd(str(tmp_path_factory.mktemp("sd")))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from asag.demo import export

    folder = tmp_path_factory.mktemp("digits")
    return export.export_pipeline(str(folder / "pipeline")), export.export_reference(str(folder / "reference"))


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


def _fails(argv, capsys, *needles):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def test_generate_writes_settings_into_each_png_and_reproduces_it(sd, tmp_path):
    out = tmp_path / "gen"
    paths = main(["generate", sd, "--prompt", "a red cat", "--prompt", "a dog", "--seeds", "0", "5",
                  "--lam", "3", "--layers", "all", "--scale", "2.5", "--out", str(out), *SMALL])
    assert sorted(os.path.basename(p) for p in paths) == ["000-seed0.png", "000-seed5.png", "001-seed0.png", "001-seed5.png"]
    meta = cli_images.read_metadata(paths[1])
    assert meta["seed"] == 5 and meta["call"]["prompt"] == "a red cat" and meta["call"]["num_inference_steps"] == 3
    assert meta["method"] == "asag" and meta["asag"]["lam"] == 3.0 and meta["asag"]["layers"] == "all"
    assert meta["asag"]["scale"] == 2.5 and meta["asag"]["lam_end"] == 1.5 and meta["pipeline"] == "StableDiffusionPipeline"
    assert meta["asag_scales_used"] == [2.5, 2.5]  # first and last guided step
    assert not np.array_equal(_pixels(paths[0]), _pixels(paths[1]))  # seeds differ
    again = main(["generate", "--reproduce", paths[1], "--out", str(tmp_path / "again")])
    assert np.array_equal(_pixels(again[0]), _pixels(paths[1]))


def test_compare_writes_one_labelled_grid_of_methods_by_images(sd, tmp_path):
    cell, gap = 48, cli_images.GAP
    result = main(["compare", sd, "--prompt", "a red cat", "--seeds", "0", "1", "2", "--cell", str(cell),
                   "--method", "none", "--method", "cfg", "--method", "pag:scale=2", "--method", "asag",
                   "--method", "asag:scale=4,lam=1", "--out", str(tmp_path), *SMALL])
    width, height = Image.open(result["grid"]).size
    assert (width, height) == result["size"]
    line = 16 + 4
    assert height == (line + 8) + (2 * line + 8) + 5 * (cell + gap)  # title, column labels, 5 rows
    assert 0 < width - 3 * (cell + gap) <= 240  # the row labels' column, then 3 images
    assert set(result["times"]) == {"none", "cfg", "pag:scale=2", "asag", "asag:scale=4,lam=1"}
    table = (tmp_path / "compare.md").read_text()
    assert "| pag:scale=2 | 3 |" in table and "compare.png" in table
    # none is CFG off, cfg the pipeline as given; the methods give different images
    none, cfg = (_pixels(tmp_path / m / "000-seed0.png") for m in ("none", "cfg"))
    assert not np.array_equal(none, cfg)
    assert cli_images.read_metadata(str(tmp_path / "pag_scale=2" / "000-seed1.png"))["pag"]["scale"] == 2.0


def test_long_row_labels_wrap_inside_their_column_and_rows_grow_to_fit():
    from PIL import Image, ImageDraw

    label = "asag:scale=0.54,layers=all,lam=11.952,lam_end=2.988,iters=10,variant=sinkhorn"
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), cli_images._font(16)
    lines = cli_images._wrap(draw, label, font, 228, lines=6)
    assert len(lines) > 1 and "".join(lines) == label  # broken after commas, nothing lost
    assert all(draw.textlength(line, font=font) <= 228 for line in lines)
    assert all(draw.textlength(line, font=font) <= 100 for line in cli_images._wrap(draw, "x" * 30, font, 100, lines=6))
    picture = cli_images.grid([[Image.new("RGB", (8, 8))] * 2] * 2, ["none", label], ["seed 0", "seed 1"], cell=32)
    line = 16 + 4
    assert picture.size == (240 + 2 * (32 + cli_images.GAP), (2 * line + 8) + (32 + cli_images.GAP) + (len(lines) * line + 8 + cli_images.GAP))


def test_compare_defaults_leave_out_what_the_pipeline_lacks(digits, tmp_path):
    result = main(["compare", digits[0], "--seeds", "0", "1", "--steps", "4", "--cell", "32", "--out", str(tmp_path)])
    assert list(result["times"]) == ["none", "asag"]  # unconditional: no CFG, no PAG in diffusers
    meta = cli_images.read_metadata(str(tmp_path / "asag" / "000-seed1.png"))
    assert meta["asag"]["scale"] is None and meta["asag_scales_used"] == [3.0, 3.0]  # automatic, no CFG


def test_sweep_is_a_grid_over_two_settings(digits, tmp_path):
    cell = 32
    result = main(["sweep", digits[0], "--vary", "scale=1,3", "--vary", "lam=0.5,2,8", "--steps", "4",
                   "--cell", str(cell), "--layers", "all", "--out", str(tmp_path)])
    width, height = result["size"]
    line = 20
    assert height == (line + 8) + (2 * line + 8) + 2 * (cell + cli_images.GAP)
    assert 0 < width - 3 * (cell + cli_images.GAP) <= 240
    assert len([f for f in os.listdir(tmp_path) if f.startswith("asag")]) == 6
    meta = cli_images.read_metadata(str(tmp_path / "asag_scale=3_lam=8.png"))
    assert meta["asag"]["scale"] == 3.0 and meta["asag"]["lam"] == 8.0 and meta["asag"]["layers"] == "all"


def test_clear_errors(sd, digits, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    _fails(["generate", str(tmp_path / "nowhere")], capsys, "does not exist")
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "config.json").write_text("{}")
    _fails(["generate", str(tmp_path / "single")], capsys, "not a diffusers pipeline", "model_index.json", "single model")
    _fails(["generate", "someone/some-model"], capsys, "not in the local Hugging Face cache", str(tmp_path / "cache"))
    _fails(["generate", digits[0], "--guidance-scale", "3", "--steps", "2"], capsys,
           "--guidance-scale does not apply to DDIMPipeline")
    _fails(["generate", digits[0], "--prompt", "a cat", "--steps", "2"], capsys, "DDIMPipeline takes no prompt")
    _fails(["compare", digits[0], "--method", "pag"], capsys, "no PAG pipeline for DDIMPipeline")
    _fails(["compare", digits[0], "--method", "cfg"], capsys, "cfg does not apply")
    _fails(["compare", digits[0], "--method", "asag:lam=-1"], capsys, "lam must be >= 0")
    _fails(["compare", digits[0], "--method", "asag:colour=red"], capsys, "'colour' is not an ASAG setting")
    _fails(["compare", digits[0], "--method", "magic"], capsys, "a method is none, cfg, pag")
    _fails(["generate", sd, "--iters", "many"], capsys, "iters expects int")
    _fails(["generate", sd, "--arg", "flavour=1", *SMALL], capsys, "--arg flavour does not apply")
    _fails(["sweep", digits[0], "--vary", "scale=1", "--vary", "scale=2"], capsys, "names scale twice")
    import diffusers

    diffusers.StableDiffusionPAGPipeline.from_pretrained(sd).save_pretrained(str(tmp_path / "pag"))
    _fails(["compare", str(tmp_path / "pag"), "--method", "asag"], capsys, "asag cannot guide StableDiffusionPAGPipeline")


def test_prompt_files(tmp_path):
    from asag.cli.evaluate import read_prompts

    (tmp_path / "p.txt").write_text("a cat\n\n# a comment\na dog\n")
    assert [e["prompt"] for e in read_prompts(str(tmp_path / "p.txt"))] == ["a cat", "a dog"]
    (tmp_path / "p.json").write_text(json.dumps(["a cat", {"prompt": "a dog", "label": 3}, {"class_label": 7}]))
    entries = read_prompts(str(tmp_path / "p.json"))
    assert entries[1]["label"] == 3 and entries[2] == dict(prompt=None, negative_prompt=None, label=7)
    (tmp_path / "p.csv").write_text("prompt,label\na cat,1\n,2\n")
    assert [(e["prompt"], e["label"]) for e in read_prompts(str(tmp_path / "p.csv"))] == [("a cat", 1), (None, 2)]


LAUNCHERS = {  # how a user starts several processes
    "torchrun": lambda n: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", "29533"],
    "accelerate": lambda n: [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--cpu",
                             "--main_process_port", "29534"],
}


def _evaluate(args, out, processes=1, launcher="torchrun"):
    command = [sys.executable, "-m", "asag", "evaluate", *args, "--out", str(out), "--progress", "none"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    if processes > 1:
        command = LAUNCHERS[launcher](processes) + ["-m", "asag", "evaluate", *args, "--out", str(out), "--progress", "none"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _rows(folder):
    with open(folder / "results.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds_per_image"} for row in csv.DictReader(f)]


def test_evaluate_two_processes_match_one_and_resume_skips_finished_samples(digits, tmp_path):
    pipeline, reference = digits
    args = [pipeline, "--samples", "6", "--steps", "4", "--method", "none", "--method", "asag:scale=3",
            "--reference", reference, "--features", "digits"]
    one, two = tmp_path / "one", tmp_path / "two"
    _evaluate(args, one)
    _evaluate(args, two, processes=2)
    for method in ("none", "asag_scale=3"):
        files = sorted(os.listdir(one / method))
        assert files == sorted(os.listdir(two / method)) and len(files) == 6
        for name in files:
            assert np.array_equal(_pixels(one / method / name), _pixels(two / method / name)), name
    assert _rows(one) == _rows(two)
    assert {row["method"] for row in _rows(one)} == {"none", "asag:scale=3"}
    assert float(_rows(one)[0]["fid"]) > 0 and (one / "grid.png").exists() and (one / "results.md").exists()

    # resume: nothing is made again; a missing sample alone is
    stamps = {name: os.path.getmtime(one / "none" / name) for name in os.listdir(one / "none")}
    os.remove(one / "asag_scale=3" / "00000-0002.png")
    _evaluate(args, one)
    assert {name: os.path.getmtime(one / "none" / name) for name in stamps} == stamps
    assert np.array_equal(_pixels(one / "asag_scale=3" / "00000-0002.png"), _pixels(two / "asag_scale=3" / "00000-0002.png"))
    assert _rows(one) == _rows(two)
    # other settings in the same folder: refused
    done = subprocess.run([sys.executable, "-m", "asag", "evaluate", pipeline, "--samples", "6", "--steps", "5",
                           "--out", str(one)], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.returncode == 2 and "other settings" in done.stderr


def test_evaluate_under_accelerate_launch_matches_one_process(digits, tmp_path):
    pytest.importorskip("accelerate")
    pipeline, reference = digits
    args = [pipeline, "--samples", "5", "--steps", "3", "--method", "asag", "--reference", reference, "--features", "digits"]
    _evaluate(args, tmp_path / "one")
    _evaluate(args, tmp_path / "two", processes=2, launcher="accelerate")
    files = sorted(os.listdir(tmp_path / "one" / "asag"))
    assert files == sorted(os.listdir(tmp_path / "two" / "asag")) and len(files) == 5
    for name in files:
        assert np.array_equal(_pixels(tmp_path / "one" / "asag" / name), _pixels(tmp_path / "two" / "asag" / name)), name
    assert _rows(tmp_path / "one") == _rows(tmp_path / "two")


def test_evaluate_prompts_with_clip_score_and_class_labels(sd, tmp_path):
    clip = cli_pipelines.save_clip(str(tmp_path / "clip"))
    (tmp_path / "prompts.txt").write_text("a red cat\na blue dog\n")
    result = main(["evaluate", sd, "--prompts", str(tmp_path / "prompts.txt"), "--samples", "2", "--method", "asag",
                   "--clip-model", clip, "--out", str(tmp_path / "ev"), "--progress", "none", *SMALL])
    (row,) = result["rows"]
    assert row["images"] == 4 and 0 <= row["clip_score"] <= 100
    metas = [cli_images.read_metadata(str(tmp_path / "ev" / "asag" / f)) for f in sorted(os.listdir(tmp_path / "ev" / "asag"))]
    assert [m["call"]["prompt"] for m in metas] == ["a red cat", "a red cat", "a blue dog", "a blue dog"]
    assert len({m["seed"] for m in metas}) == 4

    dit = cli_pipelines.save_dit(str(tmp_path / "dit"))
    (tmp_path / "labels.json").write_text(json.dumps([{"label": 1}, {"label": 7}]))
    result = main(["evaluate", dit, "--prompts", str(tmp_path / "labels.json"), "--samples", "1", "--steps", "3",
                   "--method", "cfg", "--method", "asag", "--out", str(tmp_path / "ev_dit"), "--progress", "none"])
    assert [r["images"] for r in result["rows"]] == [2, 2]
    meta = cli_images.read_metadata(str(tmp_path / "ev_dit" / "asag" / "00001-0000.png"))
    assert meta["call"]["class_labels"] == [7]


def test_clip_score_matches_torchmetrics_definition(tmp_path):
    from asag.cli.evaluate import clip_score
    from transformers import CLIPModel, CLIPProcessor

    clip = cli_pipelines.save_clip(str(tmp_path / "clip"))
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    prompts = ["a cat", "two dogs", "a red house"]
    model, processor = CLIPModel.from_pretrained(clip), CLIPProcessor.from_pretrained(clip)
    batch = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    assert clip_score(images, prompts, clip) == pytest.approx((100 * cos.clamp_min(0)).mean().item(), abs=1e-4)


def test_videos_are_saved_as_animated_pngs_with_their_settings(tmp_path):
    from types import SimpleNamespace

    frames = np.random.default_rng(0).random((1, 5, 8, 12, 3)).astype(np.float32)  # (videos, frames, H, W, C)
    (video,) = cli_images.pictures(SimpleNamespace(images=None, frames=frames))
    assert len(video) == 5 and video[0].size == (12, 8)
    cli_images.save(video, str(tmp_path / "v.png"), {"seed": 3})
    with Image.open(tmp_path / "v.png") as image:
        assert image.n_frames == 5
    assert cli_images.read_metadata(str(tmp_path / "v.png")) == {"seed": 3}
    with pytest.raises(Exception, match="images and videos only"):
        cli_images.pictures(SimpleNamespace(audios=np.zeros((1, 100))))


def test_inception_features_without_weights_say_where_they_were_looked_for(digits, tmp_path, monkeypatch):
    from asag.cli.evaluate import feature_extractor
    from asag.cli.loading import CLIError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(CLIError, match="torchmetrics|looked in .*torch_home"):
        feature_extractor("inception")(images)


def test_console_script_exits_zero_on_success_and_two_on_errors(digits, tmp_path):
    # The installed `asag` script is `sys.exit(asag.__main__.main())`: a command's result must
    # not become its exit status.
    script = "import sys; from asag.__main__ import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    ok = subprocess.run([sys.executable, "-c", script, "sweep", digits[0], "--vary", "scale=1,2", "--steps", "2",
                         "--cell", "16", "--out", str(tmp_path)], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "{" not in ok.stderr, ok.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", script, "sweep", str(tmp_path / "missing"), "--vary", "scale=1"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "error" in bad.stderr
