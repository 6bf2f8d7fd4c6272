"""The optional FlashAttention-4 engine: layout -> FA4 block tables (CPU, pure torch), what FA4 can express, the
engine's gathers around a stand-in for FA4, the per-shape engine choice, the fallback without flash-attn-4, and
the engine on the GPU (skipped without CUDA and flash-attn-4)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import sparse_dit.kernels as kernels
import sparse_dit.kernels.fa4 as fa4
import sparse_dit
from sparse_dit import Layout
from sparse_dit.kernels.reference import reference_attention


def random_block_mask(L: int, H: int, nb: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(L, H, nb, nb, generator=g) < density
    idx = torch.arange(nb)
    mask[:, :, idx, idx] = True  # every query block keeps a key block
    return mask


def permuted(base: Layout, seed: int, kv_pad: int = 0) -> Layout:
    """``base``'s segments behind random per-head permutations: q padded with -1 to whole blocks; the key order
    with ``kv_pad`` trailing -1 slots (never inside a segment when base's segments stay below S)."""
    g = torch.Generator().manual_seed(seed)
    L, H, NQ = base.kv_count.shape
    S = base.seq_len
    q_perm = torch.stack([torch.randperm(S, generator=g) for _ in range(L * H)]).view(L, H, S)
    q_perm = F.pad(q_perm, (0, NQ * base.block_q - S), value=-1)
    kv_perm = torch.stack([torch.randperm(S, generator=g) for _ in range(L * H)]).view(L, H, S)
    kv_perm = F.pad(kv_perm, (0, kv_pad), value=-1)
    return Layout(S, base.block_q, base.kv_count, base.kv_start, base.kv_end, q_perm=q_perm, kv_perm=kv_perm)


# ------------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("S", [1000, 1024])
@pytest.mark.parametrize("L", [1, 2])
def test_block_mask_layout_converts_exactly(S, L):
    nb = -(-S // 128)
    lay = Layout.from_block_mask(random_block_mask(L, 3, nb, 0.3, seed=S + L), 128, S)
    blocks = fa4.fa4_blocks(lay)
    assert isinstance(blocks, fa4.Fa4Blocks), blocks
    assert blocks.full_cnt.dtype == blocks.full_idx.dtype == torch.int32
    assert blocks.full_cnt.shape == (L, 3, nb) and blocks.full_idx.shape[:3] == (L, 3, nb)
    used = torch.arange(blocks.full_idx.shape[-1]) < blocks.full_cnt[..., None].long()
    idx = blocks.full_idx.long()
    ascending = (idx[..., 1:] > idx[..., :-1]) | ~used[..., 1:]
    assert bool(ascending.all()), "kept blocks must be listed in ascending order"
    assert torch.equal(blocks.to_dense_mask(S), lay.to_dense_mask())


def test_text_keys_and_dense_rows_as_whole_blocks_convert_exactly():
    S = 1000  # text: the last 104 tokens, from a block boundary to the end
    mask = random_block_mask(1, 2, 8, 0.25, seed=3)
    lay = Layout.from_block_mask(mask, 128, S, text_kv=(896, S), dense_q=(896, S))
    blocks = fa4.fa4_blocks(lay)
    assert isinstance(blocks, fa4.Fa4Blocks), blocks
    assert torch.equal(blocks.to_dense_mask(S), lay.to_dense_mask())


def test_permuted_layout_converts_exactly_with_gathers():
    S = 1000
    base = Layout.from_block_mask(random_block_mask(1, 2, 8, 0.3, seed=5), 128, S)
    lay = permuted(base, seed=0)
    blocks = fa4.fa4_blocks(lay)
    assert isinstance(blocks, fa4.Fa4Blocks), blocks
    assert blocks.q_gather is not None and blocks.kv_gather is not None and blocks.q_len == 1024
    assert blocks.q_gather.shape == (1, 1024, 2)  # per-head permutations stay per head
    assert torch.equal(blocks.to_dense_mask(S), lay.to_dense_mask())
    # padded key slots after the last key: the segment ending at S ends inside a block that holds padding
    out = fa4.fa4_blocks(permuted(base, seed=0, kv_pad=24))
    assert isinstance(out, str) and "not aligned" in out


def test_query_blocks_of_256_over_key_blocks_of_128():
    S = 1000
    nb = 4  # query blocks of 256
    count = torch.tensor([[[1, 2, 1, 1]]])
    start = torch.tensor([[[[0, 0], [128, 640], [256, 0], [768, 0]]]])
    end = torch.tensor([[[[384, 0], [256, 1000], [640, 0], [1000, 0]]]])
    lay = Layout(S, 256, count, start, end).validate()
    blocks = fa4.fa4_blocks(lay)
    assert isinstance(blocks, fa4.Fa4Blocks), blocks
    assert blocks.full_cnt.shape == (1, 1, nb)
    assert torch.equal(blocks.to_dense_mask(S), lay.to_dense_mask())


@pytest.mark.parametrize(
    "case, reason",
    [
        ("block64", "multiple of 128"),
        ("misaligned", "not aligned"),
        ("pad_in_segment", "padded slots"),
        ("dense_q_perm", "dense query rows with a token permutation"),
        ("text_misaligned", "text_kv"),
        ("text_valid", "prompt padding"),
    ],
)
def test_layouts_fa4_cannot_express_give_a_reason(case, reason):
    S = 1000
    base = Layout.from_block_mask(random_block_mask(1, 2, 8, 0.3, seed=7), 128, S)
    if case == "block64":
        lay = Layout.from_block_mask(random_block_mask(1, 2, 16, 0.3, seed=7), 64, S)
    elif case == "misaligned":
        lay = Layout(S, 128, base.kv_count, base.kv_start + (base.kv_start > 0).int() * 3, base.kv_end)
    elif case == "pad_in_segment":
        lay = permuted(base, seed=1)
        kv_perm = lay.kv_perm.clone()
        kv_perm[..., 0] = -1  # token kv_perm[0] is lost to the key order: allowed by Layout, a padded slot in a segment
        lay = Layout(S, 128, lay.kv_count, lay.kv_start, lay.kv_end, q_perm=lay.q_perm, kv_perm=kv_perm)
        full = torch.ones_like(lay.kv_count)
        lay = Layout(S, 128, full, torch.zeros_like(lay.kv_start[..., :1]), torch.full_like(lay.kv_end[..., :1], S),
                     q_perm=lay.q_perm, kv_perm=kv_perm)
    elif case == "dense_q_perm":
        p = permuted(base, seed=2)
        lay = Layout(S, 128, p.kv_count, p.kv_start, p.kv_end, q_perm=p.q_perm, dense_q=(896, S))
    elif case == "text_misaligned":
        lay = Layout(S, 128, base.kv_count, base.kv_start.clamp(max=900), base.kv_end.clamp(max=900), text_kv=(900, S))
    else:
        lay = Layout.from_block_mask(random_block_mask(1, 2, 8, 0.3, seed=7), 128, S, text_kv=(896, S))
        lay = lay.with_text_valid(torch.tensor([50]))
    out = fa4.fa4_blocks(lay)
    assert isinstance(out, str) and reason in out, out


# ------------------------------------------------------------------ the engine around a stand-in for FA4
class Tables(NamedTuple):  # the fields of FA4's BlockSparseTensorsTorch that the engine fills
    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor | None = None
    full_block_idx: torch.Tensor | None = None
    block_size: tuple[int, int] | None = None


def stand_in(calls: list) -> SimpleNamespace:
    """A pure-torch function with FA4's call signature and semantics (full blocks only, sequence end masked)."""

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, block_sparse_tensors=None, return_lse=False, **kw):
        calls.append(dict(shape=tuple(q.shape), sparse=block_sparse_tensors is not None, strides=q.stride()))
        B, Sq, H, D = q.shape
        Sk = k.shape[1]
        scale = D**-0.5 if softmax_scale is None else softmax_scale
        scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
        if block_sparse_tensors is not None:
            t = block_sparse_tensors
            assert int(t.mask_block_cnt.max()) == 0 and t.full_block_cnt.dtype == torch.int32
            bq, bk = t.block_size
            nkb = -(-Sk // bk)
            used = torch.arange(t.full_block_idx.shape[-1]) < t.full_block_cnt[..., None].long()
            blocks = torch.zeros(*t.full_block_cnt.shape, nkb + 1, dtype=torch.bool)
            blocks.scatter_(-1, torch.where(used, t.full_block_idx.long(), nkb), True)
            mask = blocks[..., :nkb].repeat_interleave(bq, 2)[:, :, :Sq].repeat_interleave(bk, 3)[..., :Sk]
            scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, -1)
        p = torch.exp(scores - lse.nan_to_num(neginf=0)[..., None]).nan_to_num(0)
        out = torch.einsum("bhqk,bkhd->bqhd", p, v.double()).to(q.dtype).contiguous()  # FA4 allocates (B, S, H, D)
        return out, (lse.float() if return_lse else None)

    return SimpleNamespace(flash_attn_func=flash_attn_func, BlockSparseTensorsTorch=Tables)


@pytest.mark.parametrize("kind", ["plain", "perm", "text_dense", "per_batch"])
def test_engine_equals_the_reference_around_a_stand_in(monkeypatch, kind):
    calls: list = []
    monkeypatch.setattr(fa4, "fa4_interface", lambda: stand_in(calls))
    S, H, D = 1000, 2, 16
    B = 2
    L = 2 if kind == "per_batch" else 1
    kw = dict(text_kv=(896, S), dense_q=(896, S)) if kind == "text_dense" else {}
    lay = Layout.from_block_mask(random_block_mask(L, H, 8, 0.3, seed=11), 128, S, **kw)
    if kind == "perm":
        lay = permuted(lay, seed=4)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, generator=g) for _ in range(3))
    out, lse = fa4.fa4_block_sparse_attention(q, k, v, lay, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, lay, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert out.shape == (B, S, H, D) and out.is_contiguous()
    assert calls and calls[0]["sparse"] and calls[0]["shape"][1] == (1024 if kind == "perm" else S)


def test_packed_tile_runs_on_the_engine_where_plain_tile_cannot(monkeypatch):
    """At a grid that is not a multiple of the tile, plain tile layouts have key segments inside blocks (FA4 refuses
    them); packed ones are whole blocks and run on the engine, equal to the reference."""
    from sparse_dit.geometry import Geometry
    from sparse_dit.patterns import tile

    g = Geometry(1, 2, 16, 5, 10, 14)  # 700 tokens; default tile for blocks of 128 cuts at every border
    plain = tile.build(g, 2, 128, "cpu", window=(1, 1, 2))
    assert isinstance(fa4.fa4_blocks(plain), str)
    lay = tile.build(g, 2, 128, "cpu", window=(1, 1, 2), packed=True)
    blocks = fa4.fa4_blocks(lay)
    assert isinstance(blocks, fa4.Fa4Blocks), blocks
    assert torch.equal(blocks.to_dense_mask(g.seq_len), lay.to_dense_mask())
    # one token order for every head: kept as one row index, so the engine copies whole rows
    assert blocks.q_gather.shape == (1, lay.q_order_len, 1) and blocks.kv_gather.shape == (1, g.seq_len, 1)
    monkeypatch.setattr(fa4, "fa4_interface", lambda: stand_in([]))
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, g.seq_len, 2, 16, generator=gen) for _ in range(3))
    out, lse = fa4.fa4_block_sparse_attention(q, k, v, lay, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, lay, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_engine_refuses_what_it_cannot_express_and_needs_flash_attn(monkeypatch):
    lay = Layout.from_block_mask(random_block_mask(1, 2, 16, 0.3, seed=1), 64, 1000)
    q = torch.randn(1, 1000, 2, 16)
    monkeypatch.setattr(fa4, "fa4_interface", lambda: None)
    with pytest.raises(RuntimeError, match="flash-attn-4 is not installed"):
        fa4.fa4_block_sparse_attention(q, q, q, lay)
    monkeypatch.setattr(fa4, "fa4_interface", lambda: stand_in([]))
    with pytest.raises(ValueError, match="cannot express this layout"):
        fa4.fa4_block_sparse_attention(q, q, q, lay)


# ------------------------------------------------------------------------------------ fallback, choice
def test_without_flash_attn_the_engine_is_absent_and_nothing_breaks():
    fa4.fa4_interface.cache_clear()
    try:
        import flash_attn.cute.interface  # noqa: F401
    except Exception:
        assert not fa4.fa4_available()
        q = torch.randn(1, 256, 2, 64)
        lay = Layout.from_block_mask(random_block_mask(1, 2, 2, 0.5, seed=0), 128, 256)
        assert not fa4.fa4_sparse_supported(q, lay)
        assert not fa4.fa4_dense_supported(q, q, q)
        assert kernels.dense_engine(*(q.transpose(1, 2),) * 3) == "sdpa"
    else:
        pytest.skip("flash-attn-4 is installed here: the fallback is not reachable")


class FakeEvent:
    """A completed CUDA event stand-in whose elapsed time comes from a table."""

    clock = [0.0]

    def __init__(self, engine_of: list) -> None:
        self.engine_of = engine_of

    def record(self) -> None:
        self.t = FakeEvent.clock[0]

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "FakeEvent") -> float:
        return end.t - self.t


