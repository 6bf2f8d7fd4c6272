"""Attention backends over a `Layout`: the fused Triton kernel on supported GPUs, the PyTorch reference elsewhere, and
the optional Gluon (`gluon_attention`, Hopper, Triton 3.6) and FlashAttention-4 (`fa4`) engines for the layouts they
can express, chosen per call by measured speed (`EngineChooser`). Dense attention of patched models goes through
`dense_engine` / `dense_attention`."""

from __future__ import annotations

import statistics
import warnings
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sparse_dit.layout import Layout

from .reference import check_qkv, reference_attention

__all__ = [
    "block_sparse_attention", "reference_attention", "check_qkv", "triton_supported", "EngineChooser",
    "dense_engine", "dense_attention",
]


def triton_supported(q: torch.Tensor) -> bool:
    """True when the fused Triton kernel can run on q's device (a CUDA GPU of compute capability >= 8.0)."""
    if q.device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(q.device) >= (8, 0)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention of q (B, S, H, D) against k, v (B, S, H, D) restricted to ``layout``.

    Returns out (B, S, H, D) and, with ``return_lse``, lse (B, H, S) float32. Runs the Triton kernel on a
    supported GPU; anywhere else the PyTorch reference, with one warning when a CUDA tensor had to fall back.
    Shapes and the layout's bounds (`Layout.check_bounds`) are checked before anything runs. The Triton kernel has
    no backward: when q, k or v require grad (and grad is enabled) the differentiable reference runs instead, with one
    warning, so gradients are never silently missing.
    """
    check_qkv(q, k, v, layout)
    layout.check_bounds()  # before any kernel reads through the layout's indices (cached per layout object)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if triton_supported(q):
        if not needs_grad:
            from .triton_attention import triton_block_sparse_attention

            return triton_block_sparse_attention(q, k, v, layout, scale=scale, return_lse=return_lse)
        _warn_once(
            "sparse-dit: gradients are needed but the Triton kernel is forward-only; using the differentiable PyTorch "
            "reference (slower). Call under torch.no_grad() for inference."
        )
    elif q.device.type == "cuda":
        warnings.warn(
            "sparse-dit: no supported GPU for the Triton kernel (needs triton and compute capability >= 8.0); "
            "using the slow PyTorch reference backend",
            RuntimeWarning,
            stacklevel=2,
        )
    return reference_attention(q, k, v, layout, scale=scale, return_lse=return_lse)


# ------------------------------------------------------------------------------------ sparse engine choice
class EngineChooser:
    """Runs a sparse call on the fastest of the engines that can run it, measured per call shape.

    Engines: the Triton kernel (always), the Gluon engine (`gluon_attention`: Hopper, Triton 3.6, layouts of whole
    128-key blocks) and the FA4 engine (`fa4`: flash-attn-4 installed, the same layouts). Key: (batch, seq, heads,
    head dim, dtype, device, which permutations, density in steps of 0.05, the engines that can run the call). For a
    new key the candidate engines serve calls in turn, each call timed with CUDA events; the first call of each engine
    is discarded (compilation), and after ``trials`` kept timings each the engine with the lowest median serves every
    later call of that key. Timings are read only once their events have completed (no host sync), and every trial
    is a real call, so measuring costs nothing but the slower engines' few calls. An optional engine that fails is
    remembered, said once, and never asked again; Triton runs that call. ``prefer`` ("triton", "gluon", "fa4") skips
    the measurement: that engine wherever it can run; where it cannot, "triton" still means Triton and the others
    fall back to the measured choice. One object per patched model (`PatchState`): nothing is global.
    """

    ENGINES = ("triton", "gluon", "fa4")
    OPTIONAL = ("gluon", "fa4")
    NAMES = {"triton": "Triton kernel", "gluon": "Gluon engine", "fa4": "FA4 engine"}

    def __init__(self, prefer: str | None = None, trials: int = 3, max_keys: int = 256) -> None:
        if prefer not in (None, *self.ENGINES):
            raise ValueError(f"prefer must be None, 'triton', 'gluon' or 'fa4'; got {prefer!r}")
        self.prefer = prefer
        self.trials = trials
        self.max_keys = max_keys
        self.chosen: OrderedDict[tuple, str] = OrderedDict()  # key -> engine
        self._pending: dict[tuple, list] = {}  # key -> [(engine, start event, end event)]
        self._times: dict[tuple, dict[str, list[float]]] = {}  # key -> engine -> kept timings (ms)
        self._runs: dict[tuple, dict[str, int]] = {}  # key -> engine -> calls started
        self.failures: dict[str, str] = {}  # engine failures seen (first message per engine)
        self.calls: dict[str, int] = {e: 0 for e in self.ENGINES}  # calls each engine ran

    @staticmethod
    def key(q: torch.Tensor, layout: Layout, candidates: tuple[str, ...] = ()) -> tuple:
        bucket = layout.cached(("density_bucket", 20), lambda: round(float(layout.density_per_head().mean()) * 20))
        B, S, H, D = q.shape
        perms = (layout.q_perm is not None, layout.kv_perm is not None)
        return (B, S, H, D, q.dtype, q.device, *perms, bucket, candidates)

    def supports(self, engine: str, q: torch.Tensor, layout: Layout) -> bool:
        """Whether optional ``engine`` can run this call (and has not failed before)."""
        if engine in self.failures:
            return False
        if engine == "fa4":
            from . import fa4

            return fa4.fa4_sparse_supported(q, layout) is True
        from . import gluon_attention

        # the device first: the layout check converts the layout to block tables (once per layout, but not for nothing)
        return gluon_attention.gluon_device_ok(q) and gluon_attention.gluon_sparse_supported(q, layout) is True

    def candidates(self, q: torch.Tensor, layout: Layout) -> tuple[str, ...]:
        """The engines that can run this call, Triton first."""
        return ("triton", *(e for e in self.OPTIONAL if self.supports(e, q, layout)))

    def _run(self, engine: str, q, k, v, layout, scale, return_lse):
        if engine == "fa4":
            from .fa4 import fa4_block_sparse_attention

            return fa4_block_sparse_attention(q, k, v, layout, scale=scale, return_lse=return_lse)
        if engine == "gluon":
            from .gluon_attention import gluon_block_sparse_attention

            return gluon_block_sparse_attention(q, k, v, layout, scale=scale, return_lse=return_lse)
        from .triton_attention import triton_block_sparse_attention

        return triton_block_sparse_attention(q, k, v, layout, scale=scale, return_lse=return_lse)

    def _collect(self, key: tuple) -> None:
        """Move completed timings of ``key`` into its table; the first timing of each engine is dropped (compile)."""
        pending = self._pending.get(key, [])
        done = [p for p in pending if p[2].query()]
        self._pending[key] = [p for p in pending if p not in done]
        for engine, start, end in done:
            self._times.setdefault(key, {}).setdefault(engine, []).append(start.elapsed_time(end))

    def _decide(self, key: tuple, candidates: tuple[str, ...]) -> str | None:
        times = self._times.get(key, {})
        kept = {e: t[1:] for e, t in times.items()}  # the first call of an engine compiles
        if all(len(kept.get(e, [])) >= self.trials for e in candidates):
            best = min(candidates, key=lambda e: statistics.median(kept[e]))
            self.chosen[key] = best
            while len(self.chosen) > self.max_keys:
                self.chosen.popitem(last=False)
            for table in (self._pending, self._times, self._runs):
                table.pop(key, None)
            return best
        return None

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: Layout,
        scale: float | None = None,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Sparse attention of q (B, S, H, D) against k, v over ``layout`` (the Triton kernel's contract)."""
        if self.prefer == "triton":
            return self._guarded("triton", q, k, v, layout, scale, return_lse)
        if self.prefer is not None and self.supports(self.prefer, q, layout):
            return self._guarded(self.prefer, q, k, v, layout, scale, return_lse)
        candidates = self.candidates(q, layout)
        if len(candidates) == 1:
            return self._guarded("triton", q, k, v, layout, scale, return_lse)
        key = self.key(q, layout, candidates)
        engine = self.chosen.get(key)
        if engine is not None:
            self.chosen.move_to_end(key)
            return self._guarded(engine, q, k, v, layout, scale, return_lse)
        if q.is_cuda and torch.cuda.is_current_stream_capturing():  # no timing inside a CUDA graph capture
            return self._guarded("triton", q, k, v, layout, scale, return_lse)
        self._collect(key)
        engine = self._decide(key, candidates)
        if engine is not None:
            return self._guarded(engine, q, k, v, layout, scale, return_lse)
        runs = self._runs.setdefault(key, {e: 0 for e in candidates})
        engine = min(candidates, key=lambda e: runs[e])
        runs[engine] += 1
        start, end = self._new_event(), self._new_event()
        start.record()
        out = self._guarded(engine, q, k, v, layout, scale, return_lse)
        end.record()
        if engine not in self.failures:
            self._pending.setdefault(key, []).append((engine, start, end))
        return out

    @staticmethod
    def _new_event() -> Any:
        return torch.cuda.Event(enable_timing=True)

    def _guarded(self, engine: str, q, k, v, layout, scale, return_lse):
        """Run ``engine``; an optional engine's failure (compile error, unsupported case) is remembered, said once,
        and Triton runs. Each call is counted once, under the engine that produced its output."""
        if engine == "triton":
            out = self._run(engine, q, k, v, layout, scale, return_lse)
            self.calls[engine] += 1
            return out
        try:
            out = self._run(engine, q, k, v, layout, scale, return_lse)
            self.calls[engine] += 1
            return out
        except Exception as err:  # optional engines must never fail the call
            self.failures[engine] = f"{type(err).__name__}: {err}"
            warnings.warn(f"sparse-dit: the {self.NAMES[engine]} failed ({type(err).__name__}: {str(err)[:200]}); "
                          "using the Triton kernel", RuntimeWarning, stacklevel=3)
            for key in [k_ for k_, e in self.chosen.items() if e == engine]:
                del self.chosen[key]
            return self._guarded("triton", q, k, v, layout, scale, return_lse)

    def summary(self) -> dict[str, Any]:
        """What was chosen: {str(key): engine}, and engine failures."""
        return {"chosen": {str(k): e for k, e in self.chosen.items()}, "calls": dict(self.calls), "failures": dict(self.failures)}


