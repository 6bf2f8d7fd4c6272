"""`patch` / `unpatch`: route the self-attention of a diffusers DiT through sparse-dit, and back.

How the interception works, without copying or monkey-patching diffusers:
- a forward pre-hook on the transformer reads the call's batch, post-patchify grid and timestep;
- each self-attention module gets a pre-hook that pushes a ``TorchFunctionMode`` and an always-run
  post-hook that pops it, so while (and only while) that module runs, the
  ``scaled_dot_product_attention`` call inside diffusers' own processor lands in sparse-dit;
- the processors of patched modules are pinned to diffusers' "native" backend (the one that calls
  ``scaled_dot_product_attention``) at every call, so ``set_attention_backend``/``set_attn_processor`` after
  ``patch`` do not bypass it; the user's latest choice is remembered, used for dense calls and restored by ``unpatch``;
- under ``torch.compile`` the hooks and the intercepted call run eagerly at one graph break per attention
  call (``torch.compiler.disable``); everything else in the blocks stays compiled.

Everything lives on the patched model instance; nothing is global. The hooks are module-level functions that find
their state through the module they are called with, so ``copy.deepcopy`` of a patched model carries its own patch and
a pickled patched model unpickles patched. Per-call state (the call being run, the step clock, dynamic pattern state) is
per thread, so one patched model can serve several threads.

Under diffusers' Ulysses context parallelism (``enable_parallelism``, before or after `patch`) the interceptor sits
inside diffusers' native op after the all-to-all: each rank sees the whole sequence for its slice of heads, and
`PatchState._decide` plans that slice (`sparse_dit.context_parallel`). Ring attention and tensor parallelism are
refused at `patch` and at the first call.

Robustness rules (issue 13):
- a call sparse attention cannot serve runs dense and is counted in ``stats["dense_reasons"]``;
- an exception or ``KeyboardInterrupt`` anywhere in a forward leaves nothing behind: an interceptor whose module
  is no longer running passes every call through and is removed at the next patched call or by ``unpatch``;
- gradient checkpointing: a forward run with grad enabled records each attention call's decision (dense or the exact
  layout) on the autograd graph of its output; a recomputation in backward replays it, so the recomputed forward is
  the original one, also for dynamic patterns;
- the Triton kernel is forward-only: a call that needs gradients runs the differentiable reference with one warning;
- step caches (diffusers' cache hooks, cache-dit) wrap ``forward`` of blocks or attention modules, inside the torch
  hooks sparse-dit uses, so the two compose in either order; a layer a cache skipped is counted in
  ``stats["skipped_calls"]`` (not as dense, and without the "no patched attention layer ran" warning), and the step
  clock still ticks once per transformer call from its timestep.
"""

from __future__ import annotations

import sys
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sparse_dit.context_parallel import UlyssesSlice, check_parallel_config, gathered_positions, ulysses_slice
from sparse_dit.geometry import Geometry
from sparse_dit.layout import Layout
from sparse_dit.patterns import PatternSpec
from sparse_dit.pipelines import ADAPTERS, CallInfo, ModelAdapter, resolve_transformers, unwrap_compiled
from sparse_dit.pipelines.base import NoGridError

STATE_ATTR = "_sparse_dit_state"
LAYER_ATTR = "_sparse_dit_layer"  # on each patched attention module: (state, layer index)
_SDPA = F.scaled_dot_product_attention
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_BACKENDS = ("auto", "triton", "gluon", "fa4", "reference")
_RECORD_KEY = "sparse_dit_record"  # key in an autograd node's metadata: the decisions of the forward behind it

HeadPlan = tuple[PatternSpec, ...]

# Why a self-attention call ran dense (keys of stats["dense_reasons"]).
REASON_WARMUP = "dense_steps"
REASON_PLAN = "dense pattern"
REASON_CAUSAL = "causal"
REASON_DROPOUT = "dropout"
REASON_GQA = "grouped-query attention"
REASON_CROSS = "query and key lengths differ"
REASON_MASK = "attention mask other than prompt padding"
REASON_NO_GRID = "no video grid for this call"
REASON_BYPASS = "processor did not call scaled_dot_product_attention"
REASON_EXPORT = "torch.export"
REASON_NO_RECORD = "recomputed without a recorded forward"


def _bind_sdpa(args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(_SDPA_PARAMS, args))
    bound.update(kwargs)
    return bound


# ------------------------------------------------------------------------------------------- backends
def choose_backend(name: str, q: torch.Tensor, needs_grad: bool) -> tuple[str, str | None]:
    """Which backend runs a sparse call: ("triton" | "reference" | "auto", warning or None).

    name: the patch's ``backend`` setting. The Triton kernel has no backward: a call that needs gradients (training,
    gradient checkpointing) runs the differentiable PyTorch reference instead, with a warning saying so; gradients are
    never silently missing. "auto" picks Triton on a supported GPU (see `sparse_dit.kernels.triton_supported`);
    "gluon" and "fa4" are "auto" whose GPU calls prefer that engine (`kernels.EngineChooser` decides on "triton" for
    all three).
    """
    from sparse_dit import kernels

    if name in ("gluon", "fa4"):
        name = "auto"
    wants_triton = name == "triton" or (name == "auto" and kernels.triton_supported(q))
    if wants_triton and needs_grad:
        return "reference", (
            "sparse-dit: gradients are needed but the Triton kernel is forward-only; these calls run the differentiable "
            "PyTorch reference (slower). Use torch.no_grad() for inference."
        )
    if name == "auto":
        return ("triton" if wants_triton else "auto"), None
    return name, None


def _run_backend(name: str, engines: Any = None) -> Callable[..., torch.Tensor]:
    """The function that runs a sparse call on backend ``name``; for "triton", ``engines`` (a
    `kernels.EngineChooser`) when given: it picks Triton, Gluon or FA4 per call."""
    from sparse_dit import kernels

    if name == "triton" and engines is not None:
        return engines
    if name == "reference":
        return kernels.reference_attention
    if name == "triton":
        from sparse_dit.kernels.triton_attention import triton_block_sparse_attention

        return triton_block_sparse_attention
    return kernels.block_sparse_attention


