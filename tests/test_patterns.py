"""Tests of the tile, radial, kmeans and prune patterns.

Every layout is compared with a token-level mask that the test builds itself from the pattern's
definition (tile coordinates, frame-distance rule, cluster labels, kept set), on small odd grids where
the sequence is not a multiple of the query block, with and without text tokens.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from sparse_dit.geometry import Geometry
from sparse_dit.kernels import reference_attention
from sparse_dit.layout import Layout
from sparse_dit.patterns import PatternSpec, kmeans, prune, radial, tile
from sparse_dit.patterns._tiling import default_tile

TEXTS = [(0, "none"), (3, "first"), (4, "last")]


def geom(text: tuple[int, str] = (0, "none"), grid=(5, 7, 9), batch: int = 1, heads: int = 2) -> Geometry:
    return Geometry(batch, heads, 16, *grid, text_len=text[0], text_position=text[1])


def coords(g: Geometry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence position: frame, row, column (-1 for text) and is_video."""
    S, v0 = g.seq_len, g.video_start
    f = torch.full((S,), -1)
    y = torch.full((S,), -1)
    x = torch.full((S,), -1)
    v = torch.arange(g.video_len)
    P = g.height * g.width
    f[v0 : v0 + g.video_len] = v // P
    y[v0 : v0 + g.video_len] = (v % P) // g.width
    x[v0 : v0 + g.video_len] = v % g.width
    return f, y, x, f >= 0


def with_text(g: Geometry, video_mask: torch.Tensor) -> torch.Tensor:
    """(S, S) mask: the given video-video rule, text rows and columns all True."""
    *_, is_v = coords(g)
    return video_mask & is_v[:, None] & is_v[None, :] | ~is_v[:, None] | ~is_v[None, :]


def check(layout: Layout, expected: torch.Tensor) -> None:
    """layout validates, its token mask equals ``expected`` (L, H, S, S) or (S, S), density = mask mean."""
    layout.validate()
    got = layout.to_dense_mask()
    if expected.dim() == 2:
        expected = expected.expand_as(got)
    assert got.shape == expected.shape
    assert torch.equal(got, expected), f"{int((got != expected).sum())} entries differ"
    assert layout.density == pytest.approx(expected.double().mean().item(), abs=1e-9)


def qkv(g: Geometry, heads: int, seed: int = 0, batch: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch or g.batch, g.seq_len, heads, 16)
    return tuple(torch.randn(shape, generator=gen) for _ in range(3))


def dense_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


