"""`Layout`: the one data structure every sparsity pattern produces and every attention backend consumes.

Two token orders matter. The *original* order is the sequence diffusers hands to attention. The
*query order* and *key order* are optional per-head permutations of it (``q_perm``/``kv_perm``:
position ``i`` of the permuted order holds original token ``perm[i]``; ``-1`` marks a padded slot).
Without a permutation the order is the original one.

Queries are cut into blocks of ``block_q`` consecutive positions of the query order. Every
(batch, head, query block) attends a list of key *segments* ``[start, end)`` in key order, stored as
``kv_count`` plus a padded ``kv_start``/``kv_end`` table (FlexAttention's ``kv_num_blocks``/``kv_indices``
generalised from fixed blocks to segments of any length). On top of that, an optional ``text_kv``
range of original key positions is attended by every query, and an optional ``dense_q`` range of
original query positions attends every key (joint text-video attention). Segments never contain text
keys, so nothing is counted twice. Padded prompts: ``text_valid`` (B,) says how many keys, from the
start of ``text_range`` (the prompt's place in the sequence), are real for each batch element; the
rest of ``text_range`` is attended by nobody, as a key-padding mask would do.

All index tensors are int32 with a leading dimension of 1 (shared by the batch) or the batch size.

The contract every backend relies on (``check_bounds`` checks it cheaply on construction and at every kernel entry,
``validate`` checks the rest on request):
- segments lie inside the key order: ``0 <= start <= end <= K`` for the first ``kv_count`` entries
  (``validate`` also wants them non-empty and disjoint);
- permutations hold ``-1`` or token indices in ``[0, S)``; the query order lists every query outside ``dense_q``
  exactly once (a missing row would never be written), the key order lists a key at most once;
- every query block has keys by structure: a segment with a real slot, or ``text_kv`` (``validate``).
  Keys missing only because of prompt padding (``text_valid``) are fine: a row left with no key outputs 0,
  on every backend;
- keys a row does not attend never contribute to it, not even a NaN or Inf in their values.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import torch

Range = tuple[int, int]


def _as_range(r: Sequence[int] | None, seq_len: int, what: str) -> Range | None:
    if r is None:
        return None
    start, end = int(r[0]), int(r[1])
    if not 0 <= start < end <= seq_len:
        raise ValueError(f"Layout.{what}={r!r} must satisfy 0 <= start < end <= seq_len={seq_len}")
    return (start, end)


def _i32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).contiguous()


# int32 work space of `Layout.rows_key_mask` (512 MiB): heads are processed in chunks that fit it
ROWS_MASK_WORK_ENTRIES = 1 << 27


@dataclass(frozen=True, eq=False)
class Layout:
    """Block/segment sparsity of one attention call (all heads of a layer).

    Shapes (``L`` is 1 or the batch size, ``H`` heads, ``NQ`` query blocks, ``G`` the widest segment list):
      kv_count: (L, H, NQ); kv_start, kv_end: (L, H, NQ, G)
      q_perm: (L, H, NQ * block_q) or None; kv_perm: (L, H, K) or None
    """

    seq_len: int
    block_q: int
    kv_count: torch.Tensor
    kv_start: torch.Tensor
    kv_end: torch.Tensor
    q_perm: torch.Tensor | None = None
    kv_perm: torch.Tensor | None = None
    text_kv: Range | None = None
    dense_q: Range | None = None
    text_valid: torch.Tensor | None = None
    text_range: Range | None = None
    # what backends derive from this (immutable) layout, e.g. the kernel's chunk tables; see `cached`
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # set by the transforms below, whose input was checked: skips a second `check_bounds` (a device sync)
    _trusted: bool = field(default=False, repr=False, compare=False)

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` once per key for this layout object (layouts are immutable, so it stays valid)."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_kv", _as_range(self.text_kv, self.seq_len, "text_kv"))
        object.__setattr__(self, "dense_q", _as_range(self.dense_q, self.seq_len, "dense_q"))
        object.__setattr__(self, "text_range", _as_range(self.text_range, self.seq_len, "text_range"))
        for name in ("kv_count", "kv_start", "kv_end", "q_perm", "kv_perm", "text_valid"):
            t = getattr(self, name)
            if t is not None:
                if t.dtype.is_floating_point or t.dtype == torch.bool:
                    raise TypeError(f"Layout.{name} must be an integer tensor, got {t.dtype}")
                object.__setattr__(self, name, _i32(t))
        self._check_shapes()
        if self._trusted:
            self._derived["bounds"] = True
            object.__setattr__(self, "_trusted", False)
        else:
            self.check_bounds()

    # ----------------------------------------------------------------------------------------- shapes
    @property
    def num_q_blocks(self) -> int:
        return self.kv_count.shape[2]

    @property
    def heads(self) -> int:
        return self.kv_count.shape[1]

    @property
    def batch(self) -> int:
        """1 when the layout is shared by every batch element, else the batch size."""
        return self.kv_count.shape[0]

    @property
    def q_order_len(self) -> int:
        return self.q_perm.shape[-1] if self.q_perm is not None else self.seq_len

    @property
    def kv_order_len(self) -> int:
        return self.kv_perm.shape[-1] if self.kv_perm is not None else self.seq_len

    @property
    def device(self) -> torch.device:
        return self.kv_count.device

    def _check_shapes(self) -> None:
        if self.seq_len < 1 or self.block_q < 1:
            raise ValueError(f"Layout needs seq_len >= 1 and block_q >= 1, got {self.seq_len}, {self.block_q}")
        if self.kv_count.dim() != 3:
            raise ValueError(f"Layout.kv_count must be (L, H, NQ), got shape {tuple(self.kv_count.shape)}")
        L, H, NQ = self.kv_count.shape
        if self.kv_start.dim() != 4 or self.kv_start.shape[:3] != (L, H, NQ) or self.kv_end.shape != self.kv_start.shape:
            raise ValueError(
                f"Layout.kv_start/kv_end must both be (L, H, NQ, G) = ({L}, {H}, {NQ}, G); "
                f"got {tuple(self.kv_start.shape)} and {tuple(self.kv_end.shape)}"
            )
        expected_nq = -(-self.q_order_len // self.block_q)
        if NQ != expected_nq:
            raise ValueError(
                f"Layout has {NQ} query blocks but the query order has {self.q_order_len} positions "
                f"in blocks of {self.block_q}: expected {expected_nq}"
            )
        for name in ("q_perm", "kv_perm"):
            t = getattr(self, name)
            if t is not None and (t.dim() != 3 or t.shape[:2] != (L, H)):
                raise ValueError(f"Layout.{name} must be (L, H, N) with L={L}, H={H}; got {tuple(t.shape)}")
        if self.q_perm is not None and self.q_perm.shape[-1] % self.block_q:
            raise ValueError(
                f"Layout.q_perm length {self.q_perm.shape[-1]} must be a multiple of block_q={self.block_q} (pad with -1)"
            )
        for t in (self.kv_start, self.kv_end, self.q_perm, self.kv_perm, self.text_valid):
            if t is not None and t.device != self.kv_count.device:
                raise ValueError("all Layout tensors must be on one device")
        if self.text_valid is not None:
            if self.text_range is None or self.text_valid.dim() != 1:
                raise ValueError("Layout.text_valid must be a (B,) tensor and needs text_range")

    # ------------------------------------------------------------------------------------- validation
    def check_bounds(self) -> "Layout":
        """Cheap checks that keep every backend inside its tensors, once per layout object (one device sync):
        segment bounds, permutation entries and coverage of the query order, ``text_valid``. Returns self;
        raises ValueError naming the first problem and what to do."""
        if self._derived.get("bounds"):
            return self
        S, K, G = self.seq_len, self.kv_order_len, self.kv_start.shape[-1]
        count = self.kv_count.long()
        used = torch.arange(G, device=self.device) < count[..., None]
        start, end = self.kv_start.long(), self.kv_end.long()
        problems = [
            ((count < 0) | (count > G)).any(),
            (used & ((start < 0) | (end > K) | (start > end))).any(),
        ]
        q_cover = kv_cover = None
        for name in ("q_perm", "kv_perm"):
            perm = getattr(self, name)
            if perm is None:
                problems.append(torch.zeros((), dtype=torch.bool, device=self.device))
                continue
            problems.append(((perm < -1) | (perm >= S)).any())
            counts = torch.zeros(perm.shape[0] * perm.shape[1], S + 1, dtype=torch.int32, device=self.device)
            flat = (perm.long() + 1).clamp(0, S).reshape(counts.shape[0], -1)
            counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.int32))
            counts = counts[:, 1:]
            if name == "q_perm":
                if self.dense_q is not None:  # dense rows may be absent from the block path (or present: skipped)
                    counts[:, self.dense_q[0] : self.dense_q[1]] = 1
                q_cover = counts
            else:
                if self.text_kv is not None:  # text keys come through text_kv; a copy in kv_perm is never read
                    counts[:, self.text_kv[0] : self.text_kv[1]] = counts[:, self.text_kv[0] : self.text_kv[1]].clamp(max=1)
                kv_cover = counts
        problems.append((q_cover != 1).any() if q_cover is not None else torch.zeros((), dtype=torch.bool, device=self.device))
        problems.append((kv_cover > 1).any() if kv_cover is not None else torch.zeros((), dtype=torch.bool, device=self.device))
        if self.text_valid is not None:
            n_text = self.text_range[1] - self.text_range[0]
            problems.append(((self.text_valid < 0) | (self.text_valid > n_text)).any())
        flags = torch.stack(problems).tolist()  # the one sync; the messages below are built only on failure
        if flags[0]:
            raise ValueError(f"Layout.kv_count must lie in [0, {G}] (the width of kv_start/kv_end)")
        if flags[1]:
            bad = used & ((start < 0) | (end > K) | (start > end))
            l, h, qb, g = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"segment {g} of (batch {l}, head {h}, query block {qb}) is [{int(start[l, h, qb, g])}, "
                f"{int(end[l, h, qb, g])}): segments must have start <= end and lie inside [0, {K}) (the key order)"
            )
        for flag, name in zip(flags[2:4], ("q_perm", "kv_perm")):
            if flag:
                raise ValueError(f"Layout.{name} entries must be -1 (padding) or token indices in [0, {S})")
        if flags[4]:
            if (q_cover > 1).any():
                raise ValueError("Layout.q_perm lists a token twice; every token may appear at most once")
            missing = (q_cover == 0).nonzero()
            if missing.numel():
                raise ValueError(
                    f"Layout.q_perm misses query token {int(missing[0, 1])}: every query must be in the query order "
                    "(or in dense_q), or its output row would never be written"
                )
            raise ValueError("Layout.q_perm lists a token twice; every token may appear at most once")
        if flags[5]:
            raise ValueError("Layout.kv_perm lists a token twice; every token may appear at most once")
        if self.text_valid is not None and flags[6]:
            raise ValueError(f"Layout.text_valid must lie in [0, {self.text_range[1] - self.text_range[0]}] (the length of text_range)")
        self._derived["bounds"] = True
        return self

    def validate(self) -> "Layout":
        """Check indices: segments inside the key order and disjoint, permutations covering every
        token once, no query block without keys, no text key inside a segment. Returns self."""
        S, G = self.seq_len, self.kv_start.shape[-1]
        count = self.kv_count.long()
        if (count < 0).any() or (count > G).any():
            raise ValueError(f"Layout.kv_count must lie in [0, {G}] (the width of kv_start)")
        used = torch.arange(G, device=self.device) < count[..., None]
        start, end = self.kv_start.long(), self.kv_end.long()
        bad = used & ((start < 0) | (end > self.kv_order_len) | (start >= end))
        if bad.any():
            l, h, qb, g = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"segment {g} of (batch {l}, head {h}, query block {qb}) is [{int(start[l, h, qb, g])}, "
                f"{int(end[l, h, qb, g])}): segments must be non-empty and inside [0, {self.kv_order_len})"
            )
        big = torch.iinfo(torch.int64).max
        s_sorted, order = torch.where(used, start, big).sort(-1)
        e_sorted = torch.where(used, end, big).gather(-1, order)
        overlap = (e_sorted[..., :-1] > s_sorted[..., 1:]) & used.sum(-1, keepdim=True).gt(
            torch.arange(1, G, device=self.device)
        )
        if overlap.any():
            l, h, qb, _ = (int(i) for i in overlap.nonzero()[0])
            raise ValueError(f"segments of (batch {l}, head {h}, query block {qb}) overlap; merge them into one")
        for name in ("q_perm", "kv_perm"):
            perm = getattr(self, name)
            if perm is None:
                continue
            if ((perm < -1) | (perm >= S)).any():
                raise ValueError(f"Layout.{name} entries must be -1 (padding) or token indices in [0, {S})")
            counts = torch.zeros(perm.shape[0] * perm.shape[1], S + 1, dtype=torch.int64, device=self.device)
            flat = (perm.long() + 1).reshape(perm.shape[0] * perm.shape[1], -1)
            counts.scatter_add_(1, flat, torch.ones_like(flat))
            counts = counts[:, 1:]
            if name == "q_perm" and self.dense_q is not None:
                counts[:, self.dense_q[0] : self.dense_q[1]] = 1  # dense rows may be absent from the block path
            if name == "kv_perm" and self.text_kv is not None:
                counts[:, self.text_kv[0] : self.text_kv[1]] = counts[:, self.text_kv[0] : self.text_kv[1]].clamp(max=1)
            if (counts > 1).any():
                raise ValueError(f"Layout.{name} lists a token twice; every token may appear at most once")
            if name == "q_perm" and (counts == 0).any():
                missing = int((counts == 0).nonzero()[0, 1])
                raise ValueError(f"Layout.q_perm misses query token {missing}: every query must be in the query order")
        if self.text_valid is not None:
            n_text = self.text_range[1] - self.text_range[0]
            if ((self.text_valid < 0) | (self.text_valid > n_text)).any():
                raise ValueError(f"Layout.text_valid must lie in [0, {n_text}] (the length of text_range)")
        if self.text_kv is not None:
            a, b = self.text_kv
            if self.kv_perm is None:
                hit = used & (start < b) & (end > a)
            else:
                is_text = ((self.kv_perm >= a) & (self.kv_perm < b)).long()
                prefix = torch.nn.functional.pad(is_text.cumsum(-1), (1, 0))  # (L, H, K + 1)
                L, H, NQ, _ = start.shape
                flat = prefix[:, :, None, :].expand(L, H, NQ, prefix.shape[-1])
                n_text = flat.gather(-1, end.clamp(0, self.kv_order_len)) - flat.gather(-1, start.clamp(0, self.kv_order_len))
                hit = used & (n_text > 0)
            if hit.any():
                raise ValueError(
                    f"a segment contains text keys {self.text_kv}; text keys are attended through text_kv only"
                )
        if self.text_kv is None:
            # keys by structure; keys lost only to prompt padding (text_valid) are allowed: those rows output 0
            empty = (self._real_keys_per_block() == 0) & (self._valid_rows_per_block() > 0)
            if empty.any():
                l, h, qb = (int(i) for i in empty.nonzero()[0])
                raise ValueError(
                    f"query block {qb} of (batch {l}, head {h}) attends no keys; give it at least one segment"
                )
        return self.check_bounds()

    def _real_keys_per_block(self) -> torch.Tensor:
        """(L, H, NQ) number of keys (not counting -1 padding slots of kv_perm) in each block's segments."""
        L, H, NQ = self.kv_count.shape
        K = self.kv_order_len
        if self.kv_perm is None:
            real = torch.ones(L, H, K, dtype=torch.int64, device=self.device)
        else:
            real = (self.kv_perm >= 0).long()
        prefix = torch.nn.functional.pad(real.cumsum(-1), (1, 0))[:, :, None, :].expand(L, H, NQ, K + 1)
        used = torch.arange(self.kv_start.shape[-1], device=self.device) < self.kv_count[..., None].long()
        end, start = self.kv_end.long().clamp(0, K), self.kv_start.long().clamp(0, K)
        return ((prefix.gather(-1, end) - prefix.gather(-1, start)) * used).sum(-1)

    def _valid_rows_per_block(self) -> torch.Tensor:
        """(L, H, NQ) number of query rows per block that the block path computes."""
        L, H, NQ = self.kv_count.shape
        if self.q_perm is None:
            rows = torch.arange(NQ * self.block_q, device=self.device).view(1, 1, NQ, self.block_q).expand(L, H, -1, -1)
        else:
            rows = self.q_perm.long().view(L, H, NQ, self.block_q)
        valid = (rows >= 0) & (rows < self.seq_len)
        if self.dense_q is not None:
            valid &= ~((rows >= self.dense_q[0]) & (rows < self.dense_q[1]))
        return valid.sum(-1)

    # ------------------------------------------------------------------------------------ constructors
    @classmethod
    def from_segments(
        cls,
        segments: Sequence[Sequence[Sequence[Sequence[tuple[int, int]]]]],
        seq_len: int,
        block_q: int,
        **kwargs,
    ) -> "Layout":
        """Build from nested lists ``segments[l][h][query_block] = [(start, end), ...]``."""
        L, H, NQ = len(segments), len(segments[0]), len(segments[0][0])
        G = max(1, max(len(s) for per_l in segments for per_h in per_l for s in per_h))
        count = torch.zeros(L, H, NQ, dtype=torch.int32)
        start = torch.zeros(L, H, NQ, G, dtype=torch.int32)
        end = torch.zeros(L, H, NQ, G, dtype=torch.int32)
        for l, per_l in enumerate(segments):
            for h, per_h in enumerate(per_l):
                for qb, segs in enumerate(per_h):
                    count[l, h, qb] = len(segs)
                    for g, (s, e) in enumerate(segs):
                        start[l, h, qb, g], end[l, h, qb, g] = s, e
        return cls(seq_len, block_q, count, start, end, **kwargs).validate()

    @classmethod
    def from_block_mask(
        cls,
        mask: torch.Tensor,
        block_size: int,
        seq_len: int | None = None,
        *,
        text_kv: Range | None = None,
        dense_q: Range | None = None,
    ) -> "Layout":
        """Layout of a block mask ``(L, H, ceil(S/block), ceil(S/block))`` bool, ``L`` 1 or the batch.

        Runs of consecutive kept key blocks become one segment; the last block is cut at ``seq_len``
        (default ``NK * block_size``).
        """
        if mask.dtype != torch.bool or mask.dim() != 4:
            raise ValueError(
                f"block mask must be a bool tensor of shape (B or 1, H, num_q_blocks, num_kv_blocks); "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        L, H, NQ, NK = mask.shape
        S = NK * block_size if seq_len is None else int(seq_len)
        nb = -(-S // block_size)
        if NQ != nb or NK != nb:
            raise ValueError(
                f"block mask for seq_len={S} and block_size={block_size} must have shape "
                f"(B or 1, H, {nb}, {nb}); got {tuple(mask.shape)}"
            )
        if text_kv is not None:
            a, b = text_kv
            if a % block_size or (b % block_size and b != S):
                raise ValueError(f"text_kv={text_kv} must be block aligned to use from_block_mask")
            mask = mask.clone()
            mask[..., a // block_size : -(-b // block_size)] = False  # text keys come through text_kv
        prev = torch.nn.functional.pad(mask, (1, 0))[..., :-1]
        nxt = torch.nn.functional.pad(mask, (0, 1))[..., 1:]
        starts_at = mask & ~prev
        ends_at = mask & ~nxt
        count = starts_at.sum(-1)
        G = max(1, int(count.max()))
        idx = torch.arange(NK, device=mask.device)
        first = torch.where(starts_at, idx, NK).sort(-1).values[..., :G]
        last = torch.where(ends_at, idx, NK).sort(-1).values[..., :G]
        pad = first == NK
        start = torch.where(pad, 0, first * block_size)
        end = torch.where(pad, 0, ((last + 1) * block_size).clamp(max=S))
        if G > NK:  # no segment at all: keep a zero-width table of width 1
            start, end = start[..., :1], end[..., :1]
        return cls(S, block_size, count, start, end, text_kv=text_kv, dense_q=dense_q).validate()

    @classmethod
    def dense(cls, seq_len: int, heads: int, block_q: int = 128, device: torch.device | str = "cpu") -> "Layout":
        """Every query attends every key (one segment per query block)."""
        nq = -(-seq_len // block_q)
        count = torch.ones(1, heads, nq, dtype=torch.int32, device=device)
        start = torch.zeros(1, heads, nq, 1, dtype=torch.int32, device=device)
        end = torch.full((1, heads, nq, 1), seq_len, dtype=torch.int32, device=device)
        return cls(seq_len, block_q, count, start, end)

    # -------------------------------------------------------------------------------------- transforms
    def to(self, device: torch.device | str) -> "Layout":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            _trusted=bool(self._derived.get("bounds")),
            kv_count=move(self.kv_count),
            kv_start=move(self.kv_start),
            kv_end=move(self.kv_end),
            q_perm=move(self.q_perm),
            kv_perm=move(self.kv_perm),
            text_valid=move(self.text_valid),
        )

    def compact(self) -> "Layout":
        """The same layout with its segment table, and the kernel chunk tables it carries, trimmed to the widest used
        entry (one host sync). For layouts kept between calls (``replan_every > 1``): a plan built without host syncs
        has fixed-capacity tables sized for the worst case (e.g. half the key chunks per query block), which would
        otherwise stay allocated per layer and CFG branch until the next re-plan."""
        tables = {k: v for k, v in self._derived.items() if isinstance(k, tuple) and k[:1] == ("triton_chunks",)}
        widths = [self.kv_count.max()]
        for t in tables.values():
            widths += [t[0].max(), t[3].max()]  # full chunks, tails
        if self.kv_count.numel() == 0:
            return self
        used = torch.stack([w.to(torch.int64) for w in widths]).tolist()  # the one sync
        trim = lambda t, n: t[..., : max(1, min(n, t.shape[-1]))].contiguous()  # noqa: E731  (a copy when narrowed)
        out = replace(
            self,
            _trusted=bool(self._derived.get("bounds")),
            kv_start=trim(self.kv_start, used[0]),
            kv_end=trim(self.kv_end, used[0]),
        )
        for i, (key, (n_full, n_clean, full_start, n_part, part_start, part_end)) in enumerate(tables.items()):
            nf, np_ = used[1 + 2 * i], used[2 + 2 * i]
            out._derived[key] = (n_full, n_clean, trim(full_start, nf), n_part, trim(part_start, np_), trim(part_end, np_))
        return out

    def with_text_valid(self, text_valid: torch.Tensor | None, text_range: Range | None = None) -> "Layout":
        """The same layout where only the first ``text_valid[b]`` keys of ``text_range`` (default: text_kv)
        are real for batch element b (a padded prompt); None: all keys real."""
        if text_valid is None:
            return replace(self, text_valid=None, text_range=None)
        text_range = text_range or self.text_kv
        if text_range is None:
            raise ValueError("with_text_valid needs text_range= when the layout has no text_kv")
        return replace(self, text_valid=text_valid.to(device=self.device, dtype=torch.int32), text_range=text_range)

    def padded_text(self, b: int) -> Range | None:
        """``[start, end)`` of the text keys that batch element ``b`` must not attend, or None."""
        if self.text_valid is None:
            return None
        n = int(self.text_valid[b if self.text_valid.numel() > 1 else 0])
        start = self.text_range[0] + n
        return (start, self.text_range[1]) if start < self.text_range[1] else None

    def expand_batch(self, batch: int) -> "Layout":
        """The same layout with its leading dimension broadcast from 1 to ``batch`` (views, no copies)."""
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ValueError(f"layout is per-batch with {self.batch} elements; cannot use it for batch {batch}")
        ex = lambda t: None if t is None else t.expand(batch, *t.shape[1:])  # noqa: E731
        return replace(
            self,
            _trusted=bool(self._derived.get("bounds")),
            kv_count=ex(self.kv_count),
            kv_start=ex(self.kv_start),
            kv_end=ex(self.kv_end),
            q_perm=ex(self.q_perm),
            kv_perm=ex(self.kv_perm),
        )

    def identity_q_perm(self) -> torch.Tensor:
        """(L, H, NQ * block_q) query order as explicit indices (-1 beyond the sequence)."""
        if self.q_perm is not None:
            return self.q_perm
        n = self.num_q_blocks * self.block_q
        idx = torch.arange(n, device=self.device, dtype=torch.int32)
        idx = torch.where(idx < self.seq_len, idx, -1)
        return idx.view(1, 1, n).expand(self.batch, self.heads, n)

    def identity_kv_perm(self) -> torch.Tensor:
        if self.kv_perm is not None:
            return self.kv_perm
        idx = torch.arange(self.seq_len, device=self.device, dtype=torch.int32)
        return idx.view(1, 1, -1).expand(self.batch, self.heads, self.seq_len)

    def take_heads(self, index: torch.Tensor | Sequence[int]) -> "Layout":
        """The layout of the heads ``index`` (in that order)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        pick = lambda t: None if t is None else t.index_select(1, index)  # noqa: E731
        return replace(
            self,
            _trusted=bool(self._derived.get("bounds")) and bool(((index >= 0) & (index < self.heads)).all()),
            kv_count=pick(self.kv_count),
            kv_start=pick(self.kv_start),
            kv_end=pick(self.kv_end),
            q_perm=pick(self.q_perm),
            kv_perm=pick(self.kv_perm),
        )

    @staticmethod
    def stack_heads(
        layouts: Sequence["Layout"], heads: Sequence[Sequence[int] | torch.Tensor] | None = None
    ) -> "Layout":
        """Layouts of head groups combined along the head dimension (one launch for mixed patterns).

        ``heads``: for each layout, the head index each of its heads takes in the result (together a permutation of
        ``range(total heads)``); default: concatenated in order. Lists are checked; int64 tensors already on the
        layouts' device are trusted to form a permutation (checking them, or copying lists to a GPU, would
        synchronise with the host on every call: callers that stack every call keep such tensors). Every field is written once into a preallocated
        tensor (no per-group padding temporaries, no gather afterwards), and the attention kernel's chunk tables are
        combined the same way when every part already carries them (dynamic parts planned on the GPU do), so the
        mixed layout needs no host sync either."""
        first = layouts[0]
        if len(layouts) == 1 and (heads is None or (not isinstance(heads[0], torch.Tensor) and list(heads[0]) == list(range(first.heads)))):
            return first  # a uniform layer: the part itself, with what backends derived from it
        for lay in layouts[1:]:
            if (lay.seq_len, lay.block_q, lay.text_kv, lay.dense_q) != (
                first.seq_len,
                first.block_q,
                first.text_kv,
                first.dense_q,
            ):
                raise ValueError("stack_heads needs layouts with equal seq_len, block_q, text_kv and dense_q")
        H = sum(lay.heads for lay in layouts)
        if heads is None:
            offsets = [0]
            for lay in layouts:
                offsets.append(offsets[-1] + lay.heads)
            heads = [range(offsets[i], offsets[i + 1]) for i in range(len(layouts))]
        device = first.device
        if len(heads) != len(layouts) or any(len(g) != lay.heads for g, lay in zip(heads, layouts)):
            raise ValueError(f"stack_heads: heads must place every head of every layout once in range({H})")
        if not all(isinstance(g, torch.Tensor) for g in heads):
            flat_heads = [int(h) for g in heads if not isinstance(g, torch.Tensor) for h in g]
            if len(set(flat_heads)) != len(flat_heads) or any(not 0 <= h < H for h in flat_heads):
                raise ValueError(f"stack_heads: heads must place every head of every layout once in range({H})")
        index = [
            g.to(device=device, dtype=torch.long) if isinstance(g, torch.Tensor) else torch.as_tensor(list(g), dtype=torch.long, device=device)
            for g in heads
        ]
        L = max(lay.batch for lay in layouts)
        NQ = max(lay.num_q_blocks for lay in layouts)
        G = max(lay.kv_start.shape[-1] for lay in layouts)

        def combine(parts: Sequence[torch.Tensor], size: Sequence[int], fill: int) -> torch.Tensor:
            """(L or 1, h_i, X...) parts -> (L, H, size...) with part i at heads[i], the rest ``fill``."""
            out = torch.full((L, H, *size), fill, dtype=torch.int32, device=device)
            for t, idx in zip(parts, index):
                # one indexed write per part into its heads and leading extent (no padded temporary)
                out[(slice(None), idx, *(slice(0, n) for n in t.shape[2:]))] = t.expand(L, *t.shape[1:])
            return out

        count = combine([lay.kv_count for lay in layouts], (NQ,), 0)
        start = combine([lay.kv_start for lay in layouts], (NQ, G), 0)
        end = combine([lay.kv_end for lay in layouts], (NQ, G), 0)
        q_perm = kv_perm = None
        if any(lay.q_perm is not None for lay in layouts):
            q_perm = combine([lay.identity_q_perm() for lay in layouts], (NQ * first.block_q,), -1)
        if any(lay.kv_perm is not None for lay in layouts):
            K = max(lay.kv_order_len for lay in layouts)
            kv_perm = combine([lay.identity_kv_perm() for lay in layouts], (K,), -1)
        out = Layout(
            first.seq_len,
            first.block_q,
            count,
            start,
            end,
            q_perm,
            kv_perm,
            first.text_kv,
            first.dense_q,
            first.text_valid,
            first.text_range,
            _trusted=all(lay._derived.get("bounds") for lay in layouts),
        )
        # chunk tables every part carries (keys ("triton_chunks", BLOCK_N, device)): (L, h, NQ) counts and
        # (L, h, NQ, W) tables, padded with 0 (no chunks) like the segment tables
        shared = set.intersection(*(set(k for k in lay._derived if isinstance(k, tuple) and k[:1] == ("triton_chunks",)) for lay in layouts))
        for key in shared:
            tables = [lay._derived[key] for lay in layouts]
            stacked = []
            for j in range(len(tables[0])):
                parts = [t[j] for t in tables]
                width = () if parts[0].dim() == 3 else (max(t.shape[-1] for t in parts),)
                stacked.append(combine(parts, (NQ, *width), 0))
            out._derived[key] = tuple(stacked)
        return out

    # ----------------------------------------------------------------------------------- dense views
    def key_mask(self, l: int, h: int, blocks: torch.Tensor) -> torch.Tensor:
        """(len(blocks), S) bool: which original keys the given query blocks of (l, h) attend."""
        S, K = self.seq_len, self.kv_order_len
        nb = blocks.numel()
        count = self.kv_count[l, h, blocks].long()
        G = self.kv_start.shape[-1]
        used = torch.arange(G, device=self.device) < count[:, None]
        diff = torch.zeros(nb, K + 1, dtype=torch.int32, device=self.device)
        ones = used.to(torch.int32)
        diff.scatter_add_(1, torch.where(used, self.kv_start[l, h, blocks].long(), K), ones)
        diff.scatter_add_(1, torch.where(used, self.kv_end[l, h, blocks].long(), K), -ones)
        in_order = diff[:, :K].cumsum(1) > 0
        if self.kv_perm is None:
            mask = in_order
        else:
            perm = self.kv_perm[l, h].long()
            keep = perm >= 0
            mask = torch.zeros(nb, S, dtype=torch.bool, device=self.device)
            mask[:, perm[keep]] = in_order[:, keep]
        if self.text_kv is not None:
            mask[:, self.text_kv[0] : self.text_kv[1]] = True
        return mask

    def query_rows(self, l: int, h: int, blocks: torch.Tensor) -> torch.Tensor:
        """(len(blocks), block_q) original query index of each block row; -1 for rows the block path skips."""
        rows = self.identity_q_perm()[l, h].long().view(self.num_q_blocks, self.block_q)[blocks]
        rows = torch.where(rows < self.seq_len, rows, -1)
        if self.dense_q is not None:
            rows = torch.where((rows >= self.dense_q[0]) & (rows < self.dense_q[1]), -1, rows)
        return rows

    def rows_key_mask(self, l: int, rows: torch.Tensor) -> torch.Tensor:
        """(H, len(rows), S) bool: which original keys the original query tokens ``rows`` attend, every head of
        batch element ``l`` at once (the profiler's sampled rows). No host synchronisation; memory H x rows x S plus
        int32 work space of at most ``ROWS_MASK_WORK_ENTRIES`` entries (one head at least)."""
        rows = rows.long().to(self.device)
        H, S, K = self.heads, self.seq_len, self.kv_order_len
        n = rows.numel()
        if self.q_perm is None:
            blocks = (rows // self.block_q).expand(H, n)
        else:
            perm = self.q_perm[l].long()  # (H, Lq)
            position = torch.full((H, S + 1), -1, dtype=torch.long, device=self.device)
            slots = torch.arange(perm.shape[-1], device=self.device).expand(H, -1)
            position.scatter_(1, torch.where(perm >= 0, perm, S), slots)  # padded slots land in the spare column
            blocks = position[:, rows] // self.block_q
        blocks = blocks.clamp(min=0)  # rows the permutation leaves out: as the kernel, they take block 0's keys
        G = self.kv_start.shape[-1]
        mask = torch.zeros(H, n, S + 1, dtype=torch.bool, device=self.device)
        # heads in chunks: the segment-boundary counts are int32 of (heads, rows, K), 4x the mask's bytes
        step = max(1, ROWS_MASK_WORK_ENTRIES // max(1, n * (K + 1)))
        for h0 in range(0, H, step):
            hs = slice(h0, min(H, h0 + step))
            blk = blocks[hs]
            count = self.kv_count[l, hs].long().gather(1, blk)  # (h, n)
            idx = blk[..., None].expand(-1, -1, G)
            starts = self.kv_start[l, hs].long().gather(1, idx)  # (h, n, G)
            ends = self.kv_end[l, hs].long().gather(1, idx)
            used = torch.arange(G, device=self.device) < count[..., None]
            ones = used.to(torch.int32)
            diff = torch.zeros(blk.shape[0], n, K + 1, dtype=torch.int32, device=self.device)
            diff.scatter_add_(2, torch.where(used, starts, K), ones)
            diff.scatter_add_(2, torch.where(used, ends, K), -ones)
            in_order = diff[..., :K].cumsum(-1) > 0
            del diff
            if self.kv_perm is None:
                mask[hs, :, :K] = in_order
            else:
                perm = self.kv_perm[l, hs].long()  # (h, K) original key at each permuted slot, -1 for padding
                mask[hs].scatter_(2, torch.where(perm >= 0, perm, S)[:, None, :].expand(-1, n, -1), in_order)
        mask = mask[..., :S]
        if self.text_kv is not None:
            mask[..., self.text_kv[0] : self.text_kv[1]] = True
        if self.dense_q is not None:
            mask[:, (rows >= self.dense_q[0]) & (rows < self.dense_q[1])] = True
        return mask

    def to_dense_mask(self, seq_len: int | None = None) -> torch.Tensor:
        """(L, H, S, S) bool token mask in original order (query rows, key columns). For tests and small S."""
        S = self.seq_len if seq_len is None else seq_len
        if S != self.seq_len:
            raise ValueError(f"layout was built for seq_len={self.seq_len}, asked for {S}")
        L, H, NQ = self.kv_count.shape
        out = torch.zeros(L, H, S, S, dtype=torch.bool, device=self.device)
        blocks = torch.arange(NQ, device=self.device)
        for l in range(L):
            for h in range(H):
                keys = self.key_mask(l, h, blocks)  # (NQ, S)
                rows = self.query_rows(l, h, blocks)  # (NQ, block_q)
                valid = rows >= 0
                out[l, h, rows[valid]] = keys[:, None, :].expand(-1, self.block_q, -1)[valid]
        if self.dense_q is not None:
            out[:, :, self.dense_q[0] : self.dense_q[1], :] = True
        if self.text_valid is not None:
            out = out.expand(max(L, self.text_valid.numel()), H, S, S).clone()
            for b in range(out.shape[0]):
                pad = self.padded_text(b)
                if pad is not None:
                    out[b, :, :, pad[0] : pad[1]] = False
        return out

    # ------------------------------------------------------------------------------------------- stats
    def density_per_head(self) -> torch.Tensor:
        """(L, H) fraction of the S x S (query, key) pairs that are computed; with padded prompts (``text_valid``),
        (B, H) per batch element. Exact, from the segment tables: never builds anything of size S x S."""
        S = self.seq_len
        keys = self._real_keys_per_block()  # (L, H, NQ)
        if self.text_kv is not None:
            keys = keys + (self.text_kv[1] - self.text_kv[0])
        rows = self._valid_rows_per_block()
        if self.text_valid is None:
            pairs = (keys * rows).sum(-1).double()
            if self.dense_q is not None:
                pairs = pairs + (self.dense_q[1] - self.dense_q[0]) * S
            return pairs / (S * S)
        # padded prompt keys [text_range[0] + text_valid[b], text_range[1]) are attended by nobody: subtract, per
        # batch element, those each block would attend (inside its segments and inside text_kv)
        B = max(self.batch, self.text_valid.numel())
        out = []
        for b in range(B):
            l = b if self.batch > 1 else 0
            pad = self.padded_text(b)
            if pad is None:
                lost = torch.zeros_like(keys[l])
                n_pad = 0
            else:
                lost = self._keys_per_block_in(pad)[l]
                if self.text_kv is not None:
                    lost = lost + max(0, min(pad[1], self.text_kv[1]) - max(pad[0], self.text_kv[0]))
                n_pad = pad[1] - pad[0]
            pairs = ((keys[l] - lost) * rows[l]).sum(-1).double()
            if self.dense_q is not None:
                pairs = pairs + (self.dense_q[1] - self.dense_q[0]) * (S - n_pad)
            out.append(pairs / (S * S))
        return torch.stack(out)

    def _keys_per_block_in(self, token_range: Range) -> torch.Tensor:
        """(L, H, NQ) number of keys with original index in ``token_range`` inside each block's segments."""
        L, H, NQ = self.kv_count.shape
        K = self.kv_order_len
        a, e = token_range
        if self.kv_perm is None:
            order = torch.arange(K, device=self.device).view(1, 1, K).expand(L, H, K)
        else:
            order = self.kv_perm.long()
        inside = ((order >= a) & (order < e)).long()
        prefix = torch.nn.functional.pad(inside.cumsum(-1), (1, 0))[:, :, None, :].expand(L, H, NQ, K + 1)
        used = torch.arange(self.kv_start.shape[-1], device=self.device) < self.kv_count[..., None].long()
        end, start = self.kv_end.long().clamp(0, K), self.kv_start.long().clamp(0, K)
        return ((prefix.gather(-1, end) - prefix.gather(-1, start)) * used).sum(-1)

    @property
    def density(self) -> float:
        """Mean fraction of (query, key) pairs computed, over batch and heads."""
        return float(self.density_per_head().mean())

    def __repr__(self) -> str:
        perms = [n for n in ("q_perm", "kv_perm") if getattr(self, n) is not None]
        return (
            f"Layout(seq_len={self.seq_len}, block_q={self.block_q}, L={self.batch}, heads={self.heads}, "
            f"q_blocks={self.num_q_blocks}, max_segments={self.kv_start.shape[-1]}, perms={perms or None}, "
            f"text_kv={self.text_kv}, dense_q={self.dense_q}, density={self.density:.3f})"
        )


def iter_head_groups(assignment: Sequence[str]) -> Iterable[tuple[str, list[int]]]:
    """Group head indices by the pattern name assigned to them, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for h, name in enumerate(assignment):
        groups.setdefault(name, []).append(h)
    return groups.items()