# ------------------------------------------------------------------------------------- interception
def _caller_frame() -> Any:
    """The frame that called the hook running now, skipping torch's compiler wrappers and this module: it stays on
    the stack exactly while the hooked module runs (eager or compiled), so it tells a live interceptor from a stale one."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if name != __file__ and "torch/_dynamo" not in name and "torch/compiler" not in name:
            return frame
        frame = frame.f_back
    return None


def _on_stack(frame: Any) -> bool:
    f = sys._getframe(1)
    while f is not None:
        if f is frame:
            return True
        f = f.f_back
    return False


class _AttentionInterceptor(TorchFunctionMode):
    """Active only while one patched attention module runs; hands its SDPA call to the patch state.

    The module's pre-hook pushes it, its post-hook pops it. A ``KeyboardInterrupt`` skips post-hooks (torch runs
    always-call hooks for ``Exception`` only), so the mode checks that the module is still running (the frame that
    called its pre-hook is on the stack); a stale one passes everything through until it is removed."""

    def __init__(self, state: "PatchState", layer: int) -> None:
        super().__init__()
        # weak: the state owns its interceptors, and a strong reference back would make a cycle that keeps the
        # state's caches (layouts, k-means state: GPU memory) alive after unpatch until the garbage collector runs
        self._state = weakref.ref(state)
        self.layer = layer
        self.frames = threading.local()  # per thread: the frames of the module calls that pushed this mode
        self.attend_eagerly = _compiler_disabled(_attend_eagerly)  # one object for every layer and model

    def entered(self) -> list:
        stack = getattr(self.frames, "stack", None)
        if stack is None:
            stack = self.frames.stack = []
        return stack

    @property
    def state(self) -> "PatchState | None":
        """The patch state this interceptor serves (None once that state is gone)."""
        return self._state()

    def live(self) -> bool:
        stack = self.entered()
        state = self.state
        return bool(stack) and state is not None and state.installed and _on_stack(stack[-1])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return self.attend_eagerly(self, args, kwargs)
        if func is torch.Tensor.unflatten:
            # The same call, as a method. Reached through a mode, dynamo inlines Tensor.unflatten and cannot
            # trace its `super().unflatten` (torch 2.13: a graph break on every q/k/v unflatten and RoPE).
            return args[0].unflatten(*args[1:], **kwargs)
        return func(*args, **kwargs)



# torch.compile: dynamo traces this mode's __torch_function__ inline, and traced, `attend` (layouts with
# data-dependent shapes, caches, counters, the step clock, the kernel launch) graph-breaks a dozen times and
# guards on the layer index, the step and the call counters, so it recompiled as they changed.
# Disabled, it is one graph break per attention call and runs eagerly; diffusers' norms, projections, RoPE and
# FFN around it stay compiled. The mode is passed whole: reading `.layer` in traced code would add a guard
# on it (a recompile per layer).
def _attend_eagerly(mode: _AttentionInterceptor, args: tuple, kwargs: dict) -> torch.Tensor:
    state = mode.state
    if state is None or not mode.live():  # left behind by an interrupted forward, or unpatched since
        return _SDPA(*args, **kwargs)
    return state.attend(mode.layer, args, kwargs)


def _compiler_disabled(fn: Callable) -> Callable:
    """``torch.compiler.disable(fn)``, made on first use and kept on ``fn``: decorating at import would import
    torch._dynamo with sparse_dit (1.5 s; and a TRITON_INTERPRET=1 set after that is no longer honoured)."""
    if "compiler_disabled" not in fn.__dict__:
        fn.compiler_disabled = torch.compiler.disable(fn)
    return fn.compiler_disabled


def _torch_function_stack() -> list:
    return list(torch.overrides._get_current_function_mode_stack())


def _drop_interceptors(drop: Callable[[_AttentionInterceptor], bool]) -> int:
    """Remove this thread's interceptors for which ``drop(mode)`` holds from the TorchFunctionMode stack, keeping
    every other mode in its place. Returns how many were removed."""
    if torch._C._len_torch_function_stack() == 0:
        return 0
    stack = _torch_function_stack()
    keep = [m for m in stack if not (isinstance(m, _AttentionInterceptor) and drop(m))]
    if len(keep) == len(stack):
        return 0
    for m in stack:
        if isinstance(m, _AttentionInterceptor) and m not in keep:
            m.entered().clear()
    for _ in stack:
        torch._C._pop_torch_function_stack()
    for m in keep:
        torch._C._push_on_torch_function_stack(m)
    return len(stack) - len(keep)


def clear_stale_interceptors() -> int:
    """Remove interceptors left on this thread's TorchFunctionMode stack by an interrupted forward (or whose model
    was unpatched). Patched calls and `unpatch` do this themselves; returns how many were removed."""
    return _drop_interceptors(lambda m: not m.live())


# ------------------------------------------------------------------------------------------- clocks
@dataclass
class StepClock:
    """Denoising step and CFG branch, counted from the timestep sequence so CFG passes (same t) share
    a step and a rising t marks a new generation. One clock serves every transformer of a pipeline
    (Wan 2.2 hands over from one to the other mid-generation)."""

    step: int = 0
    branch: int = 0
    generation: int = 0
    last_timestep: float | None = None

    def tick(self, t: float) -> None:
        if self.last_timestep is None or t > self.last_timestep + 1e-9:
            self.step, self.branch = 0, 0
            self.generation += 1
        elif t < self.last_timestep - 1e-9:
            self.step, self.branch = self.step + 1, 0
        else:  # the same timestep again: the next CFG branch of this step
            self.branch += 1
        self.last_timestep = t


class ThreadClocks:
    """One `StepClock` per thread, shared by the transformers of a pipeline: generations run in two threads
    count their own steps. Copies and unpickled models start with fresh clocks."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> StepClock:
        clock = getattr(self._local, "clock", None)
        if clock is None:
            clock = self._local.clock = StepClock()
        return clock

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, _: dict) -> None:
        self.__init__()


# ------------------------------------------------------------------------------------ call records
class Decision(NamedTuple):
    """What one intercepted SDPA call did: ran dense (with a reason) or sparse over ``layout``."""

    reason: str | None  # None: sparse
    layout: Layout | None
    probe: torch.Tensor | None  # a few query values: tells apart recorded forwards of one layer on replay
    # sequence positions in the order the layout is built for, when that is not diffusers' order (extra image
    # tokens moved next to the text, see `PatchState.geometry`)
    order: torch.Tensor | None = None
    # the layout has dynamic heads (k-means, prune): planned for this call (or a few, with replan_every), so an engine
    # that must first convert it (FA4's tables: host syncs, gathers) would pay that on every plan
    planned: bool = False


class CallRecord:
    """Decisions of one transformer forward run with grad enabled, by (layer, n-th SDPA call of that layer).

    Held by the autograd graph of the forward's output (its node's ``metadata``), so it lives exactly as long as a
    backward can recompute that forward; the patch state keeps only weak references."""

    __slots__ = ("decisions", "__weakref__")

    def __init__(self) -> None:
        self.decisions: dict[tuple[int, int], Decision] = {}


@dataclass
class CallContext:
    """The transformer call running on this thread."""

    info: CallInfo | None  # None: no grid for this call (every attention call runs dense, with `reason`)
    reason: str | None = None
    step: int = 0
    branch: int = 0
    generation: int = 0
    replay: bool = False  # a recomputation in backward: decisions come from the records
    record: CallRecord | None = None


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _probe(query: torch.Tensor) -> torch.Tensor:
    return query[:1, :1, :4].detach().clone()


class _BoundedCache(OrderedDict):
    """A dict that keeps its ``maxsize`` most recently used entries; safe to share between threads."""

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize
        self._lock = threading.Lock()

    def get_recent(self, key: Any) -> Any:
        with self._lock:
            value = super().get(key)
            if value is not None:
                self.move_to_end(key)
            return value

    def __setitem__(self, key: Any, value: Any) -> None:
        with self._lock:
            super().__setitem__(key, value)
            self.move_to_end(key)
            while len(self) > self.maxsize:
                self.popitem(last=False)

    def __reduce__(self):
        return (_BoundedCache, (self.maxsize,))

    def __deepcopy__(self, memo: dict) -> "_BoundedCache":
        return _BoundedCache(self.maxsize)


