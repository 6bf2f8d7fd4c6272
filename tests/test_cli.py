"""The `sparse-dit` command line as a new user meets it: mistakes answered in one line with exit code 2 and no
model built, options spelt one way, profiles looked up safely, settings that say what ran. All fast: no test
here generates a clip, except the resume test, which calibrates a tiny clip."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparse_dit
from sparse_dit.cli import build_parser, main
from sparse_dit.commands import _common
from sparse_dit.commands._common import UsageError

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = not torch.cuda.is_available()


def run_cli(argv: list[str]) -> int:
    """main(argv), with argparse's SystemExit turned into its exit code."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


@pytest.fixture
def no_model(monkeypatch):
    """Any torch module built (a transformer, a pipeline) fails the test: bad arguments must be refused first."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"a model ({type(self).__name__}) was built before the arguments were checked")

    monkeypatch.setattr(torch.nn.Module, "__init__", refuse)


def _existing(tmp_path: Path) -> str:
    path = tmp_path / "existing.json"
    path.write_text("{}")
    return str(path)


# (subcommand args) that must be refused with exit code 2 before any model is built
BAD_ARGUMENTS = {
    "demo": [
        ["--steps", "0"], ["--dense-steps", "-1"], ["--block-size", "0"], ["--frames", "0"], ["--size", "0"],
        ["--size", "30"], ["--scale", "0"], ["--fps", "0"], ["--guidance", "0"], ["--steps", "4", "--dense-steps", "4"],
        ["--out", "no/such/folder/x.mp4"], ["--out", "x.gif"], ["--pattern", "tile", "--profile", "reference"],
        ["--profile", "../../x"], ["--pattern", "nosuch"], ["--pattern", '{"name": "tile", "windw": 3}'],
        ["--pattern", '{"name": '], ["--pattern", "radial", "--window", "3"], ["--window", "1", "2"],
        ["--profile", "reference", "--size", "32"], ["--size", "32", "--height", "32"], ["--pattren", "tile"],
    ]
    + ([["--backend", "triton"], ["--backend", "gluon"], ["--backend", "fa4"], ["--device", "cuda"]] if NO_GPU else [])
    + [["--backend", "flash"]],
    "eval": [
        ["--pattern", "tile", "--profile", "reference"], ["--profile", "reference", "--window", "3"],
        ["--profile", "README.md"], ["--profile", "pyproject.toml"], ["--frames", "0"], ["--replan-every", "0"],
        ["--seeds", "-1"], ["--block-size", "8"], ["--device", "tpu"], ["--out", "README.md"],
    ],
    "check": [["--block-size", "0"], ["--layers", "0"], ["--window", "-1"], ["--frames", "0"]],
    "density": [
        ["--pattern", "tile", "--frames", "0", "--height", "4", "--width", "4"],
        ["--pattern", "tile", "--frames", "4", "--height", "4", "--width", "4", "--block-size", "8"],
        ["--pattern", "tile", "--frames", "4", "--height", "4", "--width", "4", "--param", "windw=3"],
        ["--pattern", "kmeans", "--frames", "4", "--height", "4", "--width", "4"],
    ],
    "profile": [
        ["--model", "reference", "--target-density", "2", "--out", "p.json"],
        ["--model", "reference", "--target-density", "0", "--out", "p.json"],
        ["--model", "reference", "--max-error", "-1", "--out", "p.json"],
        ["--model", "reference", "--target-density", "0.2", "--out", "no/such/folder/p.json"],
        ["--model", "reference", "--target-density", "0.2", "--out", "p.json", "--resume"],
        ["--model", "reference", "--target-density", "0.2", "--out", "p.json", "--buckets", "0"],
        ["--model", "reference", "--target-density", "0.2", "--out", "p.json", "--dense-fraction", "1"],
        ["--model", "reference", "--target-density", "0.2", "--out", "p.json", "--steps", "2", "--buckets", "3"],
        ["--model", "reference", "--target-density", "0.2", "--out", "p.json", "--prompts", "missing.txt"],
        ["--model", "reference", "--target-density", "0.2", "--out", "p.json", "--dense-layers", "8"],
        ["--model", "./no/such/checkpoint", "--target-density", "0.2", "--out", "p.json", "--prompts", "README.md"],
        ["--model", "reference", "--target-density", "0.2", "--out", "EXISTING"],
        ["--model", "reference", "--target-density", "0.2", "--max-error", "0.1", "--out", "p.json"],
    ],
    "inspect": [["nope"], ["../../x"], ["README.md"], ["reference", "--plot", "map.jpg"],
                ["reference", "--plot", "no/such/folder/map.png"]],
}
CASES = [(command, args) for command, cases in BAD_ARGUMENTS.items() for args in cases]


@pytest.mark.parametrize("command,args", CASES, ids=[f"{c}:{' '.join(a)}" for c, a in CASES])
def test_bad_arguments_one_line_exit_2_no_model(command, args, tmp_path, monkeypatch, capsys, no_model):
    for name in ("README.md", "pyproject.toml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    monkeypatch.chdir(tmp_path)
    args = [_existing(tmp_path) if a == "EXISTING" else a for a in args]
    code = run_cli([command, *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert 1 <= len(lines) <= 3, err
    assert "Traceback" not in err
    assert "error:" in lines[-1]


def test_console_script_answers_one_line(tmp_path):
    """The installed entry point, as a user runs it: exit 2, one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "sparse_dit.cli", "demo", "--steps", "0"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["sparse-dit demo: error: --steps must be at least 1; got 0"]


