"""CPU smoke runs of the GPU benchmark scripts on tiny models, so a broken script is caught before a GPU run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, out: Path) -> str:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=out)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_e2e_script_runs_every_case_on_tiny_wan_and_hunyuan(tmp_path):
    text = run("e2e.py", "--models", "tiny,tiny-hunyuan", "--patterns", "tile,prune,kmeans", "--densities", "0.3",
               "--replan", "1,2", "--reps", "1", out=tmp_path)
    assert "FAILED" not in text
    results = json.loads((tmp_path / "e2e.json").read_text())
    assert [r["model"] for r in results] == ["tiny", "tiny-hunyuan"]
    for r in results:
        cases = [row["case"] for row in r["runs"]]
        assert cases == ["tile@0.3", "prune@0.3", "prune@0.3/r2", "kmeans@0.3", "kmeans@0.3/r2"]
        assert all(0 < row["density"] <= 1 and row["step_s"] > 0 for row in r["runs"])


def test_profile_step_and_replan_fidelity_scripts(tmp_path):
    text = run("profile_step.py", "--model", "tiny", "--case", "prune@0.3", "--replan", "2", "--top", "3", out=tmp_path)
    assert "replan_every=2" in text and (tmp_path / "profile_prune_0.3_r2.txt").exists()
    run("replan_fidelity.py", "--replan", "1,2", "--steps", "3", "--clips", "1", "--frames", "4", "--size", "16",
        "--block-size", "16", "--methods", "prune keep 0.25", out=tmp_path)
    rows = json.loads((tmp_path / "replan_fidelity.json").read_text())
    assert [r["replan_every"] for r in rows] == [1, 2] and all(r["density"] == 0.25 for r in rows)


def test_plot_kernel_draws_a_kernel_py_json_and_refuses_one_without_timings(tmp_path):
    rows = [dict(shape="wan480p", kind=kind, density=d, tflops=450 + 50 * d, gluon_tflops=600 + 20 * d,
                 fa4_tflops=float("nan") if kind == "window" else 610.0)
            for kind in ("random", "window") for d in (0.1, 0.3, 0.5)]
    data = dict(device="NVIDIA H200", torch="2.11", triton="3.6", cudnn={"wan480p": {"tflops": 575.0}},
                fa4_dense={"wan480p": {"tflops": 687.0}}, bench=rows)
    (tmp_path / "k.json").write_text(json.dumps(data))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "plot_kernel.py"), str(tmp_path / "k.json"),
                           "--target", "600", "--out", str(tmp_path / "k.png")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "k.png").stat().st_size > 10_000
    (tmp_path / "empty.json").write_text(json.dumps(dict(bench=[])))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "plot_kernel.py"), str(tmp_path / "empty.json"),
                           "--out", str(tmp_path / "e.png")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no bench rows" in done.stderr and not (tmp_path / "e.png").exists()
