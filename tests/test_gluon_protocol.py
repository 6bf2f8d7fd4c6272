"""A random-interleaving model of the Gluon engine's synchronisation (sparse_dit/kernels/gluon_attention.py), run on
the CPU: a wrong parity or a missing arrive in that kernel is a GPU hang or a silent overwrite, not an exception.

The model is a transcription of the kernel's control flow, not the kernel: one producer (`_ge_producer`), two
consumer warpgroups (`_ge_consumer` / `_ge_attend`), asynchronous TMA landings, over a CTA's sequence of tiles (the
persistent grid) with the K/V ring's iterations numbered across tiles and each warpgroup's Q prefetched after its
last S GEMM. mbarriers are modelled as the hardware has them: a wait on parity p passes whenever the current phase's
parity differs from p, so a wait two phases early passes too (the model asserts that never happens). Checked: no
deadlock, no early pass, no slot overwritten before both warpgroups released what it held, every read sees the
block it wants, landed. Two mutations of the protocol must be caught, so the model is not vacuous.
"""

from __future__ import annotations

import random

import pytest

STAGES = 2  # the engine's ring depth


class _Model:
    def __init__(self, cnts: list[int], seed: int, drop_v_wait: bool = False, late_v_read: bool = False):
        self.cnts, self.rnd = cnts, random.Random(seed)
        self.drop_v_wait, self.late_v_read = drop_v_wait, late_v_read
        self.completions: dict = {}
        self.arrivals: dict = {}
        self.count: dict = {}
        for s in range(STAGES):
            self._init(("k_ready", s), 1)
            self._init(("v_ready", s), 1)
            self._init(("kv_free", s), 2)  # one arrive per consumer warpgroup
        for w in (0, 1):
            self._init(("q", w), 1)
        self.slot = {"k": [None] * STAGES, "v": [None] * STAGES}
        self.qbuf: list = [None, None]
        self.released: list[set] = [set(), set()]
        self.in_flight: list = []
        self.reads = {"k": [0, 0], "v": [0, 0], "q": [0, 0]}  # per warpgroup, of blocks seen landed

    def _init(self, bar, count):
        self.completions[bar], self.arrivals[bar], self.count[bar] = 0, 0, count

    def _arrive(self, bar):
        self.arrivals[bar] += 1
        if self.arrivals[bar] == self.count[bar]:
            self.arrivals[bar] = 0
            self.completions[bar] += 1

    def _can_wait(self, bar, n):
        """Wait for the n-th completion (1-based) with parity (n - 1) & 1, as mbarrier.wait does."""
        c = self.completions[bar]
        passes = (c & 1) != ((n - 1) & 1)
        if passes:
            assert c >= n, f"early pass on {bar}: {c} completions, waited for the {n}-th"
        return passes

    def producer(self):
        g0 = 0
        for cnt in self.cnts:
            for i in range(cnt):
                g = g0 + i
                s, r = g % STAGES, g // STAGES
                if r > 0:
                    yield ("wait", ("kv_free", s), r)  # completion g - STAGES: K_(g-STAGES) released
                yield ("tma", "k", s, g)
                if r > 0 and not self.drop_v_wait:
                    yield ("wait", ("kv_free", (g + 1) % STAGES), (g + 1) // STAGES)  # completion g - STAGES + 1
                yield ("tma", "v", s, g)
            g0 += cnt

    def consumer(self, w):
        yield ("q_load", w, 0)
        g0 = 0
        for t, cnt in enumerate(self.cnts):
            yield ("wait", ("q", w), t + 1)
            prefetch = t + 1 < len(self.cnts)
            if cnt:
                yield ("wait", ("k_ready", g0 % STAGES), g0 // STAGES + 1)
                yield ("read_q", w, t)
                yield ("read", w, "k", g0)
                freed = [("k", g0)] + ([("v", g0 - 1)] if g0 else [])  # V_(g0-1): the previous tile's last block
                yield ("release", w, freed, ("kv_free", g0 % STAGES))
                if self.late_v_read and g0:
                    yield ("read", w, "v", g0 - 1)
                if cnt > 1:
                    yield ("wait", ("k_ready", (g0 + 1) % STAGES), (g0 + 1) // STAGES + 1)
                for j in range(1, cnt):
                    g = g0 + j
                    yield ("wait", ("v_ready", (g - 1) % STAGES), (g - 1) // STAGES + 1)
                    yield ("read_q", w, t)
                    yield ("read", w, "k", g)
                    yield ("read", w, "v", g - 1)
                    if j + 1 < cnt:
                        yield ("wait", ("k_ready", (g + 1) % STAGES), (g + 1) // STAGES + 1)
                    yield ("release", w, [("k", g), ("v", g - 1)], ("kv_free", g % STAGES))
                if prefetch:  # after the tile's last S GEMM
                    yield ("q_load", w, t + 1)
                last = g0 + cnt - 1
                yield ("wait", ("v_ready", last % STAGES), last // STAGES + 1)
                yield ("read", w, "v", last)
            elif prefetch:
                yield ("q_load", w, t + 1)
            g0 += cnt

    def run(self) -> dict:
        actors = {"producer": self.producer(), 0: self.consumer(0), 1: self.consumer(1)}
        current = {a: next(gen, None) for a, gen in actors.items()}
        for _ in range(200_000):
            ready = [a for a, op in current.items()
                     if op is not None and (op[0] != "wait" or self._can_wait(op[1], op[2]))]
            if self.in_flight:
                ready.append("tma")
            if not ready:
                assert all(op is None for op in current.values()), f"deadlock: {current}"
                return self.reads
            actor = self.rnd.choice(ready)
            if actor == "tma":  # a copy lands, in any order
                kind, s, i = self.in_flight.pop(self.rnd.randrange(len(self.in_flight)))
                if kind == "q":
                    self.qbuf[s] = (i, True)
                    self._arrive(("q", s))
                else:
                    self.slot[kind][s] = (i, True)
                    self._arrive(("k_ready" if kind == "k" else "v_ready", s))
                continue
            self._step(current[actor])
            current[actor] = next(actors[actor], None)
        raise AssertionError("no end after 200000 steps")

    def _step(self, op) -> None:
        if op[0] == "tma":
            _, kind, s, i = op
            if i >= STAGES:
                for w in (0, 1):
                    assert (kind, i - STAGES) in self.released[w], (
                        f"{kind}{i} overwrites slot {s} before warpgroup {w} released {kind}{i - STAGES}")
            self.slot[kind][s] = (i, False)
            self.in_flight.append((kind, s, i))
        elif op[0] == "q_load":
            _, w, t = op
            self.qbuf[w] = (t, False)
            self.in_flight.append(("q", w, t))
        elif op[0] == "read_q":
            _, w, t = op
            assert self.qbuf[w] == (t, True), f"warpgroup {w} reads Q of tile {t}: buffer holds {self.qbuf[w]}"
            self.reads["q"][w] += 1
        elif op[0] == "read":
            _, w, kind, i = op
            assert self.slot[kind][i % STAGES] == (i, True), (
                f"warpgroup {w} reads {kind}{i}: slot holds {self.slot[kind][i % STAGES]}")
            self.reads[kind][w] += 1
        elif op[0] == "release":
            _, w, items, bar = op
            self.released[w].update(items)
            self._arrive(bar)


def _tile_sequences(n: int, seed: int):
    rng = random.Random(seed)
    return [[rng.choice([0, 1, 1, 2, 3, 4, 5, 7]) for _ in range(rng.randint(1, 6))] for _ in range(n)]


def test_the_persistent_protocol_holds_over_random_interleavings():
    for i, cnts in enumerate(_tile_sequences(300, seed=0)):
        reads = _Model(cnts, seed=i).run()
        # every listed K and V block reached both warpgroups, and Q once per S GEMM
        assert reads["k"] == reads["v"] == [sum(cnts)] * 2 and reads["q"] == [sum(cnts)] * 2


@pytest.mark.parametrize("mutation, message", [("drop_v_wait", "overwrites slot"), ("late_v_read", "reads v")])
def test_the_model_catches_a_broken_protocol(mutation, message):
    with pytest.raises(AssertionError, match=message):
        for i, cnts in enumerate(_tile_sequences(300, seed=1)):
            _Model(cnts, seed=i, **{mutation: True}).run()