def test_engine_chooser_measures_then_keeps_the_faster(monkeypatch):
    """Alternates engines (first call of each discarded), then serves every call of the key on the faster one."""
    cost = {"triton": 3.0, "fa4": 2.0}
    ran: list[str] = []
    chooser = kernels.EngineChooser(trials=2)

    def run(engine, q, k, v, layout, scale, return_lse):
        ran.append(engine)
        FakeEvent.clock[0] += cost[engine] + (100.0 if ran.count(engine) == 1 else 0.0)  # first call compiles
        return q

    monkeypatch.setattr(chooser, "_run", run)
    monkeypatch.setattr(chooser, "_new_event", lambda: FakeEvent([]))
    monkeypatch.setattr(fa4, "fa4_sparse_supported", lambda q, layout: True)
    q = torch.randn(1, 256, 2, 64)
    lay = Layout.from_block_mask(random_block_mask(1, 2, 2, 0.5, seed=0), 128, 256)
    for _ in range(6):  # 3 calls each: one discarded, two kept
        chooser(q, q, q, lay)
    assert sorted(ran) == ["fa4"] * 3 + ["triton"] * 3
    for _ in range(4):
        chooser(q, q, q, lay)
    assert ran[6:] == ["fa4"] * 4
    assert list(chooser.chosen.values()) == ["fa4"]
    # another density bucket is another key: measured again
    lay2 = Layout.from_block_mask(torch.ones(1, 2, 2, 2, dtype=torch.bool), 128, 256)
    chooser(q, q, q, lay2)
    assert len(chooser._runs) == 1


