"""`sparse-dit profile --model PATH` on every supported family: a tiny pipeline saved with ``save_pretrained``
(tests/tiny_pipelines.py) is profiled by the CLI, the profile loads, fits, and the pipeline generates with it.
Also: bad models are refused before any weights load, and calibration resumes from its partial file."""

from __future__ import annotations

import json
import re
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from tiny_pipelines import FAMILIES, save_tiny_pipeline  # noqa: E402

import sparse_dit  # noqa: E402
from sparse_dit import cli  # noqa: E402
from sparse_dit.profile import Profile  # noqa: E402

NEEDS = {"wan-i2v": "ftfy"}  # Wan's I2V pipeline cleans prompts with ftfy
TARGET = 0.5


def _first_image(tmp_path: Path, height: int, width: int) -> Path:
    import imageio.v2 as imageio
    import numpy as np

    path = tmp_path / "first.png"
    imageio.imwrite(path, np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    return path


def _profile_args(family: str, model: str, out: Path, tmp_path: Path) -> list[str]:
    """A CLI call sized to run in seconds: one prompt, two steps, small blocks, tile and radial candidates."""
    fam = FAMILIES[family]
    args = ["profile", "--model", model, "--num-prompts", "1", "--steps", "2", "--height", str(fam.height),
            "--width", str(fam.width), "--block-size", "16", "--query-rows", "32", "--patterns", "tile,radial",
            "--max-sequence-length", "16", "--dense-fraction", "0", "--buckets", "1",
            "--target-density", str(TARGET), "--device", "cpu", "--out", str(out)]
    if fam.frames:
        args += ["--frames", str(fam.frames)]
    if family == "wan-i2v":
        args += ["--images", str(_first_image(tmp_path, fam.height, fam.width))]
    return args


def _generate(pipe, family: str, tmp_path: Path) -> None:
    from PIL import Image

    fam = FAMILIES[family]
    kwargs = dict(prompt="a red fox running through snow", height=fam.height, width=fam.width, num_inference_steps=2,
                  output_type="latent", max_sequence_length=16, generator=torch.Generator("cpu").manual_seed(1))
    if fam.frames:
        kwargs["num_frames"] = fam.frames
    if family == "wan-i2v":
        kwargs["image"] = Image.open(_first_image(tmp_path, fam.height, fam.width)).convert("RGB")
    with torch.no_grad():
        pipe(**kwargs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cli_profiles_every_family(family, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    if family in NEEDS:
        pytest.importorskip(NEEDS[family])
    model = save_tiny_pipeline(family, tmp_path / "model")
    out = tmp_path / "profile.json"
    assert cli.main(_profile_args(family, model, out, tmp_path)) == 0
    printed = capsys.readouterr().out

    pipe = DiffusionPipeline.from_pretrained(model)
    names = [n for n in ("transformer", "transformer_2") if getattr(pipe, n, None) is not None]
    paths = {names[0]: out} if len(names) == 1 else {n: tmp_path / f"profile.{n}.json" for n in names}
    assert all(p.is_file() for p in paths.values()), printed
    assert not (tmp_path / "profile.json.partial.pt").exists(), "the partial calibration is removed on success"
    profiles = {n: Profile.load(p) for n, p in paths.items()}
    for name, profile in profiles.items():
        transformer = getattr(pipe, name)
        assert profile.header["model_class"] == type(transformer).__name__
        assert profile.header["model_id"] == model and profile.grid is not None
        assert profile.header["cost"]["measured"] is False and "FLOP estimate" in profile.header["cost"]["source"]
        assert profile.header["cost"]["sparse_steps"] > 1.0
        assert 0 < profile.density() < 1
    if len(names) > 1:
        assert "transformer_2" in printed and "sparse_dit.patch(pipe, profile=" in printed

    sparse_dit.patch(pipe, profile=profiles if len(names) > 1 else profiles["transformer"])
    _generate(pipe, family, tmp_path)
    calls = {n: sparse_dit.patch_state(getattr(pipe, n)).stats for n in names}
    assert sum(c["sparse_calls"] for c in calls.values()) > 0, calls
    assert all(c["mean_density"] < 1 for c in calls.values() if c["sparse_calls"]), calls


def test_cli_refuses_bad_models_before_loading(tmp_path, capsys):
    not_a_pipeline = tmp_path / "empty"
    not_a_pipeline.mkdir()
    base = ["profile", "--target-density", "0.3", "--device", "cpu", "--out", str(tmp_path / "p.json")]
    assert cli.main(base + ["--model", str(not_a_pipeline)]) == 2
    assert re.search(r"is not a diffusers pipeline folder \(no model_index.json\)", capsys.readouterr().err)
    assert cli.main(base + ["--model", str(tmp_path / "missing" / "model")]) == 2
    assert re.search("no pipeline folder", capsys.readouterr().err)
    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    (unsupported / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0", "unet": ["diffusers", "UNet2DConditionModel"]}))
    assert cli.main(base + ["--model", str(unsupported)]) == 2
    assert re.search("has no transformer sparse-dit can profile .*UNet2DConditionModel", capsys.readouterr().err)
    i2v = tmp_path / "i2v"
    i2v.mkdir()
    (i2v / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanImageToVideoPipeline", "_diffusers_version": "0.35.0", "transformer": ["diffusers", "WanTransformer3DModel"]}))
    assert cli.main(base + ["--model", str(i2v)]) == 2  # no weights in that folder: it must fail before loading
    assert re.search("image-to-video: give calibration images with --images", capsys.readouterr().err)


def test_profile_pipeline_resumes_after_an_interruption(tmp_path):
    """Run 1 of 2 finishes, run 2 crashes; resuming runs only run 2 and gives the uninterrupted result."""
    from diffusers import DiffusionPipeline

    from sparse_dit.calibrate import profile_pipeline

    fam = FAMILIES["wan"]
    pipe = DiffusionPipeline.from_pretrained(save_tiny_pipeline("wan", tmp_path / "model"))
    settings = dict(target_density=0.5, height=fam.height, width=fam.width, num_frames=fam.frames, num_inference_steps=2,
                    max_sequence_length=16, block_size=16, query_rows=32, patterns=("tile", "radial"), num_buckets=1,
                    dense_fraction=0.0)
    prompts = ["a red fox", "a blue bird"]
    whole = profile_pipeline(pipe, prompts, **settings)["transformer"]

    partial = tmp_path / "p.json.partial.pt"
    ticks = []

    def stop_in_second_prompt() -> None:
        ticks.append(1)
        if len(ticks) == 3:  # the first step of the second prompt: the user stops the calibration
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile_pipeline(pipe, prompts, partial_path=partial, on_step=stop_in_second_prompt, **settings)
    assert partial.is_file() and not sparse_dit.is_patched(pipe.transformer)

    steps = []
    resumed = profile_pipeline(pipe, prompts, partial_path=partial, resume=True, on_step=lambda: steps.append(1), **settings)
    assert len(steps) == 2, "only the unfinished prompt ran again (2 steps)"
    resumed = resumed["transformer"]
    assert [[[c.spec for c in layer] for layer in b] for b in resumed.plan] == [[[c.spec for c in layer] for layer in b] for b in whole.plan]
    assert resumed.summary["mean_error"] == pytest.approx(whole.summary["mean_error"], rel=1e-6)
    assert not partial.exists()

    other = tmp_path / "other.partial.pt"
    torch.save({"fingerprint": {"something": "else"}, "done": 1, "stats": {}}, other)
    with pytest.raises(ValueError, match="partial calibration made with other settings"):
        profile_pipeline(pipe, prompts, partial_path=other, resume=True, **settings)


def test_cli_extend_adds_a_calibration_grid_and_refuses_an_unfit_profile(tmp_path, capsys):
    """--extend: the new file holds the old grid and the new one; a profile of another model is refused before
    calibrating (no partial statistics written)."""
    fam = FAMILIES["wan"]
    model = save_tiny_pipeline("wan", tmp_path / "model")
    first, both = tmp_path / "first.json", tmp_path / "both.json"
    assert cli.main(_profile_args("wan", model, first, tmp_path)) == 0
    args = _profile_args("wan", model, both, tmp_path)
    args[args.index("--height") + 1] = str(fam.height * 2)
    assert cli.main(args + ["--extend", str(first)]) == 0
    merged = Profile.load(both)
    grid = Profile.load(first).grid
    assert merged.calibration_grids() == [grid, (grid[0], grid[1] * 2, grid[2])]
    assert "grids [" in capsys.readouterr().out

    unfit = Profile.load(first)
    unfit.header["heads"] = 3
    unfit.plan = [[[layer[0]] * 3 for layer in bucket] for bucket in unfit.plan]
    unfit_path = unfit.save(tmp_path / "unfit.json")
    assert cli.main(_profile_args("wan", model, tmp_path / "never.json", tmp_path) + ["--extend", str(unfit_path)]) == 2
    assert re.search(r"heads: profile 3, model 2", capsys.readouterr().err)
    assert not (tmp_path / "never.json.partial.pt").exists() and not (tmp_path / "never.json").exists()