def test_debug_flag_and_environment_show_the_traceback(monkeypatch, no_model):
    with pytest.raises(UsageError):
        main(["--debug", "demo", "--steps", "0"])
    with pytest.raises(UsageError):
        main(["demo", "--debug", "--steps", "0"])
    monkeypatch.setenv("SPARSE_DIT_DEBUG", "1")
    with pytest.raises(UsageError):
        main(["demo", "--steps", "0"])


# ------------------------------------------------------------------------------ names and words (item 9)
def _options(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}


def test_one_spelling_for_the_block_size():
    options = _options(build_parser())
    for command, opts in options.items():
        assert "--block" not in opts, command
    for command in ("check", "density", "demo", "eval", "profile"):
        assert "--block-size" in options[command], command


def test_local_pattern_from_python():
    from sparse_dit.fidelity import local_block_mask
    from sparse_dit.geometry import Geometry
    from sparse_dit.layout import Layout
    from sparse_dit.patterns import PatternSpec

    spec = PatternSpec("local", radius=(0, 1, 1))
    geometry = Geometry(1, 2, 16, 3, 6, 10)
    layout = spec.module.build(geometry, 2, 16, "cpu", **spec.params)
    S = geometry.seq_len
    expected = Layout.from_block_mask(local_block_mask(geometry.grid, 16, (0, 1, 1)).expand(1, 2, -1, -1), 16, seq_len=S)
    assert torch.equal(layout.to_dense_mask(S), expected.to_dense_mask(S))
    assert 0 < layout.density < 1


def test_local_pattern_patches_a_model():
    from conftest import make_wan_transformer, wan_inputs

    model = make_wan_transformer()
    x, t, text = wan_inputs()
    with torch.no_grad():
        sparse_dit.patch(model, pattern="local", block_size=16)
        out = model(x, t, text).sample
        assert sparse_dit.patch_state(model).stats["sparse_calls"] > 0
        sparse_dit.unpatch(model)
    assert torch.isfinite(out).all()


def test_pattern_parameter_typo_lists_the_valid_parameters():
    from sparse_dit.patterns import PatternSpec

    with pytest.raises(ValueError, match=r"no parameter 'windw'; it takes: window, tile"):
        PatternSpec("tile", windw=3)
    with pytest.raises(ValueError, match=r"keep_ratio"):
        PatternSpec.coerce({"name": "prune", "keep": 0.3})


def test_readme_documents_every_pattern_parameter_and_label():
    from sparse_dit.commands.inspect import short_label
    from sparse_dit.patterns import PatternSpec, names, parameter_names

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Patterns and their parameters"):readme.index("## Profiles")]
    for name in names():
        assert f"| `{name}` |" in table, name
        for param in parameter_names(name):
            if param != "record":  # kmeans' debugging switch, not a user parameter
                assert f"`{param}`" in table, (name, param)
    for spec in (PatternSpec("tile", window=(3, 3, 5)), PatternSpec("radial", decay=0.5),
                 PatternSpec("kmeans", top_p=0.9), PatternSpec("prune", keep_ratio=0.3), PatternSpec("local")):
        assert f"`{short_label(spec)}`" in table, short_label(spec)