def test_engine_chooser_falls_back_to_triton(monkeypatch):
    ran: list[str] = []
    q = torch.randn(1, 256, 2, 64)
    lay = Layout.from_block_mask(random_block_mask(1, 2, 2, 0.5, seed=0), 128, 256)

    def run(engine, *a):
        ran.append(engine)
        if engine == "fa4":
            raise RuntimeError("no kernel for this GPU")
        return q

    # FA4 absent or not able to express the layout: Triton, no timing
    chooser = kernels.EngineChooser()
    monkeypatch.setattr(chooser, "_run", run)
    monkeypatch.setattr(fa4, "fa4_sparse_supported", lambda q, layout: False)
    chooser(q, q, q, lay)
    assert ran == ["triton"] and not chooser._runs
    # FA4 preferred but failing: one warning, Triton from then on
    monkeypatch.setattr(fa4, "fa4_sparse_supported", lambda q, layout: True)
    chooser = kernels.EngineChooser(prefer="fa4")
    monkeypatch.setattr(chooser, "_run", run)
    with pytest.warns(RuntimeWarning, match="FA4 engine failed"):
        chooser(q, q, q, lay)
    chooser(q, q, q, lay)
    assert ran[1:] == ["fa4", "triton", "triton"]
    assert chooser.calls == {"triton": 2, "gluon": 0, "fa4": 0}  # the failed FA4 attempt is not counted as an FA4 call
    with pytest.raises(ValueError, match="prefer"):
        kernels.EngineChooser(prefer="flash")


