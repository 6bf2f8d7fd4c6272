"""Nothing is lost on write: every writer of the commands (video, profile, plot, eval report) is interrupted or
fails half-way here, and the previous file must survive whole, with no temporary file left behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparse_dit.io import atomic_path, check_output_path, write_text_atomic

OLD = b"the previous file, complete"


def _old_file(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(OLD)
    return path


def _assert_untouched(path: Path) -> None:
    assert path.read_bytes() == OLD
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == [], "temporary file left behind"


def test_atomic_path_keeps_the_old_file_on_error_and_on_ctrl_c(tmp_path):
    path = _old_file(tmp_path, "out.bin")
    for interruption in (RuntimeError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(interruption)):
            with atomic_path(path) as tmp:
                tmp.write_bytes(b"half")
                raise interruption
        _assert_untouched(path)


def test_atomic_path_refuses_an_empty_result(tmp_path):
    path = _old_file(tmp_path, "clip.mp4")
    with pytest.raises(OSError, match="0 bytes"):
        with atomic_path(path):
            pass  # the writer produced nothing
    _assert_untouched(path)


def test_atomic_path_replaces_on_success_with_usual_permissions(tmp_path):
    path = _old_file(tmp_path, "out.txt")
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert path.stat().st_mode & 0o044  # readable by others like any file the user writes (mkstemp makes 0600)


def test_check_output_path(tmp_path):
    existing = _old_file(tmp_path, "p.json")
    with pytest.raises(FileExistsError, match="--force"):
        check_output_path(existing, force=False)
    assert check_output_path(existing, force=True) == existing
    assert check_output_path(existing) == existing  # force=None: replacing is allowed, the caller says so
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "p.json")
    with pytest.raises(IsADirectoryError):
        check_output_path(tmp_path)


class _FailingWriter:
    """Stands in for imageio's ffmpeg writer: writes some bytes to its file, then fails at the second frame."""

    def __init__(self, path: str, exc: BaseException) -> None:
        self.path, self.exc, self.frames = path, exc, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def append_data(self, frame) -> None:
        self.frames += 1
        with open(self.path, "ab") as f:
            f.write(b"\x00" * 100)
        if self.frames == 2:
            raise self.exc


@pytest.mark.parametrize("exc", [RuntimeError("ffmpeg died"), KeyboardInterrupt()])
def test_demo_video_writer_interrupted(tmp_path, monkeypatch, exc):
    import imageio.v2 as imageio

    from sparse_dit.commands.demo import write_video

    path = _old_file(tmp_path, "sparse_dit_demo.mp4")
    monkeypatch.setattr(imageio, "get_writer", lambda p, **kw: _FailingWriter(p, exc))
    with pytest.raises(type(exc)):
        write_video(path, np.zeros((4, 16, 16, 3), np.uint8))
    _assert_untouched(path)


def test_demo_video_written_is_playable(tmp_path):
    import imageio.v2 as imageio

    from sparse_dit.commands.demo import write_video

    path = _old_file(tmp_path, "clip.mp4")
    write_video(path, np.full((5, 20, 36, 3), 128, np.uint8), fps=4)
    frames = imageio.mimread(str(path))
    assert len(frames) == 5 and frames[0].shape == (32, 48, 3)  # padded to multiples of 16


def _small_profile():
    from sparse_dit.patterns import PatternSpec
    from sparse_dit.profile import Profile

    return Profile.constant([PatternSpec("radial"), PatternSpec("dense")], 2, model_class="WanTransformer3DModel")


def test_profile_writer_interrupted(tmp_path, monkeypatch):
    from sparse_dit.commands.profile import write_profile
    from sparse_dit.profile import Profile

    path = _old_file(tmp_path, "ref.json")
    real_save = Profile.save

    def save_then_fail(self, target):
        real_save(self, target)
        Path(target).write_text('{"format": "sparse-dit-profile", "vers')  # truncated mid-write
        raise KeyboardInterrupt

    monkeypatch.setattr(Profile, "save", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write_profile(_small_profile(), path)
    _assert_untouched(path)
    monkeypatch.setattr(Profile, "save", real_save)
    assert write_profile(_small_profile(), path) is True  # replaced an existing file
    assert json.loads(path.read_text())["format"] == "sparse-dit-profile"


def test_inspect_plot_writer_interrupted(tmp_path, monkeypatch):
    from sparse_dit.commands import inspect as inspect_command

    path = _old_file(tmp_path, "map.png")

    def plot_then_fail(profile, target):
        Path(target).write_bytes(b"\x89PNG half")
        raise RuntimeError("matplotlib failed")

    monkeypatch.setattr(inspect_command, "plot_map", plot_then_fail)
    with pytest.raises(RuntimeError):
        inspect_command.write_plot(_small_profile(), path)
    _assert_untouched(path)


def test_eval_report_writer_interrupted(tmp_path, monkeypatch):
    from sparse_dit import fidelity

    json_path, md_path = _old_file(tmp_path, "fidelity.json"), _old_file(tmp_path, "fidelity.md")

    def fail(report):
        raise KeyboardInterrupt

    monkeypatch.setattr(fidelity, "to_markdown", fail)
    report = {"settings": {}, "clips": [], "summary": {}}
    with pytest.raises(KeyboardInterrupt):
        fidelity.write_report(report, tmp_path)
    _assert_untouched(md_path)
    assert json.loads(json_path.read_text()) == report  # written whole before the interruption