class _UniformPlan:
    """Plan source of ``patch(pattern=...)``: the same spec for every head of every layer (picklable)."""

    def __init__(self, spec: PatternSpec, heads: int) -> None:
        self.spec, self.heads = spec, heads
        self.plan = (spec,) * heads

    def __call__(self, layer: int, t: float, step: int) -> HeadPlan:
        return self.plan

    def __reduce__(self):
        return (_UniformPlan, (self.spec, self.heads))


class _ProfilePlan:
    """Plan source of ``patch(profile=...)``: the profile's plan of the timestep's bucket (picklable)."""

    def __init__(self, profile: Any) -> None:
        self.profile = profile

    def __call__(self, layer: int, t: float, step: int) -> HeadPlan | None:
        bucket = self.profile.bucket_of(t)
        return None if bucket is None else self.profile.head_plan(bucket, layer)


class _RestatedPlan:
    """Plan source for one call grid: the profile's plan restated for it (`plan_for_grid`; picklable)."""

    def __init__(self, plan: Any) -> None:
        self.plan = plan

    def __call__(self, layer: int, t: float, step: int) -> HeadPlan | None:
        bucket = self.plan.source.bucket_of(t)
        return None if bucket is None else self.plan.plan[bucket][layer]


class _ProfileGridPlan:
    """``at(grid)`` -> the plan source of ``patch(profile=...)`` for that grid, cached per grid on the patched
    model; a grid far from every calibration grid warns once (picklable, unlike a closure)."""

    def __init__(self, profile: Any, block_size: int) -> None:
        self.profile = profile
        self.block_size = int(block_size)
        self.sources: dict[tuple[int, int, int], _RestatedPlan] = {}

    def __call__(self, grid: tuple[int, int, int]) -> _RestatedPlan:
        source = self.sources.get(grid)
        if source is None:
            from sparse_dit.profile import plan_for_grid

            plan = plan_for_grid(self.profile, grid, self.block_size)
            if plan.far:
                warnings.warn(plan.far_warning(), stacklevel=2)
            source = self.sources[grid] = _RestatedPlan(plan)
        return source