def test_engine_chooser_measures_every_engine_that_can_run_the_call(monkeypatch):
    """With the Gluon and FA4 engines both able to run a call, all three engines are measured and the fastest kept;
    a layout only Triton and Gluon can run is another key, measured between those two."""
    import sparse_dit.kernels.gluon_attention as ge

    cost = {"triton": 3.0, "gluon": 1.5, "fa4": 2.0}
    ran: list[str] = []
    chooser = kernels.EngineChooser(trials=2)

    def run(engine, q, k, v, layout, scale, return_lse):
        ran.append(engine)
        FakeEvent.clock[0] += cost[engine] + (100.0 if ran.count(engine) == 1 else 0.0)
        return q

    monkeypatch.setattr(chooser, "_run", run)
    monkeypatch.setattr(chooser, "_new_event", lambda: FakeEvent([]))
    fa4_ok = [True]
    monkeypatch.setattr(fa4, "fa4_sparse_supported", lambda q, layout: fa4_ok[0])
    monkeypatch.setattr(ge, "gluon_device_ok", lambda q: True)
    monkeypatch.setattr(ge, "gluon_sparse_supported", lambda q, layout: True)
    q = torch.randn(1, 256, 2, 64)
    lay = Layout.from_block_mask(random_block_mask(1, 2, 2, 0.5, seed=0), 128, 256)
    for _ in range(9):  # 3 calls each: one discarded, two kept
        chooser(q, q, q, lay)
    assert sorted(ran) == ["fa4"] * 3 + ["gluon"] * 3 + ["triton"] * 3
    chooser(q, q, q, lay)
    assert ran[-1] == "gluon" and list(chooser.chosen.values()) == ["gluon"]
    # FA4 cannot run this call: a key of its own, Triton against Gluon only
    fa4_ok[0] = False
    ran.clear()
    for _ in range(6):
        chooser(q, q, q, lay)
    assert sorted(ran) == ["gluon"] * 3 + ["triton"] * 3
    assert chooser.calls == {"triton": 6, "gluon": 7, "fa4": 3}


