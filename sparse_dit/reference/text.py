"""The reference model's prompt encoder: a word table, learned positions and a norm; no external text model.

Prompts come from a closed vocabulary (``VOCAB``: the words `videos.describe` uses). Unknown words map
to ``<unk>``; the empty prompt (all ``<pad>``) is the null prompt of classifier-free guidance.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from .videos import CAMERAS, COLOURS, COUNTS, MOTIONS, SHAPES

PAD, UNK = "<pad>", "<unk>"
# Words keep their index across releases (new words are appended), so a trained word table can be extended.
VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(
        [PAD, UNK, "one", "two", "three", "shape", "shapes", "a", "an", *COLOURS, *SHAPES,
         "bouncing", "spinning", "sliding", "still", "camera", "pans", "left", "right",
         *COUNTS, *MOTIONS, "zooms", *CAMERAS]
    )
)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class PromptEncoder(nn.Module):
    """Maps prompts to ``encoder_hidden_states`` (B, max_len, text_dim) for `WanTransformer3DModel`."""

    def __init__(self, text_dim: int = 128, max_len: int = 24, vocab: tuple[str, ...] = VOCAB) -> None:
        super().__init__()
        self.vocab = tuple(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.text_dim = int(text_dim)
        self.max_len = int(max_len)
        self.embed = nn.Embedding(len(self.vocab), self.text_dim)
        self.position = nn.Parameter(torch.zeros(self.max_len, self.text_dim))
        self.norm = nn.LayerNorm(self.text_dim)
        nn.init.normal_(self.embed.weight, std=0.5)
        nn.init.normal_(self.position, std=0.1)

    def tokenize(self, prompts: "str | list[str]") -> torch.Tensor:
        """(B, max_len) int64 token ids; words beyond max_len are dropped."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.zeros(len(prompts), self.max_len, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            words = re.findall(r"[a-z]+", prompt.lower())[: self.max_len]
            for i, w in enumerate(words):
                ids[b, i] = self.index.get(w, self.index[UNK])
        return ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embed(ids) + self.position[: ids.shape[1]])

    def encode(self, prompts: "str | list[str]", device: torch.device | str | None = None) -> torch.Tensor:
        """Prompts to (B, max_len, text_dim) on ``device`` (default: the encoder's), in the encoder's dtype."""
        dev = self.embed.weight.device if device is None else device
        return self(self.tokenize(prompts).to(dev))

    # ------------------------------------------------------------------------------- persistence
    def save_pretrained(self, directory: "str | Path", dtype: torch.dtype = torch.float16) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"text_dim": self.text_dim, "max_len": self.max_len, "vocab": list(self.vocab)}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: "str | Path", dtype: torch.dtype = torch.float32) -> "PromptEncoder":
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / CONFIG_NAME).read_text())
        model = cls(config["text_dim"], config["max_len"], tuple(config["vocab"]))
        model.load_state_dict({k: v.float() for k, v in load_file(str(directory / WEIGHTS_NAME)).items()})
        return model.to(dtype).eval()


__all__ = ["PromptEncoder", "VOCAB"]