def test_demo_warns_about_unknown_words_and_lists_the_vocabulary(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert run_cli(["demo", "--list-words"]) == 0
    words = capsys.readouterr().out.split()
    assert {"red", "circle", "bouncing", "camera"} <= set(words)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr("sparse_dit.reference.load_reference_model", stop)
    with pytest.raises(Stop):
        main(["demo", "--prompt", "a purple dog bouncing; camera still"])
    err = capsys.readouterr().err
    assert "'purple', 'dog'" in err and "--list-words" in err


# ------------------------------------------------------------------------- commands measure what they say (5)
def _eval_args(*argv: str) -> argparse.Namespace:
    parser = build_parser()
    return parser.parse_args(["eval", *argv])


def test_eval_profile_runs_at_the_profile_block_size(tmp_path, monkeypatch):
    from sparse_dit.commands.eval import resolve_sparse_method
    from sparse_dit.patterns import PatternSpec
    from sparse_dit.profile import Profile

    path = tmp_path / "radial128.json"
    Profile.constant([PatternSpec("radial")] * 4, 8, model_class="WanTransformer3DModel", block_size=128).save(path)
    method = resolve_sparse_method(_eval_args("--profile", str(path)), (16, 16, 16), 2)
    assert method["block_size"] == 128 and "block 128, the profile's" in method["label"]
    method = resolve_sparse_method(_eval_args("--profile", str(path), "--block-size", "64"), (16, 16, 16), 2)
    assert method["block_size"] == 64 and "--block-size" in method["label"]
    assert resolve_sparse_method(_eval_args("--pattern", "radial"), (16, 16, 16), 2)["block_size"] == 32


def test_backend_named_is_the_backend_that_runs():
    cpu = torch.device("cpu")
    assert _common.check_backend("auto", cpu) == "PyTorch reference backend"
    assert _common.check_backend("reference", cpu) == "PyTorch reference backend"
    for gpu_backend in ("triton", "gluon", "fa4"):
        with pytest.raises(UsageError, match=f"--backend {gpu_backend} needs a CUDA GPU"):
            _common.check_backend(gpu_backend, cpu)


def test_fidelity_mean_row_does_not_sum_times():
    from sparse_dit.fidelity import to_markdown

    clips = [{"seed": s, "prompt": "p", "psnr": 30.0, "ssim": 0.9, "density": 0.3, "dense_s": d, "sparse_s": d / 2}
             for s, d in ((0, 1.0), (1, 3.0))]
    settings = {"pattern": "tile", "profile": None, "model": "M", "device": "cpu", "dtype": "float32", "backend": "auto",
                "block_size": 32, "frames": 4, "height": 8, "width": 8, "steps": 2, "guidance_scale": 4.0,
                "dense_steps": 0, "sparse_dit_version": "0"}
    summary = {"clips": 2, "psnr": 30.0, "ssim": 0.9, "density": 0.3, "dense_s": 4.0, "sparse_s": 2.0}
    md = to_markdown({"settings": settings, "clips": clips, "summary": summary})
    mean_row = next(line for line in md.splitlines() if line.startswith("| **mean**"))
    assert mean_row.endswith("| 2.0 | 1.0 |"), mean_row
    assert "Total wall time: dense 4.0 s, sparse 2.0 s" in md


def test_demo_reading_is_one_line():
    from sparse_dit.commands.demo import reading

    assert reading(31.2, 0.95) == "PSNR 31.2 dB, SSIM 0.950: small differences, visible when you compare closely"
    assert "hard to see" in reading(35.0, 0.98)
    assert reading(float("inf"), 1.0).startswith("identical")


# ------------------------------------------------------------------------------------ profile names (10)
def test_shipped_name_never_resolves_outside_the_shipped_folder(tmp_path, monkeypatch):
    shipped = tmp_path / "pkg" / "sub" / "profiles"
    shipped.mkdir(parents=True)
    (shipped / "reference.json").write_text((ROOT / "sparse_dit" / "profiles" / "reference.json").read_text())
    (tmp_path / "pkg" / "x.json").write_text((ROOT / "sparse_dit" / "profiles" / "reference.json").read_text())  # shipped/../../x.json
    import sparse_dit.profile as profile_module

    monkeypatch.setattr(profile_module, "_shipped_dir", lambda: shipped)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(UsageError, match="no profile file '../../x'"):
        _common.resolve_profile_path("../../x")
    assert _common.resolve_profile_path("reference") == (shipped / "reference.json").resolve()


def test_local_file_does_not_shadow_a_shipped_profile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reference").write_text("{}")
    with pytest.raises(UsageError, match="both a shipped profile and a file here; write ./reference"):
        _common.resolve_profile_path("reference")
    assert _common.resolve_profile_path("./reference") == Path("./reference")


def test_python_api_resolves_profile_names_as_the_cli_does(tmp_path, monkeypatch):
    from sparse_dit.profile import Profile

    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.json").write_text((ROOT / "sparse_dit" / "profiles" / "reference.json").read_text())
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    with pytest.raises(FileNotFoundError, match="no profile file '../../x'"):
        Profile.coerce("../../x")  # a path without .json is a path, not a shipped name
    assert Profile.coerce("../../x.json").layers == Profile.coerce("reference").layers
    (sub / "reference").write_text("{}")
    with pytest.raises(ValueError, match="both a shipped profile and a file here"):
        Profile.coerce("reference")


@pytest.mark.parametrize("content", ['{"format": "TOPSECRET-1234"}', "TOPSECRET-1234 {", '["TOPSECRET-1234"]',
                                     '{"format": "sparse-dit-profile", "version": 1, "TOPSECRET-1234": 1}'])
def test_profile_errors_do_not_echo_file_contents(tmp_path, content):
    path = tmp_path / "not_a_profile.json"
    path.write_text(content)
    with pytest.raises(UsageError) as err:
        _common.load_profile_arg(str(path))
    assert "TOPSECRET" not in str(err.value) and str(path) in str(err.value)


# ----------------------------------------------------------------------------- resume and progress (8)
def _tiny_profile_args(out: Path) -> list[str]:
    return ["profile", "--model", "reference", "--frames", "2", "--height", "16", "--width", "16", "--steps", "2",
            "--num-prompts", "2", "--query-rows", "16", "--block-size", "16", "--buckets", "1", "--dense-fraction", "0",
            "--target-density", "0.5", "--device", "cpu", "--out", str(out)]


def test_step_progress_counts_forward_calls():
    module = torch.nn.Linear(2, 2)
    with _common.step_progress(module, 3, "test") as bar:
        for _ in range(3):
            module(torch.zeros(1, 2))
        assert bar.n == 3
    module(torch.zeros(1, 2))  # the hook is gone
    assert not module._forward_hooks


# ------------------------------------------------------------------------------ install and CI (1, 2)
def _declared_distributions() -> set[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = list(project["dependencies"]) + [r for extra in ("test", "models") for r in extras[extra]]
    names = set()
    for requirement in declared:
        name = requirement.split(";")[0]
        for stop in "<>=![ ":
            name = name.split(stop)[0]
        names.add(name.strip().lower().replace("_", "-"))
    return names


# import name -> distribution, where they differ (PIL comes with imageio, which depends on pillow)
DISTRIBUTION = {"sklearn": "scikit-learn", "skimage": "scikit-image", "PIL": "imageio", "imageio_ffmpeg": "imageio-ffmpeg"}
LOCAL_MODULES = {"sparse_dit", "conftest", "model_builders", "tiny_pipelines", "_common", "_setup"}
# imported only where present, the tests that need them skip without them: flash_attn (the `fa4` extra, GPU only)
OPTIONAL = {"triton", "flash_attn"}


def test_every_package_tests_and_examples_import_is_declared():
    import ast

    declared = _declared_distributions()
    missing = {}
    for folder in ("tests", "examples"):
        for path in (ROOT / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if (ROOT / folder / f"{top}.py").exists():  # the suite's own helper modules
                        continue
                    if top in sys.stdlib_module_names or top in LOCAL_MODULES or top in OPTIONAL or top == "__future__":
                        continue
                    if DISTRIBUTION.get(top, top).lower().replace("_", "-") not in declared:
                        missing.setdefault(top, set()).add(f"{folder}/{path.name}")
    assert not missing, f"imported but declared in no extra: {missing}"


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    block = readme[readme.index("<!-- ci: test command -->"):].split("```")[1]
    assert 'pip install -e ".[test]"' in block and "python -m pytest" in block
    assert "--index-url https://download.pytorch.org/whl/cpu" in block  # the CPU build of torch, stated
    extracted = subprocess.run(["bash", "-c", ci.split("if [ -z")[0].split("cd \"$(dirname")[0] + 'cd "' + str(ROOT)
                                + '"\n' + ci[ci.index("commands="):ci.index("if [ -z")] + 'printf "%s" "$commands"'],
                               capture_output=True, text=True, check=True).stdout
    assert extracted.strip() == block.removeprefix("bash\n").strip()
    assert "mktemp -d" in ci and "python3 -m venv" in ci and "pip install" not in ci.split("commands=")[0]
    assert "triton" not in (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[0]


def test_demo_accepts_the_480p_grid_and_the_shipped_profile_at_default_sizes(no_model):
    """`demo --frames 21 --height 120 --width 208` (the Wan 480p latent grid, 32,760 tokens) passes every check,
    and the shipped profile fits the default sizes of demo and eval (checked, not run: no model is built)."""
    from sparse_dit.commands.eval import latent_grid, resolve_clip_size, resolve_sparse_method

    args = build_parser().parse_args(["demo", "--frames", "21", "--height", "120", "--width", "208"])
    grid = latent_grid(*resolve_clip_size(args))
    assert grid == (21, 30, 52)
    assert resolve_sparse_method(args, grid, 2)["pattern"].name == "tile"
    for command in ("demo", "eval"):
        args = build_parser().parse_args([command, "--profile", "reference"])
        method = resolve_sparse_method(args, latent_grid(*resolve_clip_size(args)), 2)
        assert method["profile"] is not None and method["block_size"] == 32


@pytest.mark.parametrize("command", ["check", "density", "eval", "demo", "profile", "inspect"])
def test_help_of_every_subcommand(command, capsys):
    assert run_cli([command, "--help"]) == 0
    assert "--debug" in capsys.readouterr().out