# ------------------------------------------------------------------------------------------ dense attention
def dense_engine(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> str:
    """Which engine runs a dense call given as SDPA gets it (q (B, H, Sq, D), k, v (B, Hkv, Sk, D)): "fa4" when
    flash-attn-4 is installed and runs this case (CUDA Hopper/Blackwell, fp16/bf16, no mask, no dropout, no gradient
    needed, causal only for Sq == Sk, grouped heads only with ``enable_gqa``), else "sdpa"."""
    from .fa4 import fa4_dense_supported

    if attn_mask is not None or dropout_p:
        return "sdpa"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return "sdpa"
    if is_causal and query.shape[-2] != key.shape[-2]:
        return "sdpa"  # SDPA's causal mask is top-left aligned, FA's bottom-right
    if query.shape[1] != key.shape[1] and not enable_gqa:
        return "sdpa"  # SDPA raises for this; let it say so
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    return "fa4" if fa4_dense_supported(q, k, v) else "sdpa"


def _sdpa_order(device: torch.device) -> list | None:
    """SDPA backends in priority order for ``device``: cuDNN first on Hopper and newer (measured faster than torch's
    flash kernel there), None (torch's own order) elsewhere."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        return None
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    sdpa: Callable[..., torch.Tensor] = F.scaled_dot_product_attention,
) -> torch.Tensor:
    """Dense attention with SDPA's signature and layout (q (B, H, Sq, D) -> (B, H, Sq, Dv)) on the fastest engine
    available (`dense_engine`): FA4, else SDPA with cuDNN first on Hopper and newer. ``sdpa``: the SDPA function to
    call (the patch passes the original, un-intercepted one)."""
    kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    if enable_gqa:
        kwargs["enable_gqa"] = True
    if dense_engine(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) == "fa4":
        from .fa4 import fa4_dense_attention

        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        return fa4_dense_attention(q, k, v, scale=scale, causal=is_causal).transpose(1, 2)
    order = _sdpa_order(query.device)
    if order is None:
        return sdpa(query, key, value, **kwargs)
    from torch.nn.attention import sdpa_kernel

    try:
        ctx = sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch < 2.6: no priority order; leave torch's own choice
        return sdpa(query, key, value, **kwargs)
    with ctx:
        return sdpa(query, key, value, **kwargs)