# -------------------------------------------------------------------------------------------- state
@dataclass
class PatchState:
    """Everything one patched transformer carries: settings, per-thread call state, caches and statistics.

    Caches (documented bounds): ``layout_cache`` keeps the ``layout_cache_size`` most recently used static layouts
    (whole layers and static head groups of mixed layers, per plan and geometry); ``dynamic_layouts`` (replan_every > 1)
    keeps, per thread, one layout per (layer, plan/geometry, CFG branch) of the current generation only; per-thread
    dynamic pattern state (``layer_state``, e.g. k-means centroids) is one entry per (layer, head group), shared by the
    CFG branches of a step; prompt-padding variants of a layout are kept for the ``text_valid_cache_size`` most recent
    (layout, lengths).
    """

    adapter: ModelAdapter
    plan_source: Callable[[int, float, int], HeadPlan | None]
    dense_steps: int
    block_size: int
    backend: str
    modules: list[torch.nn.Module]
    # dynamic head groups (kmeans, prune) are re-planned on every replan_every-th denoising step and
    # their layout reused in between: planning costs a large share of a sparse step (benchmarks/results)
    replan_every: int = 1
    # called as observer(layer, geometry, timestep, q, k, v, scale) with (B, S, H, D) views before each
    # self-attention; the profiler uses it to compare candidate patterns against dense attention
    observer: Callable[..., None] | None = None
    clocks: ThreadClocks = field(default_factory=ThreadClocks)
    # with a profile: grid -> plan source for that grid (the profile's plan restated for it, see
    # `_ProfileGridPlan`); used instead of plan_source when set
    plan_source_at: Callable[[tuple[int, int, int]], Callable[[int, float, int], HeadPlan | None]] | None = None
    layout_cache_size: int = 256
    text_valid_cache_size: int = 64
    # processor id -> [processor, had an instance attribute, the user's value, the value sparse-dit pinned]
    saved_backends: dict[int, list] = field(default_factory=dict)
    sparse_calls: int = 0
    dense_calls: int = 0
    recomputed_calls: int = 0
    # self-attention layer calls a step cache (diffusers' FirstBlockCache, TaylorSeer, MagCache, PAB, FasterCache,
    # cache-dit) skipped: the layer's output came from the cache, so neither sparse nor dense attention ran
    skipped_calls: int = 0
    dense_reasons: dict[str, int] = field(default_factory=dict)
    # summed on the device without a host sync per call; read through `stats`
    density_total: torch.Tensor | float = 0.0
    last_geometry: Geometry | None = None
    # under Ulysses context parallelism: [start, end) of the heads this rank attends (of the plan's), else None
    head_range: tuple[int, int] | None = None
    installed: bool = False

    def __post_init__(self) -> None:
        self._runtime()

    def _runtime(self) -> None:
        """Per-process runtime parts, rebuilt for copies and unpickled states."""
        self._local = threading.local()
        self._lock = threading.RLock()
        self._records: list[weakref.ref] = []
        self._orders = _BoundedCache(16)
        self._warned: set[str] = set()
        self.layout_cache = _BoundedCache(self.layout_cache_size)
        self._text_valid_layouts = _BoundedCache(self.text_valid_cache_size)
        self.modes = [_AttentionInterceptor(self, layer) for layer in range(len(self.modules))]
        from sparse_dit.kernels import EngineChooser

        # the engine per sparse call: by measured speed ("auto"), the named one where it can run ("gluon", "fa4")
        self.engines = EngineChooser(prefer=self.backend if self.backend in EngineChooser.ENGINES else None)

    # ------------------------------------------------------------------------------ copy and pickle
    _RUNTIME = ("_local", "_lock", "_records", "_orders", "_warned", "layout_cache", "_text_valid_layouts", "modes", "engines")

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME}
        state["adapter"] = self.adapter.family if self.adapter is not None else None
        state["observer"] = None  # the profiler's hook belongs to one calibration run
        total = self.density_total
        state["density_total"] = float(total) if isinstance(total, torch.Tensor) else total
        state["dense_reasons"] = dict(self.dense_reasons)
        return state

    def __setstate__(self, state: dict) -> None:
        family = state["adapter"]
        state["adapter"] = next((a for a in ADAPTERS if a.family == family), None)
        # processors are keyed by id: a copy's are other objects
        state["saved_backends"] = {id(entry[0]): entry for entry in state["saved_backends"].values()}
        self.__dict__.update(state)
        self._runtime()

    # ------------------------------------------------------------------------- per-thread state
    @property
    def clock(self) -> StepClock:
        return self.clocks.get()

    @property
    def step(self) -> int:
        return self.clock.step

    @property
    def branch(self) -> int:
        """Which call of the current step (CFG branches called separately keep their own pattern state)."""
        return self.clock.branch

    def _thread(self, name: str, factory: Callable[[], Any]) -> Any:
        value = getattr(self._local, name, None)
        if value is None:
            value = factory()
            setattr(self._local, name, value)
        return value

    @property
    def context(self) -> CallContext | None:
        """The transformer call running on this thread, or None."""
        return getattr(self._local, "context", None)

    @property
    def call(self) -> CallInfo | None:
        ctx = self.context
        return None if ctx is None else ctx.info

    @property
    def layer_state(self) -> dict[tuple, dict]:
        """This thread's dynamic pattern state per (layer, spec, heads, branch)."""
        return self._thread("layer_state", dict)

    @property
    def dynamic_layouts(self) -> dict[tuple, tuple[int, int, Layout]]:
        """This thread's reusable dynamic layouts: (layer, plan/geometry key, branch) -> (generation, step, layout)."""
        return self._thread("dynamic_layouts", dict)

    @property
    def stats(self) -> dict[str, Any]:
        """Self-attention calls so far: sparse and dense (with the reason of each dense one), the summed density of
        the sparse ones, the calls a step cache skipped, and the calls recomputed in backward (gradient
        checkpointing; not counted again)."""
        with self._lock:
            total = float(self.density_total)
            return {
                "sparse_calls": self.sparse_calls,
                "dense_calls": self.dense_calls,
                "density_sum": total,
                "mean_density": total / self.sparse_calls if self.sparse_calls else 1.0,
                "dense_reasons": dict(self.dense_reasons),
                "recomputed_calls": self.recomputed_calls,
                "skipped_calls": self.skipped_calls,
                "head_range": self.head_range,
            }

    def warn_once(self, key: str, message: str) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        warnings.warn(message, stacklevel=3)

    @property
    def uniform_dense(self) -> bool:
        """Every call runs dense whatever the timestep (``pattern="dense"``): nothing needs reading off the call."""
        return isinstance(self.plan_source, _UniformPlan) and self.plan_source.spec.name == "dense" and self.observer is None

    # ------------------------------------------------------------------------------------ hooks
    def on_transformer_call(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        clear_stale_interceptors()
        self._local.entered = 0
        self._local.ran = set()  # layers whose attention ran in this call (sparse, dense or bypassed)
        check_parallel_config(transformer.__dict__.get("_parallel_config"))  # ring attention enabled after patch
        if _in_backward():  # a checkpointed forward recomputed: replay, and leave the clock alone
            self._local.context = CallContext(info=None, replay=True)
            return
        if torch.compiler.is_exporting():
            if not self.uniform_dense:
                raise RuntimeError(
                    "sparse-dit: torch.export of a model patched with sparse patterns is not supported (layouts depend "
                    "on the timestep and on data); export the unpatched model, or patch with pattern='dense' to export"
                )
            self._local.context = CallContext(info=None, reason=REASON_EXPORT)
            return
        try:
            info = self.adapter.read_call(transformer, args, kwargs)
        except NoGridError as e:  # an input the adapter cannot map to a grid: dense, counted, said once
            self.warn_once(f"nogrid:{e}", f"sparse-dit: {e}; these calls run dense")
            self._local.context = CallContext(info=None, reason=REASON_NO_GRID)
            return
        clock = self.clock
        clock.tick(info.timestep)
        record = CallRecord() if torch.is_grad_enabled() else None
        self._local.context = CallContext(info, None, clock.step, clock.branch, clock.generation, record=record)

    def on_transformer_done(self, output: Any) -> None:
        ctx = self.context
        self._local.context = None
        if ctx is None or ctx.record is None or not ctx.record.decisions:
            return
        node = _grad_node(output)
        if node is not None:  # kept by the graph as long as a backward may recompute this forward
            node.metadata.setdefault(_RECORD_KEY, []).append(ctx.record)
            with self._lock:
                self._records = [r for r in self._records if r() is not None]
                self._records.append(weakref.ref(ctx.record))

    def enter_layer(self, layer: int, module: torch.nn.Module) -> None:
        self._local.entered = getattr(self._local, "entered", 0) + 1
        counts = self._thread("sdpa_calls", dict)
        counts[layer] = 0
        self._pin_backend(module)

    def exit_layer(self, layer: int, module: torch.nn.Module) -> None:
        ctx = self.context
        if ctx is None or ctx.replay:
            return
        calls = self._thread("sdpa_calls", dict).get(layer, 1)
        if calls == 0 and _cache_may_skip(module):
            return  # a step cache (PAB, FasterCache, TaylorSeer on attention) returned this call's output: skipped
        self._thread("ran", set).add(layer)
        if calls == 0:
            # the processor never reached scaled_dot_product_attention (a custom processor, or one with its
            # own attention): this call was dense, whatever the plan
            self._count_dense(REASON_BYPASS)
            self.warn_once(
                f"bypass:{type(module.processor).__name__}",
                f"sparse-dit: the attention processor {type(module.processor).__name__} does not call "
                "torch.nn.functional.scaled_dot_product_attention, so its layers ran dense; use diffusers' default "
                "processor (model.set_default_attn_processor() or set_attn_processor with the stock class) for sparse attention",
            )

    # ------------------------------------------------------------------------------- backends
    def _pin_backend(self, module: torch.nn.Module) -> None:
        """Make the module's processor call SDPA (diffusers' native backend), remembering the user's latest choice."""
        processor = getattr(module, "processor", None)
        if processor is None:
            return
        own = vars(processor)
        saved = self.saved_backends.get(id(processor))
        current = own.get("_attention_backend", _MISSING)
        if saved is not None and saved[0] is processor and (saved[3] is _NO_BACKEND or current is saved[3]):
            return  # the common case, every call: nothing changed since the last one
        if saved is None or saved[0] is not processor:  # a processor set after `patch` (or at patch time)
            uses_backend = "_attention_backend" in own or any("_attention_backend" in vars(c) for c in type(processor).__mro__)
            saved = [processor, "_attention_backend" in own, own.get("_attention_backend"), None if uses_backend else _NO_BACKEND]
            self.saved_backends[id(processor)] = saved
            if not uses_backend:  # calls SDPA itself (CogVideoX, SD3): nothing to pin
                return
        else:  # the user chose another backend since: theirs to restore, ours to run
            saved[1], saved[2] = True, current
        # The pin is also what makes code compiled before `patch` re-trace (and so see the hooks):
        # dynamo does not guard on hook dicts that were empty at compile time
        # (torch._dynamo.config.skip_nnmodule_hook_guards) but guards this attribute by identity
        # (enum, None) or type and value (str), so store a value of another type than the current one.
        value = getattr(processor, "_attention_backend", None)
        pin = "native" if type(value) is not str else _native_backend_enum()
        processor._attention_backend = pin
        saved[3] = pin

    def restore_backends(self) -> None:
        for processor, had, value, pin in self.saved_backends.values():
            if pin is _NO_BACKEND or vars(processor).get("_attention_backend", _MISSING) is not pin:
                continue  # the user chose a backend since the last call: that is their latest choice
            if had:
                processor._attention_backend = value
            else:
                vars(processor).pop("_attention_backend", None)
        self.saved_backends.clear()

    def _user_backend(self, layer: int) -> Any:
        """The diffusers attention backend the user chose for this layer's processor (None: native)."""
        processor = getattr(self.modules[layer], "processor", None)
        saved = self.saved_backends.get(id(processor)) if processor is not None else None
        if saved is None or saved[0] is not processor or saved[3] is _NO_BACKEND:
            return None  # a processor that calls SDPA itself, whatever backend is chosen
        choice = saved[2]
        if choice is None:  # as diffusers: the globally active backend
            try:
                from diffusers.models.attention_dispatch import _AttentionBackendRegistry

                choice = _AttentionBackendRegistry.get_active_backend()[0]
            except (ImportError, AttributeError):
                return None
        name = getattr(choice, "value", choice)
        return None if name in (None, "native") else choice

    def _user_chose_native(self, layer: int) -> bool:
        """True when the user set diffusers' native backend on this layer's processor explicitly."""
        processor = getattr(self.modules[layer], "processor", None)
        saved = self.saved_backends.get(id(processor)) if processor is not None else None
        if saved is None or saved[0] is not processor or saved[3] is _NO_BACKEND or not saved[1]:
            return False
        return getattr(saved[2], "value", saved[2]) == "native"

    def _dense(self, layer: int, args: tuple, kwargs: dict, a: dict) -> torch.Tensor:
        """Dense attention on the user's diffusers backend when they chose one (an explicit "native", or the identity
        patch ``pattern="dense"``: torch's SDPA as is), else the fastest available (`kernels.dense_attention`: FA4, else SDPA with cuDNN first on Hopper+)."""
        backend = self._user_backend(layer)
        if backend is None:
            # pattern="dense" is the identity patch: it stays bit-identical to the unpatched model (its SDPA call)
            if self.uniform_dense or self._user_chose_native(layer):
                return _SDPA(*args, **kwargs)
            from sparse_dit.kernels import dense_attention

            return dense_attention(**a, sdpa=_SDPA)
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        q, k, v = (a[n].transpose(1, 2) for n in ("query", "key", "value"))
        out = dispatch_attention_fn(
            q, k, v, attn_mask=a.get("attn_mask"), dropout_p=a.get("dropout_p", 0.0), is_causal=a.get("is_causal", False),
            scale=a.get("scale"), enable_gqa=a.get("enable_gqa", False), backend=backend,
        )
        return out.transpose(1, 2)

    # ------------------------------------------------------------------------------------ planning
    def geometry(self, B: int, S: int, H: int, D: int) -> Geometry | None:
        """The call's geometry, or None when the sequence does not fit the grid the transformer's hook read."""
        found = self.geometry_and_order(B, S, H, D)
        return None if found is None else found[0]

    def geometry_and_order(
        self, B: int, S: int, H: int, D: int, cp: UlyssesSlice | None = None
    ) -> tuple[Geometry, torch.Tensor | None] | None:
        """The call's geometry and, when the layout needs another token order than diffusers', that order.

        Image tokens that are not part of the grid (``CallInfo.extra_len``, after the grid) are attended like text.
        Where text comes last they already sit between grid and text; where text comes first the sequence is taken
        as [extra, text, grid], so text and extra tokens form one range whose real keys are a prefix (padded prompts).
        cp: the rank's Ulysses slice under context parallelism: its S is the whole sequence, gathered rank by rank
        (`context_parallel.gathered_positions`), and the order maps the layout's positions into that sequence.
        """
        ctx = self.context
        if ctx is None or ctx.info is None:
            return None
        F_, H_, W_ = ctx.info.grid
        video, extra = F_ * H_ * W_, ctx.info.extra_len
        position = self.adapter.text_position
        text_len = S - video - extra if position != "none" else 0
        if text_len < 0 or (position == "none" and S != video + extra):
            self.warn_once(
                f"seq:{S}:{video}:{extra}",
                f"sparse-dit: self-attention over {S} tokens but the grid {ctx.info.grid} has {video} video tokens "
                f"(and {extra} other image tokens); the {self.adapter.family} adapter does not describe this call's "
                "sequence, so it runs dense",
            )
            return None
        order = None
        if extra and position == "first" and text_len:
            key = (S, text_len, video)
            order = self._orders.get(key)
            if order is None:
                order = torch.cat([torch.arange(text_len + video, S), torch.arange(0, text_len), torch.arange(text_len, text_len + video)])
                self._orders[key] = order
        if cp is not None:
            segments = (text_len, S - text_len) if position == "first" else (S - text_len, text_len)
            key = ("cp", cp, segments)
            gathered = self._orders.get(key)
            if gathered is None:
                gathered = gathered_positions([n for n in segments if n], cp)
                if torch.equal(gathered, torch.arange(S)):
                    gathered = _IDENTITY
                self._orders[key] = gathered
            if gathered is not _IDENTITY:
                order = gathered if order is None else gathered[order]
        if extra and position != "first":
            position = "last"
        side = text_len + extra
        geometry = Geometry(B, H, D, F_, H_, W_, text_len=side, text_position=position if side else "none")
        return geometry, order

    def build_layout(self, layer: int, plan: HeadPlan, geometry: Geometry, q: torch.Tensor, k: torch.Tensor) -> Layout:
        """Layout for all heads of one call; static head groups come from the cache."""
        groups: dict[PatternSpec, list[int]] = {}
        for h, spec in enumerate(plan):
            groups.setdefault(spec, []).append(h)
        all_static = all(spec.static for spec in groups)
        key = (tuple(s.key() for s in plan), geometry, self.block_size, q.device)
        if all_static:
            cached = self.layout_cache.get_recent(key)
            if cached is not None:
                return cached
        clock = self.clock
        branch = min(clock.branch, 3)  # pipelines make at most a few calls per step (CFG branches)
        reuse_key = (layer, key, branch)
        if not all_static and reuse_key in self.dynamic_layouts:
            generation, built, layout = self.dynamic_layouts[reuse_key]
            if generation == clock.generation and 0 <= clock.step - built < self.replan_every:
                return layout
        parts, placed = [], []
        static_groups = [(spec, heads) for spec, heads in groups.items() if spec.static]
        if static_groups:
            # every static group of a mixed layer comes as one cached pre-stacked part (its chunk tables primed once),
            # so a call restacks one static part plus the dynamic ones however many static groups the plan has
            part_key = ("static", tuple((s.key(), len(h)) for s, h in static_groups), geometry, self.block_size, q.device, q.dtype)
            part = None if all_static else self.layout_cache.get_recent(part_key)
            if part is None:
                built = [s.module.build(geometry, len(h), self.block_size, q.device, **s.params) for s, h in static_groups]
                part = Layout.stack_heads(built)
                if not all_static:
                    from sparse_dit.kernels import triton_supported

                    if self.backend != "reference" and triton_supported(q):
                        from sparse_dit.kernels.planning_triton import prime_chunk_tables

                        prime_chunk_tables(part, q.dtype, q.shape[-1])
                    self.layout_cache[part_key] = part
            parts.append(part)
            placed.append([h for _, heads in static_groups for h in heads])
        for spec, heads in groups.items():
            if spec.static:
                continue
            # one warm-start state per (layer, head group) for all CFG branches: their activations differ only through
            # the prompt, so a branch starts from the latest plan's centroids; one per branch held twice as much
            # between calls (k-means at Wan2.1-14B 720p: 0.56 GiB per copy)
            state = self.layer_state.setdefault((layer, spec.key(), tuple(heads)), {})
            step = heads[1] - heads[0] if len(heads) > 1 else 1
            if step > 0 and heads == list(range(heads[0], heads[-1] + 1, step)):
                # evenly spaced heads (a run, or every step-th head as a cyclic mix gives): strided views, no copy
                # (the planners read any strides; a copy of a group's q and k was 1.7% of a mixed Wan 480p step)
                sl = slice(heads[0], heads[-1] + 1, step)
                qh, kh = q[:, :, sl], k[:, :, sl]
            else:
                index = self._head_index(heads, q.device)
                qh, kh = q.index_select(2, index), k.index_select(2, index)
            parts.append(
                spec.module.build(
                    geometry,
                    len(heads),
                    self.block_size,
                    q.device,
                    q=qh,
                    k=kh,
                    state=state,
                    **spec.params,
                )
            )
            placed.append(heads)
        # one write per part into its heads' slots: no restacking per group, no gather to restore the head order
        layout = Layout.stack_heads(parts, heads=[self._head_index(h, q.device) for h in placed] if len(parts) > 1 else placed)
        if all_static:
            self.layout_cache[key] = layout
        elif self.replan_every > 1:  # kept only for reuse: per layer and branch they can add up to GBs at 720p
            reuse = self.dynamic_layouts
            for stale in [k for k, v in reuse.items() if v[0] != clock.generation]:
                del reuse[stale]  # a finished generation's layouts are never reused
            layout = layout.compact()  # sync-free plans have worst-case table widths: trim what is kept (one sync)
            reuse[reuse_key] = (clock.generation, clock.step, layout)
        return layout

    def _head_index(self, heads: list[int], device: torch.device) -> torch.Tensor:
        """``heads`` as an int64 tensor on ``device``, cached: a list copied to a GPU on every call would wait for it."""
        key = ("head_index", tuple(heads), device)
        index = self.layout_cache.get_recent(key)
        if index is None:
            index = torch.tensor(heads, dtype=torch.long, device=device)
            self.layout_cache[key] = index
        return index

    def _with_text_valid(self, layout: Layout, text_valid: torch.Tensor, geometry: Geometry) -> Layout:
        # one object per (layout, prompt lengths): the same prompts recur every step, and backends
        # cache what they derive from a layout object; bounded, as prompts vary without end in a server
        key = (layout, tuple(text_valid.tolist()))
        padded = self._text_valid_layouts.get_recent(key)
        if padded is None:
            padded = layout.with_text_valid(text_valid, geometry.text_range)
            self._text_valid_layouts[key] = padded
        return padded

    # ----------------------------------------------------------------------------------- attend
    def end_call(self, transformer: torch.nn.Module) -> None:
        """After a transformer call: count the layers a step cache skipped; warn once when no patched layer ran and
        no step cache explains it (compiled code that bypasses the hooks)."""
        ran = getattr(self._local, "ran", None)
        missing = len(self.modules) - (len(ran) if ran is not None else 0)
        if missing <= 0:
            return
        if _step_cache_on(transformer):
            with self._lock:
                self.skipped_calls += missing
            return
        if not getattr(self._local, "entered", 0):
            # Never silently dense: code compiled and run before `patch` does not call hooks added later
            # when the processors read no `_attention_backend` for the pin to change (CogVideoX, SD3).
            self.warn_once(
                "not-entered",
                f"sparse-dit: no patched attention layer ran in this {type(transformer).__name__} call, so its attention "
                "was dense. If the model was compiled and run before sparse_dit.patch, torch.compile is reusing code "
                "that skips sparse-dit's hooks: call torch.compiler.reset() after patching, or patch before compiling.",
            )

    def _count_dense(self, reason: str) -> None:
        with self._lock:
            self.dense_calls += 1
            self.dense_reasons[reason] = self.dense_reasons.get(reason, 0) + 1

    def _decide(self, layer: int, a: dict) -> Decision:
        """Dense (with a reason) or the layout of this call; runs the observer. Raises for a profile on another grid."""
        query, key = a["query"], a["key"]
        if a.get("is_causal", False):
            return Decision(REASON_CAUSAL, None, None)
        if a.get("dropout_p", 0.0):
            return Decision(REASON_DROPOUT, None, None)
        if a.get("enable_gqa", False) or query.shape[1] != key.shape[1]:
            return Decision(REASON_GQA, None, None)
        if query.shape[-2] != key.shape[-2]:
            return Decision(REASON_CROSS, None, None)
        ctx = self.context
        if ctx is None or ctx.info is None:
            return Decision(ctx.reason if ctx is not None and ctx.reason else REASON_NO_GRID, None, None)
        B, H, S, D = query.shape
        cp = ulysses_slice(self.modules[layer])  # raises for ring attention
        if cp is not None and self.observer is not None:
            raise ValueError(
                "sparse-dit: profiling under context parallelism is not supported (each rank sees a slice of the heads); "
                "profile on one GPU, then patch the context-parallel model with the profile"
            )
        found = self.geometry_and_order(B, S, H, D, cp)
        if found is None:
            return Decision(REASON_NO_GRID, None, None)
        geometry, order = found
        text_valid = None
        if a.get("attn_mask") is not None:
            mask = a["attn_mask"]
            if order is not None and mask.shape[-1] == S:
                mask = mask.index_select(-1, order.to(mask.device))
            text_valid = text_valid_from_key_mask(mask, geometry)
            if text_valid is None:  # a mask other than prompt padding: leave the call to dense attention
                return Decision(REASON_MASK, None, None)
        self.last_geometry = geometry
        q, k = _in_order(query.transpose(1, 2), order), _in_order(key.transpose(1, 2), order)
        if self.observer is not None:
            v = _in_order(a["value"].transpose(1, 2), order)
            self.observer(layer, geometry, ctx.info.timestep, q, k, v, a.get("scale"))
        if ctx.step < self.dense_steps:
            return Decision(REASON_WARMUP, None, None)
        source = self.plan_source if self.plan_source_at is None else self.plan_source_at(geometry.grid)
        plan = source(layer, ctx.info.timestep, ctx.step)
        if plan is not None and cp is not None:  # this rank's heads (diffusers' contiguous Ulysses slicing)
            start, end = cp.heads(len(plan))
            if end - start != H:
                raise ValueError(
                    f"sparse-dit: layer {layer} on Ulysses rank {cp.rank} of {cp.degree} should attend heads {start}..{end - 1} "
                    f"of the plan's {len(plan)} but the call has {H} heads; patch with a plan for the whole model's heads"
                )
            plan = plan[start:end]
            with self._lock:
                self.head_range = (start, end)
        if plan is None or all(spec.name == "dense" for spec in plan):
            return Decision(REASON_PLAN, None, None)
        if len(plan) != H:
            raise ValueError(f"sparse-dit: layer {layer} has a plan for {len(plan)} heads but the model has {H}")
        layout = self.build_layout(layer, plan, geometry, q, k)
        if text_valid is not None:
            layout = self._with_text_valid(layout, text_valid, geometry)
        return Decision(None, layout, None, order, planned=not all(spec.static for spec in plan))

    def _replayed(self, layer: int, occurrence: int, query: torch.Tensor) -> Decision | None:
        """The decision the forward being recomputed made at this call (the latest recorded one whose query matches)."""
        with self._lock:
            records = [r() for r in self._records]
        found = [r.decisions[(layer, occurrence)] for r in records if r is not None and (layer, occurrence) in r.decisions]
        if len(found) > 1:
            probe = _probe(query)
            matching = [d for d in found if d.probe is not None and d.probe.shape == probe.shape and torch.equal(d.probe, probe)]
            found = matching or found
        return found[-1] if found else None

    def attend(self, layer: int, args: tuple, kwargs: dict) -> torch.Tensor:
        """The intercepted SDPA call: q, k, v (B, H, S, D) as diffusers' native backend passes them."""
        a = _bind_sdpa(args, kwargs)
        counts = self._thread("sdpa_calls", dict)
        occurrence = counts.get(layer, 0)
        counts[layer] = occurrence + 1
        ctx = self.context
        if ctx is None or ctx.replay:  # outside a forward: a recomputation in backward (gradient checkpointing)
            decision = self._replayed(layer, occurrence, a["query"])
            if decision is None:
                self.warn_once(
                    "norecord",
                    "sparse-dit: a patched attention layer ran outside the transformer's forward with no recorded "
                    "forward to replay (the grid is unknown); it runs dense",
                )
                decision = Decision(REASON_NO_RECORD, None, None)
            with self._lock:
                self.recomputed_calls += 1
            return self._execute(layer, decision, args, kwargs, a)
        with torch.no_grad():  # planning is not differentiated (and must save nothing a recomputation would not)
            decision = self._decide(layer, a)
        if ctx.record is not None:
            ctx.record.decisions[(layer, occurrence)] = decision._replace(probe=_probe(a["query"]))
        if decision.reason is not None:
            self._count_dense(decision.reason)
        else:
            layout = decision.layout
            density = layout.cached("mean_density", lambda: layout.density_per_head().mean())
            with self._lock:
                self.sparse_calls += 1
                self.density_total = self.density_total + density
        return self._execute(layer, decision, args, kwargs, a)

    def _execute(self, layer: int, decision: Decision, args: tuple, kwargs: dict, a: dict) -> torch.Tensor:
        if decision.reason is not None:
            return self._dense(layer, args, kwargs, a)
        # diffusers' native backend hands (B, H, S, D) views of (B, S, H, D) tensors: undo the view, no copy.
        q, k, v = (a[n].transpose(1, 2) for n in ("query", "key", "value"))
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        backend, warning = choose_backend(self.backend, q, needs_grad)
        if warning is not None:
            self.warn_once("grad-backend", warning)
        order = decision.order
        if order is not None:  # copies in the layout's order, and the output back to diffusers' order
            q, k, v = (_in_order(t, order) for t in (q, k, v))
        # "auto" measures the engines only on layouts that are reused (static patterns): a planned layout is converted
        # to Gluon/FA4 block tables on every plan (without a host sync only where its planner marked it whole key
        # blocks, k-means without text), and on Gluon k-means attention was 1.2-1.4x slower than on Triton (Wan 480p,
        # H200, benchmarks/results/e2e.md 2026-12-04 09:03)
        measured = self.backend in ("gluon", "fa4") or (self.backend == "auto" and not decision.planned)
        engines = self.engines if measured else None
        out = _run_backend(backend, engines)(q, k, v, decision.layout, scale=a.get("scale"))
        if order is not None:
            out = out.index_select(1, order.to(out.device).argsort())
        return out.transpose(1, 2)


_MISSING = object()
_IDENTITY = object()  # a cached token order that changes nothing
_NO_BACKEND = object()  # marks a processor without diffusers' `_attention_backend` setting


# diffusers hook modules whose `new_forward` always runs the module (they cast, offload or split; they never skip)
_NON_SKIPPING_HOOKS = ("layerwise_casting", "group_offloading", "context_parallel")


def _cache_may_skip(module: torch.nn.Module) -> bool:
    """Whether a step cache can return ``module``'s output without running it: a diffusers hook (FirstBlockCache,
    TaylorSeer, MagCache, PyramidAttentionBroadcast, FasterCache, ...) that replaces its forward."""
    registry = module.__dict__.get("_diffusers_hook")
    hooks = getattr(registry, "hooks", None) or {}
    return any(
        hasattr(hook, "new_forward") and type(hook).__module__.rsplit(".", 1)[-1] not in _NON_SKIPPING_HOOKS
        for hook in hooks.values()
    )


def _step_cache_on(transformer: torch.nn.Module) -> bool:
    """Whether a step cache is installed on ``transformer``: a skipping diffusers hook on it or any submodule, or
    cache-dit (which marks the transformers it caches with ``_is_cached``)."""
    if transformer.__dict__.get("_is_cached"):
        return True
    return any(_cache_may_skip(m) for m in transformer.modules())


def _in_order(t: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """(B, S, H, D) tokens in ``order`` (a copy), or ``t`` itself when there is no order."""
    return t if order is None else t.index_select(1, order.to(t.device))


def _grad_node(output: Any) -> Any:
    """The autograd node of the first tensor in a transformer's output that has one, else None."""
    if isinstance(output, torch.Tensor):
        return output.grad_fn
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    if hasattr(output, "to_tuple") and not isinstance(output, dict):
        values = output.to_tuple()
    for value in values:
        node = _grad_node(value)
        if node is not None:
            return node
    return None


def text_valid_from_key_mask(mask: torch.Tensor, geometry: Geometry) -> torch.Tensor | None:
    """(B,) number of real prompt tokens when ``mask`` is a key-padding mask over the text that keeps
    every video key and a prefix of the text keys; None for any other mask.

    mask: bool (True = attend) or additive float, broadcastable to (B, 1, 1, S) or given as (B, S).
    """
    if geometry.text_range is None:
        return None
    S = geometry.seq_len
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        keys = mask[:, 0, 0]
    elif mask.dim() == 2:
        keys = mask
    else:
        return None
    if keys.shape[-1] != S:
        return None
    keep = keys if keys.dtype == torch.bool else keys > -1e3  # additive masks use 0 / large negative
    keep = keep.expand(geometry.batch, S)
    a, e = geometry.text_range
    video = torch.cat([keep[:, :a], keep[:, e:]], 1)
    if not bool(video.all()):
        return None
    text = keep[:, a:e].to(torch.int32)
    n = text.sum(1)
    prefix = torch.arange(e - a, device=keep.device)[None, :] < n[:, None]
    if not torch.equal(text.bool(), prefix):
        return None
    return n.to(torch.int32)


def _profiles_per_transformer(pipe: Any, targets: list, profile: Any) -> dict[int, Any]:
    """Profile of each target transformer: one for all, or a mapping from pipeline attribute
    (``{"transformer": ..., "transformer_2": ...}`` for Wan 2.2) to profile."""
    from collections.abc import Mapping

    from sparse_dit.profile import Profile

    if not isinstance(profile, Mapping):
        one = Profile.coerce(profile)
        return {id(t): one for t, _ in targets}
    out = {}
    for transformer, _ in targets:
        name = next((n for n in profile if unwrap_compiled(getattr(pipe, n, None)) is transformer), None)
        if name is None:
            raise ValueError(f"profile mapping has no entry for this pipeline's {type(transformer).__name__}; keys: {sorted(profile)}")
        out[id(transformer)] = Profile.coerce(profile[name])
    return out


def _heads_of(module: torch.nn.Module) -> int:
    heads = getattr(module, "heads", None)
    if heads is None:
        raise ValueError(f"attention module {type(module).__name__} has no 'heads' attribute")
    return int(heads)


def is_patched(model: torch.nn.Module) -> bool:
    return STATE_ATTR in unwrap_compiled(model).__dict__


def patch(
    pipe_or_transformer: Any,
    pattern: str | PatternSpec | dict | None = None,
    *,
    profile: Any = None,
    dense_steps: int = 0,
    block_size: int | None = None,
    backend: str = "auto",
    replan_every: int = 1,
) -> Any:
    """Replace self-attention in a diffusers pipeline or transformer with sparse attention.

    pattern: one pattern for every layer and head (``"dense"``, ``PatternSpec("mask", block_mask=..., block_size=16)``,
        or ``{"name": ..., **params}``). profile: a per-layer/head plan (path, `Profile` or shipped name), or
        for two-transformer pipelines (Wan 2.2) a mapping ``{"transformer": ..., "transformer_2": ...}``;
        give one of pattern and profile. dense_steps: the first denoising steps run dense. block_size: query block of
        the layouts the patterns build (default: the profile's, else 128). backend: "auto" (on a supported GPU the
        fastest by measurement of the Triton kernel, the Gluon engine (Hopper, Triton 3.6) and the FA4 engine (where
        installed), the last two for layouts of whole 128-key blocks; layouts of dynamic heads, planned per call,
        stay on Triton; else the reference), "gluon" / "fa4" (that engine wherever it can run, else as "auto"),
        "triton" or "reference". Dense calls run on the user's diffusers backend if one was chosen, else
        the fastest dense attention available (FA4, cuDNN SDPA).
        replan_every: dynamic patterns (kmeans, prune) plan a new layout on every replan_every-th sparse denoising
        step and reuse it in between (1 = every step, as Sparse VideoGen2 does; larger trades a little fidelity for
        much less planning time).

    Patching twice replaces the earlier patch; `unpatch` restores the model exactly. Returns its input.
    """
    if pattern is not None and profile is not None:
        raise ValueError("give either pattern= or profile=, not both")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}")
    targets = resolve_transformers(pipe_or_transformer)
    spec = PatternSpec.coerce(pattern if pattern is not None else "dense") if profile is None else None
    profiles = _profiles_per_transformer(pipe_or_transformer, targets, profile) if profile is not None else {}
    if int(dense_steps) < 0 or (block_size is not None and int(block_size) < 16):
        raise ValueError("dense_steps must be >= 0 and block_size >= 16")
    if isinstance(replan_every, bool) or int(replan_every) != replan_every or replan_every < 1:
        raise ValueError(f"replan_every must be an int >= 1 (1 = re-plan dynamic patterns every step); got {replan_every!r}")
    installs = []
    clocks = ThreadClocks()  # shared by the pipeline's transformers
    for transformer, adapter in targets:  # everything is checked before anything is changed
        check_parallel_config(transformer.__dict__.get("_parallel_config"))
        modules = adapter.self_attention(transformer)
        size = int(block_size or 128)
        plan_source_at = None
        if spec is not None:
            plan_source: Callable = _UniformPlan(spec, _heads_of(modules[0]))
        else:
            prof = profiles[id(transformer)]
            prof.check_fits(transformer, modules)
            plan_source = _ProfilePlan(prof)
            size = int(block_size or prof.header.get("block_size", 128))
            plan_source_at = _ProfileGridPlan(prof, size)  # the plan restated per call grid
        state = PatchState(adapter, plan_source, int(dense_steps), size, backend, modules, int(replan_every), clocks=clocks)
        state.plan_source_at = plan_source_at
        installs.append((transformer, state))
    for transformer, state in installs:
        unpatch(transformer)
        _install(transformer, state)
    return pipe_or_transformer


# The hooks are module-level functions (so copies and pickles of a model keep working hooks) that find their state
# through the module they are called with. Each runs eagerly under torch.compile (it is Python bookkeeping: reading the
# call, ticking the clock, pushing the mode): traced, each layer's hook would guard on its own mode object and
# recompile per layer.
def _transformer_pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    _compiler_disabled(_transformer_pre)(module, args, kwargs)


def _transformer_pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    state = module.__dict__.get(STATE_ATTR)
    if state is not None:
        state.on_transformer_call(module, args, kwargs)


def _transformer_post_hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
    _compiler_disabled(_transformer_post)(module, output)


def _transformer_post(module: torch.nn.Module, output: Any) -> None:
    state = module.__dict__.get(STATE_ATTR)
    if state is None:
        return
    replay = state.context is not None and state.context.replay
    state.on_transformer_done(output)
    if not replay and sys.exc_info()[0] is None:  # (not when forward raised)
        state.end_call(module)


def _attention_pre_hook(module: torch.nn.Module, args: tuple) -> None:
    _compiler_disabled(_attention_pre)(module)


def _attention_pre(module: torch.nn.Module) -> None:  # returns None: a pre-hook's return value would replace the inputs
    entry = module.__dict__.get(LAYER_ATTR)
    if entry is None:
        return
    state, layer = entry
    state.enter_layer(layer, module)
    mode = state.modes[layer]
    mode.entered().append(_caller_frame())
    mode.__enter__()


def _attention_post_hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
    _compiler_disabled(_attention_post)(module)


def _attention_post(module: torch.nn.Module) -> None:
    entry = module.__dict__.get(LAYER_ATTR)
    if entry is None:
        return
    state, layer = entry
    mode = state.modes[layer]
    frames = mode.entered()
    if frames:
        frames.pop()
        stack = _torch_function_stack()
        if stack and stack[-1] is mode:
            mode.__exit__(None, None, None)
        else:  # something above it on the stack: take ours out without disturbing the rest
            _drop_interceptors(lambda m: m is mode)
    state.exit_layer(layer, module)


_HOOKS = (_transformer_pre_hook, _transformer_post_hook, _attention_pre_hook, _attention_post_hook)


def _native_backend_enum() -> Any:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return AttentionBackendName.NATIVE


def _install(transformer: torch.nn.Module, state: PatchState) -> None:
    transformer.register_forward_pre_hook(_transformer_pre_hook, with_kwargs=True)
    transformer.register_forward_hook(_transformer_post_hook, always_call=True)
    for layer, module in enumerate(state.modules):
        module.__dict__[LAYER_ATTR] = (state, layer)
        state._pin_backend(module)
        module.register_forward_pre_hook(_attention_pre_hook)
        module.register_forward_hook(_attention_post_hook, always_call=True)
    state.installed = True
    transformer.__dict__[STATE_ATTR] = state


def _remove_hooks(module: torch.nn.Module) -> None:
    """Remove sparse-dit's hooks from ``module`` (found by identity, so this also works on copies)."""
    for name in ("_forward_pre_hooks", "_forward_hooks"):
        hooks = getattr(module, name)
        for hook_id in [i for i, h in hooks.items() if h in _HOOKS]:
            del hooks[hook_id]
            for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                getattr(module, extra, {}).pop(hook_id, None)


def unpatch(pipe_or_transformer: Any) -> Any:
    """Remove sparse-dit from a pipeline or transformer; a no-op where it was not patched. Returns its input.

    Restores each patched processor's attention backend to the user's latest choice, and clears interceptors an
    interrupted forward may have left on this thread."""
    for transformer, _ in resolve_transformers(pipe_or_transformer):
        state: PatchState | None = transformer.__dict__.pop(STATE_ATTR, None)
        if state is None:
            continue
        state.installed = False
        _remove_hooks(transformer)
        for module in state.modules:
            _remove_hooks(module)
            module.__dict__.pop(LAYER_ATTR, None)
        state.restore_backends()
        _drop_interceptors(lambda m: m.state is state)
    clear_stale_interceptors()
    return pipe_or_transformer


def patch_state(model: torch.nn.Module) -> PatchState | None:
    """The state of a patched transformer (for inspection), or None."""
    return unwrap_compiled(model).__dict__.get(STATE_ATTR)