def test_engine_chooser_gluon_failure_and_preference(monkeypatch):
    """A failing Gluon engine is said once, forgotten from the chosen keys, and Triton serves; prefer="gluon" runs
    Gluon wherever it can, and where it cannot, the measured choice among the others."""
    import sparse_dit.kernels.gluon_attention as ge

    ran: list[str] = []
    fail = {"gluon"}

    def run(engine, *a):
        ran.append(engine)
        if engine in fail:
            raise RuntimeError("gluon compile error")
        return a[0]

    monkeypatch.setattr(fa4, "fa4_sparse_supported", lambda q, layout: False)
    monkeypatch.setattr(ge, "gluon_device_ok", lambda q: True)
    monkeypatch.setattr(ge, "gluon_sparse_supported", lambda q, layout: True)
    q = torch.randn(1, 256, 2, 64)
    lay = Layout.from_block_mask(random_block_mask(1, 2, 2, 0.5, seed=0), 128, 256)
    chooser = kernels.EngineChooser(prefer="gluon")
    monkeypatch.setattr(chooser, "_run", run)
    with pytest.warns(RuntimeWarning, match="Gluon engine failed"):
        chooser(q, q, q, lay)
    chooser(q, q, q, lay)  # Gluon is not asked again; with no other engine left, Triton without measuring
    assert ran == ["gluon", "triton", "triton"] and not chooser._runs
    assert chooser.calls == {"triton": 2, "gluon": 0, "fa4": 0} and "gluon" in chooser.failures
    fail.clear()
    ran.clear()
    chooser = kernels.EngineChooser(prefer="gluon")
    monkeypatch.setattr(chooser, "_run", run)
    chooser(q, q, q, lay)
    assert ran == ["gluon"]
    # where Gluon cannot run, prefer="gluon" is "auto": here only Triton remains
    monkeypatch.setattr(ge, "gluon_sparse_supported", lambda q, layout: "head dim 64 (the Gluon engine needs 128)")
    chooser(q, q, q, lay)
    assert ran == ["gluon", "triton"]
    # on a machine without a Hopper GPU the Gluon engine is never a candidate, whatever the layout
    monkeypatch.undo()
    assert kernels.EngineChooser().candidates(q, lay) == ("triton",)


