"""End-to-end smoke tests of the example scripts in examples/ on tiny pipelines saved locally.

Each family's tiny pipeline (tests/tiny_pipelines.py: small random text encoders, tokenizers, VAE and
transformer) is written with ``save_pretrained`` and the example script runs on it as a subprocess,
offline, on the CPU: dense and sparse generation, outputs written and read back, PSNR/SSIM printed.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tiny_pipelines import FAMILIES, save_tiny_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# tile with a small window (a JSON --pattern), so that even the tiny grids are really sparse
SMALL_TILE = json.dumps({"name": "tile", "window": [1, 2, 2]})
NEEDS = {"wan-i2v": "ftfy"}  # Wan's I2V pipeline cleans prompts with ftfy


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return float(match.group(1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_example_script_end_to_end(family, tmp_path):
    import imageio.v2 as imageio
    import numpy as np

    if family in NEEDS:
        pytest.importorskip(NEEDS[family])
    fam = FAMILIES[family]
    model = save_tiny_pipeline(family, tmp_path / "model")
    out = tmp_path / ("out.mp4" if fam.frames else "out.png")
    cmd = [sys.executable, str(EXAMPLES / fam.script), "--model", model, "--prompt", "a red fox running through snow",
           "--height", str(fam.height), "--width", str(fam.width), "--steps", "2", "--max-sequence-length", "16",
           "--pattern", SMALL_TILE, "--block-size", "16", "--output", str(out),
           "--compare-dense", "--device", "cpu"]
    if fam.frames:
        cmd += ["--frames", str(fam.frames)]
    if family == "wan-i2v":
        image = tmp_path / "first.png"
        imageio.imwrite(image, np.random.default_rng(0).integers(0, 256, (fam.height, fam.width, 3), dtype=np.uint8))
        cmd += ["--image", str(image)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    psnr = _number(r"^\[sparse-dit\] PSNR: (\S+) dB", proc.stdout)
    ssim = _number(r"^\[sparse-dit\] SSIM: (\S+)", proc.stdout)
    density = _number(r"^\[sparse-dit\] attention density \(transformer\): (\S+)", proc.stdout)
    _number(r"^\[sparse-dit\] speed-up: (\S+)x", proc.stdout)
    assert psnr > 10 and -1.0 <= ssim <= 1.0, (psnr, ssim)
    assert 0.0 < density < 1.0, density  # the sparse path really ran
    if family == "wan2.2":  # both experts patched
        assert "attention density (transformer_2)" in proc.stdout

    side = out.with_name(f"{out.stem}_side_by_side{out.suffix}")
    dense = out.with_name(f"{out.stem}_dense{out.suffix}")
    for path in (out, dense, side):
        assert path.is_file(), f"{path.name} missing; wrote {sorted(p.name for p in tmp_path.iterdir())}"
    if fam.frames:
        frames = imageio.mimread(out)
        assert len(frames) == fam.frames
        assert frames[0].shape == (fam.height, fam.width, 3)
        assert imageio.mimread(side)[0].shape[1] > 2 * fam.width
    else:
        assert imageio.imread(out).shape == (fam.height, fam.width, 3)
        assert imageio.imread(side).shape[1] > 2 * fam.width


SCRIPTS = sorted(p.name for p in EXAMPLES.glob("generate_*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_help(script, capsys, monkeypatch):
    """Every script explains itself: its docstring (with an example command) and all options."""
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "python examples/" + script in text  # the example command from the docstring
    for option in ("--model", "--prompt", "--pattern", "--profile", "--dense-steps", "--block-size", "--compare-dense",
                   "--output", "--device", "--dtype", "--cpu-offload"):
        assert option in text, f"{script} --help lacks {option}"


def test_every_family_script_is_smoke_tested():
    assert {FAMILIES[f].script for f in FAMILIES} == set(SCRIPTS)


def test_pattern_and_profile_arguments():
    sys.path.insert(0, str(EXAMPLES))
    from _common import _pattern_arg, _profile_arg

    assert _pattern_arg("tile") == "tile"
    assert _pattern_arg('{"name": "tile", "window": [3, 3, 3]}') == {"name": "tile", "window": [3, 3, 3]}
    assert _profile_arg("wan.json") == "wan.json"
    assert _profile_arg("transformer=a.json,transformer_2=b.json") == {"transformer": "a.json", "transformer_2": "b.json"}