# ------------------------------------------------------------------------------------------------ tile
def tile_mask(g: Geometry, t: tuple[int, int, int], window: tuple[int, int, int]) -> torch.Tensor:
    f, y, x, _ = coords(g)
    tc = torch.stack([f // t[0], y // t[1], x // t[2]], 1)  # tile coordinates per token
    n = [-(-d // s) for d, s in zip(g.grid, t)]
    ok = torch.ones(g.seq_len, g.seq_len, dtype=torch.bool)
    for dim in range(3):
        lo = (tc[:, dim] - (window[dim] - 1) // 2).clamp(min=0).clamp(max=n[dim] - window[dim])
        ok &= (tc[None, :, dim] >= lo[:, None]) & (tc[None, :, dim] < lo[:, None] + window[dim])
    return with_text(g, ok)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("block,t,window", [(16, (1, 4, 4), (3, 1, 2)), (16, (1, 4, 4), (2, 2, 1)), (32, (2, 3, 4), (1, 2, 2)), (16, (2, 3, 4), (2, 3, 2))])
def test_tile_mask(text, block, t, window):
    g = geom(text)
    lay = tile.build(g, 2, block, "cpu", window=window, tile=t)
    check(lay, tile_mask(g, t, window))
    assert lay.q_order_len % block == 0 and lay.density < 1


def packed_tile_mask(g: Geometry, t: tuple[int, int, int], window: tuple[int, int, int], block: int) -> torch.Tensor:
    """The packed tile rule from its definition: video tokens in tile order (tiles in raster order, raster order
    inside), cut into blocks of ``block``; a query block keeps a key block when some query of it has some key of it
    in its tile's window."""
    f, y, x, is_v = coords(g)
    n = [-(-d // s) for d, s in zip(g.grid, t)]
    video = torch.nonzero(is_v).squeeze(1)
    tile_id = ((f[video] // t[0]) * n[1] + y[video] // t[1]) * n[2] + x[video] // t[2]
    order = video[torch.sort(tile_id, stable=True).indices]  # sequence position of each packed slot
    V, nb = len(order), -(-len(order) // block)
    window_vv = tile_mask(g, t, window)[order][:, order]  # (V, V) in packed order
    padded = torch.zeros(nb * block, nb * block, dtype=torch.bool)
    padded[:V, :V] = window_vv
    kept = padded.view(nb, block, nb, block).any(3).any(1)  # (query block, key block)
    blk = torch.empty(g.seq_len, dtype=torch.long)
    blk[order] = torch.arange(V) // block
    ok = torch.zeros(g.seq_len, g.seq_len, dtype=torch.bool)
    ok[video[:, None], video[None, :]] = kept[blk[video]][:, blk[video]]
    return with_text(g, ok)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize(
    "grid,block,t,window",
    [((5, 7, 9), 16, (1, 4, 4), (3, 1, 2)), ((5, 7, 9), 16, (2, 3, 4), (2, 3, 2)), ((4, 10, 13), 32, (2, 4, 4), (1, 2, 3)),
     ((3, 6, 6), 16, (1, 4, 4), (3, 2, 2))],
)
def test_packed_tile_mask(text, grid, block, t, window):
    """Packed: no query padding slots, whole key blocks, the windows of every tile a block overlaps (a superset of
    the tile window, so never less accurate); equal to masked SDPA."""
    g = geom(text, grid=grid)
    lay = tile.build(g, 2, block, "cpu", window=window, tile=t, packed=True)
    check(lay, packed_tile_mask(g, t, window, block))
    got = lay.to_dense_mask()[0, 0]
    assert bool((got | ~tile_mask(g, t, window)).all()), "the packed layout dropped keys of the tile window"
    assert lay.q_order_len == -(-g.video_len // block) * block  # only the last block is partial
    assert ((lay.kv_start % block == 0) | (torch.arange(lay.kv_start.shape[-1]) >= lay.kv_count[..., None])).all()
    assert ((lay.kv_end % block == 0) | (lay.kv_end == g.video_len) | (torch.arange(lay.kv_end.shape[-1]) >= lay.kv_count[..., None])).all()
    q, k, v = qkv(g, 2, seed=sum(grid))
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=got).transpose(1, 2)
    torch.testing.assert_close(reference_attention(q, k, v, lay), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", [(4, 8, 8), (1, 8, 16)])
def test_packed_tile_equals_plain_tile_when_tiles_are_whole_blocks(grid):
    """On a grid the tile divides, with one tile per query block, packing changes nothing (video and image grids)."""
    g = geom(grid=grid)
    t = default_tile(16, grid)
    window = (min(3, -(-grid[0] // t[0])), 1, 1)
    plain = tile.build(g, 2, 16, "cpu", window=window)
    packed = tile.build(g, 2, 16, "cpu", window=window, packed=True)
    assert torch.equal(plain.to_dense_mask(), packed.to_dense_mask())
    assert packed.q_order_len == plain.q_order_len == g.video_len


def test_packed_tile_spec_and_label():
    from sparse_dit.commands.inspect import short_label

    assert PatternSpec("tile", window=(1, 2, 3)).key() == PatternSpec("tile", window=(1, 2, 3), packed=False).key()
    packed = PatternSpec("tile", window=(1, 2, 3), packed=True)
    assert packed.key() != PatternSpec("tile", window=(1, 2, 3)).key()
    assert short_label(packed) == "tile1x2x3p"
    with pytest.raises(ValueError, match="packed"):
        PatternSpec("tile", window=(1, 2, 3), packed="yes")


def test_tile_default_shape_and_blocks():
    assert default_tile(128, (21, 30, 52)) == (2, 8, 8)
    assert default_tile(16, (5, 7, 9)) == (1, 4, 4)
    assert default_tile(64, (21, 30, 52)) == (1, 8, 8)
    assert default_tile(128, (1, 64, 64)) == (1, 8, 16)  # images: flat tiles
    g = geom((3, "first"))
    lay = tile.build(g, 1, 16, "cpu", window=(3, 1, 1))
    # with the default tile (16 tokens) every query block is one tile: its rows share one tile coordinate
    rows = lay.q_perm[0, 0].view(-1, 16)
    f, y, x, _ = coords(g)
    for r in rows:
        r = r[r >= 0]
        tc = torch.stack([f[r] // 1, y[r] // 4, x[r] // 4], 1)
        assert (tc == tc[0]).all()
    check(lay, tile_mask(g, (1, 4, 4), (3, 1, 1)))
    # same number of key tiles for every query tile, even at the borders (window shifted, not cut)
    big = Geometry(1, 1, 16, 6, 16, 16)
    lay = tile.build(big, 1, 16, "cpu", window=(3, 3, 3))
    keys = lay.key_mask(0, 0, torch.arange(lay.num_q_blocks)).sum(1)
    assert (keys == 27 * 16).all()


@pytest.mark.parametrize("text", TEXTS)
def test_tile_full_window_is_dense(text):
    g = geom(text)
    lay = tile.build(g, 2, 16, "cpu", window=(5, 2, 3))  # default tile 1x4x4 -> tile grid 5x2x3
    assert lay.density == pytest.approx(1.0)
    q, k, v = qkv(g, 2)
    torch.testing.assert_close(reference_attention(q, k, v, lay), dense_sdpa(q, k, v), atol=1e-5, rtol=1e-5)


def test_tile_bad_params():
    with pytest.raises(ValueError, match="window"):
        PatternSpec("tile", window=(3, 0, 3))
    with pytest.raises(ValueError, match="window"):
        PatternSpec("tile", window=(3, 3))
    with pytest.raises(ValueError, match="larger than the tile grid"):
        tile.build(geom(), 1, 16, "cpu", window=(3, 3, 3))
    with pytest.raises(ValueError, match="larger than the tile grid"):
        tile.check_params(geom(), window=(6, 1, 1), tile=(1, 4, 4))


def test_tile_default_window_is_cut_to_small_grids():
    g = geom()
    counts = tuple(-(-n // t) for n, t in zip(g.grid, (1, 4, 4)))
    default = tile.build(g, 1, 16, "cpu")
    explicit = tile.build(g, 1, 16, "cpu", window=tuple(min(3, c) for c in counts))
    assert torch.equal(default.to_dense_mask(), explicit.to_dense_mask())
    assert default.density < 1


# ---------------------------------------------------------------------------------------------- radial
def _share(d: int, decay: float) -> float:
    return decay / 2 ** d.bit_length()


def radial_band_mask(g: Geometry, block: int, decay: float, sinks: int, min_window: int) -> torch.Tensor:
    V, P = g.video_len, g.height * g.width
    fr, s = torch.arange(V) // P, torch.arange(V) % P
    tok = torch.zeros(V, V, dtype=torch.bool)
    for i in range(g.frames):
        for j in range(g.frames):
            d = abs(i - j)
            width = P * _share(d, decay)
            if width < min_window:
                kept, half = d % math.floor(min_window / width) == 0, min_window
            else:
                kept, half = True, math.floor(width)
            qi, kj = fr == i, fr == j
            near = (s[:, None] - s[None, :]).abs() <= half
            rule = near & kept if (d > 0 and j >= sinks) else torch.ones_like(near)
            tok |= rule & qi[:, None] & kj[None, :]
    # a query block (block_q consecutive video tokens) attends the union of its rows' keys
    blk = torch.arange(V) // block
    union = torch.stack([tok[blk == b].any(0) for b in range(int(blk.max()) + 1)])
    tok = union[blk]
    out = torch.zeros(g.seq_len, g.seq_len, dtype=torch.bool)
    v0 = g.video_start
    out[v0 : v0 + V, v0 : v0 + V] = tok
    return with_text(g, out)


def radial_tile2d_mask(g: Geometry, t: tuple[int, int, int], decay: float, sinks: int) -> torch.Tensor:
    f, y, x, is_v = coords(g)
    nf, nh, nw = (-(-d // s) for d, s in zip(g.grid, t))
    T = nf * nh * nw
    tc = [(a, b, c) for a in range(nf) for b in range(nh) for c in range(nw)]
    tmask = torch.zeros(T, T, dtype=torch.bool)
    for qi, (a, b, c) in enumerate(tc):
        for ki, (a2, b2, c2) in enumerate(tc):
            d = abs(a - a2)
            if d == 0 or a2 * t[0] < sinks:
                tmask[qi, ki] = True
                continue
            area = nh * nw * _share(d, decay)
            if area < 1:
                if d % math.floor(1 / area):
                    continue
                area = 1.0
            side = min(1.0, math.sqrt(area / (nh * nw)))
            ok = True
            for center, other, n in ((b, b2, nh), (c, c2, nw)):
                w = min(n, max(1, math.ceil(n * side - 1e-9)))
                lo = min(max(center - (w - 1) // 2, 0), n - w)
                ok &= lo <= other < lo + w
            tmask[qi, ki] = ok
    tid = ((f // t[0]) * nh + y // t[1]) * nw + x // t[2]
    out = tmask[tid.clamp(min=0)][:, tid.clamp(min=0)]
    return with_text(g, out)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("decay,sinks,block", [(1.0, 1, 16), (0.5, 0, 32), (2.0, 2, 16)])
def test_radial_band_mask(text, decay, sinks, block):
    g = geom(text, grid=(7, 5, 9))
    lay = radial.build(g, 2, block, "cpu", variant="band", decay=decay, sinks=sinks)
    check(lay, radial_band_mask(g, block, decay, sinks, block))
    assert lay.density < 1


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("decay,sinks,block", [(1.0, 1, 16), (0.25, 0, 16), (1.0, 2, 32)])
def test_radial_tile2d_mask(text, decay, sinks, block):
    g = geom(text, grid=(9, 9, 11))
    lay = radial.build(g, 1, block, "cpu", decay=decay, sinks=sinks)  # default variant: tile2d
    check(lay, radial_tile2d_mask(g, default_tile(block, g.grid), decay, sinks))
    assert lay.density < 1


def test_radial_decays_with_distance_and_full_decay_is_dense():
    g = Geometry(1, 1, 16, 17, 16, 16)
    lay = radial.build(g, 1, 16, "cpu", variant="band", decay=1.0, sinks=0)
    m = lay.to_dense_mask()[0, 0].view(17, 256, 17, 256).float().mean((1, 3))
    near, far = m.diagonal(1).mean(), m.diagonal(12).mean()
    assert far < near / 2  # density falls with frame distance
    assert radial.build(g, 1, 16, "cpu", decay=0.5).density < radial.build(g, 1, 16, "cpu", decay=2.0).density
    for text in TEXTS:
        gt = geom(text)
        q, k, v = qkv(gt, 2, seed=1)
        for variant in ("band", "tile2d"):
            lay = radial.build(gt, 2, 16, "cpu", variant=variant, decay=1e6)
            assert lay.density == pytest.approx(1.0)
            torch.testing.assert_close(reference_attention(q, k, v, lay), dense_sdpa(q, k, v), atol=1e-5, rtol=1e-5)


def test_radial_bad_params():
    with pytest.raises(ValueError, match="decay must be a positive"):
        PatternSpec("radial", decay=0)
    with pytest.raises(ValueError, match="variant must be one of"):
        PatternSpec("radial", variant="spiral")
    with pytest.raises(ValueError, match="sinks"):
        PatternSpec("radial", sinks=-1)
    with pytest.raises(ValueError, match="applies to variant='band' only"):
        PatternSpec("radial", min_window=64)


# ---------------------------------------------------------------------------------------------- kmeans
def kmeans_mask(g: Geometry, st: dict, block: int, mode: str) -> torch.Tensor:
    """(H, S, S) from the cluster labels and kept clusters in ``st`` (one batch element)."""
    ql, kl, keep = st["q_labels"].long(), st["k_labels"].long(), st["keep"]
    H, V = ql.shape
    v0 = g.video_start
    out = torch.zeros(H, g.seq_len, g.seq_len, dtype=torch.bool)
    for h in range(H):
        if mode == "pad":
            rows_keep = keep[h][ql[h]]  # (V, Ck): each query exactly its cluster's selection
        else:
            order = torch.sort(ql[h], stable=True).indices
            rows_keep = torch.zeros(V, keep.shape[-1], dtype=torch.bool)
            for b0 in range(0, V, block):
                rows = order[b0 : b0 + block]
                rows_keep[rows] = keep[h][ql[h][rows]].any(0)
        out[h, v0 : v0 + V, v0 : v0 + V] = rows_keep[:, kl[h]]
    return with_text(g, out)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("mode,block", [("union", 16), ("pad", 16), ("union", 32)])
def test_kmeans_mask(text, mode, block):
    g = geom(text, batch=2)
    q, k, v = qkv(g, 2, seed=2)
    state: dict = {}
    lay = kmeans.build(g, 2, block, "cpu", q=q, k=k, state=state, q_clusters=5, k_clusters=9, top_p=0.6, q_mode=mode,
                       kv_align=1, record=True)
    assert lay.batch == 2 and set(state) == {0, 1}
    expected = torch.stack([kmeans_mask(g, state[b], block, mode) for b in range(2)])
    check(lay, expected)
    assert lay.density < 1
    # tokens are sorted by cluster in both orders
    for b in range(2):
        kl = state[b]["k_labels"].long()
        perm = lay.kv_perm[b].long() - g.video_start
        assert (kl.gather(1, perm).diff(dim=1) >= 0).all()


def test_kmeans_selection_rule():
    gen = torch.Generator().manual_seed(3)
    qc, kc = torch.randn(1, 3, 8, generator=gen), torch.randn(1, 6, 8, generator=gen)
    sizes = torch.tensor([[5, 0, 9, 2, 7, 1]])
    keep = kmeans.select_clusters(qc, kc, sizes, top_p=0.7, min_fraction=0.0, scale=0.5)
    for a in range(3):
        w = [sizes[0, c].item() * math.exp(0.5 * float(qc[0, a] @ kc[0, c])) for c in range(6)]
        p = [x / sum(w) for x in w]
        order = sorted(range(6), key=lambda c: -p[c])
        want, mass = set(), 0.0
        for c in order:
            if mass < 0.7 and sizes[0, c] > 0:
                want.add(c)
            mass += p[c]
        assert {c for c in range(6) if keep[0, a, c]} == want
    # min_fraction forces enough keys even with a tiny top_p
    keep = kmeans.select_clusters(qc, kc, sizes, top_p=1e-6, min_fraction=0.5, scale=0.5)
    assert ((keep.float() * sizes[:, None, :]).sum(-1) >= 12).all()


def test_kmeans_top_p_one_is_dense_and_batch2():
    for text in TEXTS:
        g = geom(text, batch=2)
        q, k, v = qkv(g, 2, seed=4)
        lay = kmeans.build(g, 2, 16, "cpu", q=q, k=k, state={}, q_clusters=4, k_clusters=7, top_p=1.0)
        assert lay.density == pytest.approx(1.0)
        torch.testing.assert_close(reference_attention(q, k, v, lay), dense_sdpa(q, k, v), atol=1e-5, rtol=1e-5)
    # batch 2: each element gets its own layout; the batched call equals per-element calls of its layout
    g = geom((3, "first"), batch=2)
    q, k, v = qkv(g, 2, seed=5)
    q[1] = q[1].flip(0) * 2  # make the two elements differ
    lay = kmeans.build(g, 2, 16, "cpu", q=q, k=k, state={}, q_clusters=5, k_clusters=8, top_p=0.5)
    assert lay.batch == 2 and not torch.equal(lay.to_dense_mask()[0], lay.to_dense_mask()[1])
    out = reference_attention(q, k, v, lay)
    for b in range(2):
        one = replace(lay, **{n: getattr(lay, n)[b : b + 1] for n in ("kv_count", "kv_start", "kv_end", "q_perm", "kv_perm")})
        torch.testing.assert_close(out[b : b + 1], reference_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], one))


def test_kmeans_inertia_matches_sklearn():
    from sklearn.cluster import KMeans

    gen = torch.Generator().manual_seed(6)
    for n, dim, c in ((1500, 16, 24), (2500, 32, 48)):
        centers = torch.randn(16, dim, generator=gen) * 3
        x = centers[torch.randint(0, 16, (n,), generator=gen)] + torch.randn(n, dim, generator=gen)
        cent, lab, _, _ = kmeans.kmeans(x[None], c, iters=100, tol=0.0)
        ours = float(kmeans.inertia(x[None], cent, lab))
        ref = KMeans(c, n_init=1, random_state=0).fit(x.numpy()).inertia_
        assert ours <= 1.05 * ref, (ours, ref)


def test_kmeans_cold_start_tokens_are_distinct_and_seeded():
    """A cold start begins from C distinct tokens drawn by seed: the same for the same seed, others for another."""
    rows = kmeans.init_rows(1000, 64, seed=3, device="cpu")
    assert rows.shape == (64,) and rows.unique().numel() == 64 and 0 <= int(rows.min()) and int(rows.max()) < 1000
    assert torch.equal(rows, kmeans.init_rows(1000, 64, seed=3, device="cpu"))
    assert not torch.equal(rows, kmeans.init_rows(1000, 64, seed=4, device="cpu"))
    x = torch.randn(3, 1000, 8)
    assert torch.equal(kmeans.sample_init(x, 64, seed=3), x[:, rows])
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans.sample_init(x, 1001)


def test_kmeans_warm_start_needs_fewer_iterations():
    g = Geometry(1, 2, 16, 4, 8, 8)
    gen = torch.Generator().manual_seed(7)
    centers = torch.randn(12, 16, generator=gen) * 2
    q = centers[torch.randint(0, 12, (1, g.seq_len, 2), generator=gen)] + 0.5 * torch.randn(1, g.seq_len, 2, 16, generator=gen)
    k = q.roll(3, 1) + 0.1
    state: dict = {}
    params = dict(q_clusters=8, k_clusters=16, iters=50, tol=0.0, warm_iters=50)  # converge, no cap
    kmeans.build(g, 2, 16, "cpu", q=q, k=k, state=state, **params)
    cold = state[0]["iters"]
    kmeans.build(g, 2, 16, "cpu", q=q + 0.01, k=k + 0.01, state=state, **params)
    warm = state[0]["iters"]
    assert warm[0] < cold[0] and warm[1] < cold[1] and max(warm) <= 3, (cold, warm)
    # by default a warm start runs at most warm_iters=2 Lloyd steps, however far the activations moved
    kmeans.build(g, 2, 16, "cpu", q=q.flip(1), k=k.flip(1), state=state, q_clusters=8, k_clusters=16, tol=0.0)
    assert max(state[0]["iters"]) <= 2


def test_kmeans_keeps_half_precision_centroids_for_half_activations():
    """Between calls the warm-start centroids take the activations' bytes (fp16/bf16), not fp32; a warm call from
    them converges as fast as from fp32 ones."""
    g = Geometry(1, 2, 16, 4, 8, 8)
    gen = torch.Generator().manual_seed(11)
    centers = torch.randn(12, 16, generator=gen) * 2
    q = centers[torch.randint(0, 12, (1, g.seq_len, 2), generator=gen)] + 0.5 * torch.randn(1, g.seq_len, 2, 16, generator=gen)
    k = q.roll(3, 1) + 0.1
    params = dict(q_clusters=8, k_clusters=16, iters=50, tol=0.0, warm_iters=50)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        state: dict = {}
        kmeans.build(g, 2, 16, "cpu", q=q.to(dtype), k=k.to(dtype), state=state, **params)
        assert state[0]["q_centroids"].dtype == state[0]["k_centroids"].dtype == dtype
        cold = state[0]["iters"]
        lay = kmeans.build(g, 2, 16, "cpu", q=(q + 0.01).to(dtype), k=(k + 0.01).to(dtype), state=state, **params)
        lay.validate()
        assert max(state[0]["iters"]) <= 3 and state[0]["iters"][0] < cold[0], (dtype, cold, state[0]["iters"])


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("align", [None, 8, 13])
def test_kmeans_aligned_segments_cover_the_exact_selection_with_whole_chunks(text, align):
    """kv_align snaps each query block's key segments outward to chunks of the sorted key order: a superset of
    the exact selection, every chunk touching a kept cluster, nothing else; attention equals masked SDPA."""
    g = geom(text, batch=2)
    q, k, v = qkv(g, 2, seed=12)
    params = dict(q_clusters=5, k_clusters=11, top_p=0.5, record=True)
    exact_state: dict = {}
    exact = kmeans.build(g, 2, 16, "cpu", q=q, k=k, state=exact_state, kv_align=1, **params)
    state: dict = {}
    lay = kmeans.build(g, 2, 16, "cpu", q=q, k=k, state=state, kv_align=align, **params)
    step = align or 16  # default: the query block
    assert torch.equal(lay.kv_perm, exact.kv_perm) and torch.equal(lay.q_perm, exact.q_perm)
    mask, exact_mask = lay.to_dense_mask(), exact.to_dense_mask()
    assert (mask | exact_mask).equal(mask) and lay.density >= exact.density
    V = g.video_len
    NC = -(-V // step)
    for b in range(2):
        for h in range(2):
            kl = exact_state[b]["k_labels"][h].long()
            sizes = torch.bincount(kl, minlength=11)
            starts = torch.nn.functional.pad(sizes.cumsum(0), (1, 0))[:-1]
            for qb in range(lay.kv_count.shape[-1]):
                n = int(lay.kv_count[b, h, qb])
                s, e = lay.kv_start[b, h, qb, :n], lay.kv_end[b, h, qb, :n]
                assert (s % step == 0).all() and ((e % step == 0) | (e == V)).all() and (e <= V).all()
                chunks = torch.zeros(NC, dtype=torch.bool)
                for a, z in zip(s.tolist(), e.tolist()):
                    chunks[a // step : -(-z // step)] = True
                # the chunks a kept cluster of this block overlaps, exactly
                n_ex = int(exact.kv_count[b, h, qb])
                want = torch.zeros(NC, dtype=torch.bool)
                for a, z in zip(exact.kv_start[b, h, qb, :n_ex].tolist(), exact.kv_end[b, h, qb, :n_ex].tolist()):
                    want[a // step : -(-z // step)] = True
                assert torch.equal(chunks, want)
    lay.validate()
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(reference_attention(q, k, v, lay), expected, atol=1e-5, rtol=1e-5)


def test_kmeans_bad_params():
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
        PatternSpec("kmeans", top_p=0.0)
    with pytest.raises(ValueError, match="kv_align must be an int >= 1"):
        PatternSpec("kmeans", kv_align=0)
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
        PatternSpec("kmeans", top_p=1.5)
    with pytest.raises(ValueError, match="min_fraction"):
        PatternSpec("kmeans", min_fraction=-0.1)
    with pytest.raises(ValueError, match="q_clusters"):
        PatternSpec("kmeans", q_clusters=0)
    with pytest.raises(ValueError, match="q_mode"):
        PatternSpec("kmeans", q_mode="sideways")


# ----------------------------------------------------------------------------------------------- prune
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("ratio,score", [(0.3, "attn"), (0.55, "norm")])
def test_prune_mask(text, ratio, score):
    g = geom(text, batch=2)
    q, k, v = qkv(g, 2, seed=8)
    state: dict = {}
    lay = prune.build(g, 2, 16, "cpu", q=q, k=k, state=state, keep_ratio=ratio, score=score, record=True)
    V, v0 = g.video_len, g.video_start
    n_keep = math.ceil(ratio * V)
    expected = torch.zeros(2, 2, g.seq_len, g.seq_len, dtype=torch.bool)
    for b in range(2):
        kept = state[b]["kept"]
        assert kept.shape == (2, n_keep)
        for h in range(2):
            expected[b, h, :, kept[h]] = True
            # the kept keys are the top-scored ones under the documented score
            vk = k[b, v0 : v0 + V, h]
            if score == "norm":
                s = vk.norm(dim=-1)
            else:
                rows = torch.linspace(0, V - 1, 64).round().long()
                s = torch.stack([torch.softmax(q[b, v0 + r, h] @ vk.T / 4.0, -1) for r in rows]).mean(0)
            torch.testing.assert_close(state[b]["scores"][h], s, atol=1e-6, rtol=1e-5)
            assert set((kept[h] - v0).tolist()) == set(s.topk(n_keep).indices.tolist())
    check(lay, with_text(g, expected))


def test_prune_keeps_nothing_between_calls_unless_recording():
    """The caller holds one state per layer (and thread): without ``record`` prune leaves it empty, and the layout is
    the recorded run's (at Wan-14B 720p the scores alone would hold ~1 GB over the layers)."""
    g = geom(TEXTS[2], batch=2)
    q, k, _ = qkv(g, 2, seed=10)
    state: dict = {}
    lay = prune.build(g, 2, 16, "cpu", q=q, k=k, state=state, keep_ratio=0.3)
    assert state == {}
    recorded: dict = {}
    lay_rec = prune.build(g, 2, 16, "cpu", q=q, k=k, state=recorded, keep_ratio=0.3, record=True)
    assert set(recorded) == {0, 1} and torch.equal(lay.kv_perm, lay_rec.kv_perm)
    assert PatternSpec("prune").params["record"] is False


def test_prune_keep_all_is_dense_and_bad_params():
    for text in TEXTS:
        g = geom(text, batch=2)
        q, k, v = qkv(g, 2, seed=9)
        lay = prune.build(g, 2, 16, "cpu", q=q, k=k, state={}, keep_ratio=1.0)
        assert lay.density == pytest.approx(1.0)
        torch.testing.assert_close(reference_attention(q, k, v, lay), dense_sdpa(q, k, v), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"keep_ratio must lie in \(0, 1\]"):
        PatternSpec("prune", keep_ratio=0)
    with pytest.raises(ValueError, match=r"keep_ratio must lie in \(0, 1\]"):
        PatternSpec("prune", keep_ratio=1.2)
    with pytest.raises(ValueError, match="score must be one of"):
        PatternSpec("prune", score="magic")


# ------------------------------------------------------------------------------------------ mixed heads
def _build_layer(plan, g: Geometry, q, k, block: int = 16) -> Layout:
    from sparse_dit.patching import PatchState

    st = PatchState(adapter=None, plan_source=None, dense_steps=0, block_size=block, backend="reference", modules=[])
    return st.build_layout(0, tuple(plan), g, q, k)


@pytest.mark.parametrize("text", [(0, "none"), (3, "first")])
def test_mixed_head_layer_matches_per_head(text):
    g = geom(text, batch=2, heads=6)
    tile_s = PatternSpec("tile", window=(3, 1, 2))
    radial_s = PatternSpec("radial", decay=0.5)
    kmeans_s = PatternSpec("kmeans", q_clusters=4, k_clusters=8, top_p=0.5)
    prune_s = PatternSpec("prune", keep_ratio=0.4)
    other = PatternSpec("dense") if text[0] == 0 else PatternSpec("radial", variant="band")
    plan = [tile_s, radial_s, other, kmeans_s, tile_s, prune_s]
    q, k, v = qkv(g, 6, seed=10)
    lay = _build_layer(plan, g, q, k)
    lay.validate()
    assert lay.heads == 6
    out = reference_attention(q, k, v, lay)
    for h, spec in enumerate(plan):
        sl = slice(h, h + 1)
        extra = {} if spec.static else {"q": q[:, :, sl], "k": k[:, :, sl], "state": {}}
        one = spec.module.build(g, 1, 16, "cpu", **extra, **spec.params)
        ref = reference_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], one)
        torch.testing.assert_close(out[:, :, sl], ref, atol=1e-6, rtol=1e-6)
        m = lay.to_dense_mask()[:, h]
        assert torch.equal(m, one.to_dense_mask()[:, 0].expand_as(m))


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def wan():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    ).eval()
    x, t, e = torch.randn(1, 4, 3, 12, 20), torch.tensor([500]), torch.randn(1, 7, 32)
    with torch.no_grad():
        ref = model(x, t, e).sample
    return model, (x, t, e), ref


@pytest.mark.parametrize(
    "full,sparse",
    [
        ({"name": "tile", "window": (3, 2, 3)}, {"name": "tile", "window": (1, 1, 2)}),  # grid 3x6x10, tiles 1x4x4
        ({"name": "radial", "decay": 1e6}, {"name": "radial", "decay": 0.25, "sinks": 0}),
        ({"name": "radial", "decay": 1e6, "variant": "band"}, {"name": "radial", "decay": 0.25, "variant": "band"}),
        ({"name": "kmeans", "top_p": 1.0, "q_clusters": 4, "k_clusters": 8}, {"name": "kmeans", "top_p": 0.3, "q_clusters": 4, "k_clusters": 8}),
        ({"name": "prune", "keep_ratio": 1.0}, {"name": "prune", "keep_ratio": 0.25}),
    ],
)
def test_wan_end_to_end(wan, full, sparse):
    import sparse_dit

    model, inputs, ref = wan
    try:
        with torch.no_grad():
            sparse_dit.patch(model, full, block_size=16, backend="reference")
            out_full = model(*inputs).sample
            sparse_dit.patch(model, sparse, block_size=16, backend="reference")
            out_sparse = model(*inputs).sample
            stats = dict(sparse_dit.patch_state(model).stats)
    finally:
        sparse_dit.unpatch(model)
    torch.testing.assert_close(out_full, ref, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(out_sparse).all()
    assert stats["sparse_calls"] == 2 and stats["density_sum"] / stats["sparse_calls"] < 0.9
    assert not torch.allclose(out_sparse, ref, atol=1e-6)


# ------------------------------------------------------------------------------------------------- cli
def test_density_cli(capsys):
    from sparse_dit.cli import main

    assert main(["density", "--pattern", "tile", "--window", "3", "1", "2", "--frames", "5", "--height", "7",
                 "--width", "9", "--block-size", "16", "--text-len", "3", "--text-position", "first"]) == 0
    out = capsys.readouterr().out
    expected = tile.build(geom((3, "first")), 1, 16, "cpu", window=(3, 1, 2)).density
    assert f"density   {expected:.4f}" in out
    assert main(["density", "--pattern", "radial", "--decay", "0.5", "--param", "variant='band'", "--frames", "5",
                 "--height", "7", "--width", "9", "--block-size", "16"]) == 0
    assert "frame distance" in capsys.readouterr().out
    assert main(["density", "--pattern", "tile", "--window", "9", "--frames", "5", "--height", "7", "--width", "9"]) == 2
    assert "larger than the tile grid" in capsys.readouterr().err