def test_patch_accepts_the_gluon_backend():
    from conftest import make_wan_transformer, wan_inputs

    model = make_wan_transformer(heads=2, head_dim=16, layers=1)
    x, t, text = wan_inputs(frames=4, height=8, width=8)
    with torch.no_grad():
        ref = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    sparse_dit.patch(model, pattern={"name": "tile", "window": (2, 2, 2)}, block_size=16, backend="gluon")
    try:
        assert sparse_dit.patch_state(model).engines.prefer == "gluon"
        with torch.no_grad():  # on the CPU: the reference backend, as "auto"
            out = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        assert out.shape == ref.shape and out.isfinite().all()
    finally:
        sparse_dit.unpatch(model)
    with pytest.raises(ValueError, match="backend"):
        sparse_dit.patch(model, pattern="dense", backend="gluon2")


@pytest.mark.parametrize("backend", ["auto", "fa4", "gluon"])
def test_planned_layouts_skip_the_engine_choice_under_auto(monkeypatch, backend):
    """A patched model hands static layouts to the engine chooser; layouts of dynamic heads (planned per call) go to
    Triton directly under "auto" (converting each plan to FA4 tables would sync the host), to the chooser under "fa4"."""
    import sparse_dit.patching as patching
    from conftest import make_wan_transformer, wan_inputs

    seen: list[bool] = []  # per sparse call: was the engine chooser given

    def run_backend(name, engines=None):
        def run(q, k, v, layout, scale=None):
            seen.append(engines is not None)
            return reference_attention(q, k, v, layout, scale=scale)

        return run

    monkeypatch.setattr(patching, "choose_backend", lambda name, q, needs_grad: ("triton", None))
    monkeypatch.setattr(patching, "_run_backend", run_backend)
    model = make_wan_transformer(heads=2, head_dim=16, layers=2)
    x, t, text = wan_inputs(frames=4, height=8, width=8)
    expected = {"tile": True, "kmeans": backend != "auto"}
    for name, chooser_given in expected.items():
        seen.clear()
        params = {"window": (2, 2, 2)} if name == "tile" else {}
        sparse_dit.patch(model, pattern={"name": name, **params}, block_size=16, backend=backend)
        try:
            with torch.no_grad():
                model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)
        finally:
            sparse_dit.unpatch(model)
        assert len(seen) == 2, (name, seen)  # one sparse call per layer
        assert all(given == chooser_given for given in seen), (name, backend, seen)


# ------------------------------------------------------------------------------------------------- GPU
def _gpu_fa4_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if not fa4.fa4_available():
        return "needs flash-attn-4 (pip install 'sparse-dit[fa4]')"
    if fa4.fa4_query_granule(torch.empty(1, device="cuda")) != 128:
        return "block-sparse FA4 with query blocks of 128 needs Hopper"
    return None


@pytest.mark.skipif(_gpu_fa4_reason() is not None, reason=str(_gpu_fa4_reason()))
@pytest.mark.parametrize("perm", [False, True])
def test_fa4_engine_equals_triton_and_masked_sdpa_on_the_gpu(perm):
    from sparse_dit.kernels.triton_attention import triton_block_sparse_attention

    S, H, D = 4000, 4, 128
    nb = -(-S // 128)
    lay = Layout.from_block_mask(random_block_mask(1, H, nb, 0.2, seed=0), 128, S)
    if perm:
        lay = permuted(lay, seed=1)
    lay = lay.to("cuda")
    q, k, v = (torch.randn(2, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        out, lse = fa4.fa4_block_sparse_attention(q, k, v, lay, return_lse=True)
        tri, tri_lse = triton_block_sparse_attention(q, k, v, lay, return_lse=True)
        mask = lay.to_dense_mask()
        sd = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask).transpose(1, 2)
    for ref in (tri, sd):
        assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
    assert float((lse - tri_lse).abs().max()) < 1e-2
