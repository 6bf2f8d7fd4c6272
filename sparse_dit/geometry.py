"""What one self-attention call looks like: batch, heads, sequence, video grid and text placement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TextPosition = Literal["none", "first", "last"]


@dataclass(frozen=True)
class Geometry:
    """Shape of one attention call as the patterns see it.

    The sequence is ``text_len`` text tokens placed ``text_position`` ("first" or "last") around
    ``frames * height * width`` video tokens in raster order (frame-major, then row, then column),
    the order diffusers' patch embeddings produce. Images are ``frames == 1``.
    """

    batch: int
    heads: int
    head_dim: int
    frames: int
    height: int
    width: int
    text_len: int = 0
    text_position: TextPosition = "none"

    def __post_init__(self) -> None:
        for name in ("batch", "heads", "head_dim", "frames", "height", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"Geometry.{name} must be >= 1, got {getattr(self, name)}")
        if self.text_position not in ("none", "first", "last"):
            raise ValueError(f"Geometry.text_position must be 'none', 'first' or 'last', got {self.text_position!r}")
        if (self.text_len > 0) != (self.text_position != "none"):
            raise ValueError(
                f"text_len={self.text_len} and text_position={self.text_position!r} disagree: "
                "use text_position='none' exactly when there are no text tokens"
            )

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def video_len(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        return self.video_len + self.text_len

    @property
    def video_start(self) -> int:
        """Index of the first video token in the attention sequence."""
        return self.text_len if self.text_position == "first" else 0

    @property
    def text_range(self) -> tuple[int, int] | None:
        """``[start, end)`` of the text tokens in the attention sequence, or None."""
        if self.text_len == 0:
            return None
        start = 0 if self.text_position == "first" else self.video_len
        return (start, start + self.text_len)
