"""`patch` / `unpatch`: route the self-attention of a diffusers DiT through sparse-dit, and back.

How the interception works, without copying or monkey-patching diffusers:
- a forward pre-hook on the transformer reads the call's batch, post-patchify grid and timestep;
- each self-attention module gets a pre-hook that pushes a ``TorchFunctionMode`` and an always-run
  post-hook that pops it, so while (and only while) that module runs, the
  ``scaled_dot_product_attention`` call inside diffusers' own processor lands in sparse-dit;
- the processors of patched modules are pinned to diffusers' "native" backend (the one that calls
  ``scaled_dot_product_attention``) and their previous backend is restored by ``unpatch``;
- under ``torch.compile`` the hooks and the intercepted call run eagerly at one graph break per attention
  call (``torch.compiler.disable``); everything else in the blocks stays compiled.
Everything lives on the patched model instance; nothing is global.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sparse_dit.geometry import Geometry
from sparse_dit.layout import Layout
from sparse_dit.patterns import PatternSpec
from sparse_dit.pipelines import CallInfo, ModelAdapter, resolve_transformers, unwrap_compiled

STATE_ATTR = "_sparse_dit_state"
_SDPA = F.scaled_dot_product_attention
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_BACKENDS = ("auto", "triton", "reference")

HeadPlan = tuple[PatternSpec, ...]


def _bind_sdpa(args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(_SDPA_PARAMS, args))
    bound.update(kwargs)
    return bound


def _run_backend(name: str) -> Callable[..., torch.Tensor]:
    from sparse_dit import kernels

    if name == "reference":
        return kernels.reference_attention
    if name == "triton":
        from sparse_dit.kernels.triton_attention import triton_block_sparse_attention

        return triton_block_sparse_attention
    return kernels.block_sparse_attention


class _AttentionInterceptor(TorchFunctionMode):
    """Active only while one patched attention module runs; hands its SDPA call to the patch state."""

    def __init__(self, state: "PatchState", layer: int) -> None:
        super().__init__()
        self.state = state
        self.layer = layer
        self.attend_eagerly = _compiler_disabled(_attend_eagerly)  # one object for every layer and model

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
    return mode.state.attend(mode.layer, args, kwargs)


def _compiler_disabled(fn: Callable) -> Callable:
    """``torch.compiler.disable(fn)``, made on first use and kept on ``fn``: decorating at import would import
    torch._dynamo with sparse_dit (1.5 s; and a TRITON_INTERPRET=1 set after that is no longer honoured)."""
    if "compiler_disabled" not in fn.__dict__:
        fn.compiler_disabled = torch.compiler.disable(fn)
    return fn.compiler_disabled


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


@dataclass
class PatchState:
    """Everything one patched transformer carries: settings, hooks, the current call and caches."""

    adapter: ModelAdapter
    plan_source: Callable[[int, float, int], HeadPlan | None]
    dense_steps: int
    block_size: int
    backend: str
    modules: list[torch.nn.Module]
    # dynamic head groups (kmeans, prune) are re-planned on every replan_every-th denoising step and
    # their layout reused in between: planning costs a large share of a sparse step (benchmarks/results)
    replan_every: int = 1
    handles: list[Any] = field(default_factory=list)
    saved_backends: list[tuple[Any, bool, Any]] = field(default_factory=list)
    call: CallInfo | None = None
    last_geometry: Geometry | None = None
    # called as observer(layer, geometry, timestep, q, k, v, scale) with (B, S, H, D) views before each
    # self-attention; the profiler uses it to compare candidate patterns against dense attention
    observer: Callable[..., None] | None = None
    clock: StepClock = field(default_factory=StepClock)
    # with a profile: grid -> plan source for that grid (the profile's plan restated for it, see
    # `Profile.grid_plan_source`); used instead of plan_source when set
    plan_source_at: Callable[[tuple[int, int, int]], Callable[[int, float, int], HeadPlan | None]] | None = None
    layout_cache: dict[tuple, Layout] = field(default_factory=dict)
    layer_state: dict[tuple, dict] = field(default_factory=dict)
    # (layer, plan/geometry key, branch) -> (generation, step built, layout) of layers with dynamic heads
    dynamic_layouts: dict[tuple, tuple[int, int, Layout]] = field(default_factory=dict)
    sparse_calls: int = 0
    dense_calls: int = 0
    # summed on the device without a host sync per call; read through `stats`
    density_total: torch.Tensor | float = 0.0

    @property
    def step(self) -> int:
        return self.clock.step

    @property
    def branch(self) -> int:
        """Which call of the current step (CFG branches called separately keep their own pattern state)."""
        return self.clock.branch

    @property
    def stats(self) -> dict[str, float]:
        """Calls so far: sparse and dense self-attention calls and the summed density of the sparse ones."""
        total = self.density_total
        return {
            "sparse_calls": self.sparse_calls,
            "dense_calls": self.dense_calls,
            "density_sum": float(total),
            "mean_density": float(total) / self.sparse_calls if self.sparse_calls else 1.0,
        }

    # ------------------------------------------------------------------------------------- hooks
    def on_transformer_call(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        call = self.adapter.read_call(transformer, args, kwargs)
        self.clock.tick(call.timestep)
        self.call = call

    def on_transformer_done(self, *_: Any) -> None:
        self.call = None

    # ------------------------------------------------------------------------------------ planning
    def geometry(self, B: int, S: int, H: int, D: int) -> Geometry:
        if self.call is None:
            raise RuntimeError(
                "sparse-dit: a patched attention layer ran outside the transformer's forward, so the video grid "
                "is unknown; call the transformer (or pipeline) itself"
            )
        F_, H_, W_ = self.call.grid
        video = F_ * H_ * W_
        text_len = S - video if self.adapter.text_position != "none" else 0
        if text_len < 0 or (self.adapter.text_position == "none" and S != video):
            raise RuntimeError(
                f"sparse-dit: self-attention over {S} tokens but the grid {self.call.grid} has {video} video tokens; "
                f"the {self.adapter.family} adapter does not describe this model's sequence"
            )
        position = self.adapter.text_position if text_len else "none"
        return Geometry(B, H, D, F_, H_, W_, text_len=text_len, text_position=position)

    def build_layout(self, layer: int, plan: HeadPlan, geometry: Geometry, q: torch.Tensor, k: torch.Tensor) -> Layout:
        """Layout for all heads of one call; static head groups come from the cache."""
        groups: dict[PatternSpec, list[int]] = {}
        for h, spec in enumerate(plan):
            groups.setdefault(spec, []).append(h)
        all_static = all(spec.static for spec in groups)
        key = (tuple(s.key() for s in plan), geometry, self.block_size, q.device)
        if all_static and key in self.layout_cache:
            return self.layout_cache[key]
        branch = min(self.branch, 3)  # pipelines make at most a few calls per step (CFG branches)
        reuse_key = (layer, key, branch)
        if not all_static and reuse_key in self.dynamic_layouts:
            generation, built, layout = self.dynamic_layouts[reuse_key]
            if generation == self.clock.generation and 0 <= self.step - built < self.replan_every:
                return layout
        parts, order = [], []
        for spec, heads in groups.items():
            if spec.static:
                # layers mixing static and dynamic heads restack every call: their static parts come cached
                # (all-static layers cache their whole layout below instead)
                part_key = ("part", spec.key(), len(heads), geometry, self.block_size, q.device)
                part = None if all_static else self.layout_cache.get(part_key)
                if part is None:
                    part = spec.module.build(geometry, len(heads), self.block_size, q.device, **spec.params)
                    if not all_static:
                        self.layout_cache[part_key] = part
            else:
                index = torch.tensor(heads, device=q.device)
                state = self.layer_state.setdefault((layer, spec.key(), tuple(heads), branch), {})
                part = spec.module.build(
                    geometry,
                    len(heads),
                    self.block_size,
                    q.device,
                    q=q.index_select(2, index),
                    k=k.index_select(2, index),
                    state=state,
                    **spec.params,
                )
            parts.append(part)
            order += heads
        layout = Layout.stack_heads(parts)
        if order != sorted(order):
            layout = layout.take_heads(torch.tensor(order).argsort())
        if all_static:
            self.layout_cache[key] = layout
        elif self.replan_every > 1:  # kept only for reuse: per layer and branch they can add up to GBs at 720p
            self.dynamic_layouts[reuse_key] = (self.clock.generation, self.step, layout)
        return layout

    def attend(self, layer: int, args: tuple, kwargs: dict) -> torch.Tensor:
        """The intercepted SDPA call: q, k, v (B, H, S, D) as diffusers' native backend passes them."""
        a = _bind_sdpa(args, kwargs)
        query, key, value = a["query"], a["key"], a["value"]
        plain = (
            not a.get("is_causal", False)
            and not a.get("dropout_p", 0.0)
            and not a.get("enable_gqa", False)
            and query.shape[-2] == key.shape[-2]
        )
        if not plain:  # causal, dropout or cross attention: not ours to sparsify
            return _SDPA(*args, **kwargs)
        B, H, S, D = query.shape
        geometry = self.geometry(B, S, H, D)
        text_valid = None
        if a.get("attn_mask") is not None:
            text_valid = text_valid_from_key_mask(a["attn_mask"], geometry)
            if text_valid is None:  # a mask other than prompt padding: leave the call to SDPA
                return _SDPA(*args, **kwargs)
        self.last_geometry = geometry
        if self.observer is not None:
            self.observer(layer, geometry, self.call.timestep, *(t.transpose(1, 2) for t in (query, key, value)), a.get("scale"))
        source = self.plan_source if self.plan_source_at is None else self.plan_source_at(geometry.grid)
        plan = None if self.step < self.dense_steps else source(layer, self.call.timestep, self.step)
        if plan is None or all(spec.name == "dense" for spec in plan):
            self.dense_calls += 1
            return _SDPA(*args, **kwargs)
        if len(plan) != H:
            raise ValueError(f"sparse-dit: layer {layer} has a plan for {len(plan)} heads but the model has {H}")
        # diffusers' native backend hands (B, H, S, D) views of (B, S, H, D) tensors: undo the view, no copy.
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        layout = self.build_layout(layer, plan, geometry, q, k)
        if text_valid is not None:
            # one object per (layout, prompt lengths): the same prompts recur every step, and backends
            # cache what they derive from a layout object
            layout = layout.cached(("text_valid", tuple(text_valid.tolist())), lambda: layout.with_text_valid(text_valid, geometry.text_range))
        out = _run_backend(self.backend)(q, k, v, layout, scale=a.get("scale"))
        self.sparse_calls += 1
        self.density_total = self.density_total + layout.cached("mean_density", lambda: layout.density_per_head().mean())
        return out.transpose(1, 2)


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


def _uniform_plan(spec: PatternSpec, heads: int) -> Callable[[int, float, int], HeadPlan]:
    plan = (spec,) * heads
    return lambda layer, t, step: plan


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
        the layouts the patterns build (default: the profile's, else 128). backend: "auto" (Triton on a supported GPU, else the reference),
        "triton" or "reference". replan_every: dynamic patterns (kmeans, prune) plan a new layout on every
        replan_every-th sparse denoising step and reuse it in between (1 = every step, as Sparse VideoGen2 does;
        larger trades a little fidelity for much less planning time).

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
    clock = StepClock()  # shared by the pipeline's transformers
    for transformer, adapter in targets:  # everything is checked before anything is changed
        modules = adapter.self_attention(transformer)
        size = int(block_size or 128)
        plan_source_at = None
        if spec is not None:
            plan_source = _uniform_plan(spec, _heads_of(modules[0]))
        else:
            prof = profiles[id(transformer)]
            size = int(block_size or prof.header.get("block_size", 128))
            plan_source = prof.plan_source_for(transformer, modules)  # raises before any change if it does not fit
            plan_source_at = prof.grid_plan_source(transformer, modules, size)  # the plan restated per call grid
        state = PatchState(adapter, plan_source, int(dense_steps), size, backend, modules, int(replan_every), clock=clock)
        state.plan_source_at = plan_source_at
        installs.append((transformer, state))
    for transformer, state in installs:
        unpatch(transformer)
        _install(transformer, state)
    return pipe_or_transformer


# Every hook runs eagerly under torch.compile (it is Python bookkeeping: reading the call, ticking the clock,
# pushing the mode): traced, each layer's hook would guard on its own mode object and recompile per layer.
def _enter_hook(mode: TorchFunctionMode, entered: list[int]) -> Callable[..., None]:
    @torch.compiler.disable
    def hook(*_: Any) -> None:  # returns None: a pre-hook's return value would replace the inputs
        entered[0] += 1
        mode.__enter__()

    return hook


def _exit_hook(mode: TorchFunctionMode) -> Callable[..., None]:
    @torch.compiler.disable
    def hook(*_: Any) -> None:
        mode.__exit__(None, None, None)

    return hook


def _transformer_hooks(state: PatchState, entered: list[int]) -> tuple[Callable[..., None], Callable[..., None]]:
    warned = []

    @torch.compiler.disable
    def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        entered[0] = 0
        state.on_transformer_call(module, args, kwargs)

    @torch.compiler.disable
    def after(module: torch.nn.Module, *_: Any) -> None:
        state.on_transformer_done()
        if not entered[0] and not warned and sys.exc_info()[0] is None:  # (not when forward raised)
            # Never silently dense: code compiled and run before `patch` does not call hooks added later
            # when the processors read no `_attention_backend` for the pin below to change (CogVideoX, SD3).
            warned.append(True)
            warnings.warn(
                f"sparse-dit: no patched attention layer ran in this {type(module).__name__} call, so its attention "
                "was dense. If the model was compiled and run before sparse_dit.patch, torch.compile is reusing code "
                "that skips sparse-dit's hooks: call torch.compiler.reset() after patching, or patch before compiling.",
                stacklevel=2,
            )

    return before, after


def _native_backend_enum() -> Any:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return AttentionBackendName.NATIVE


def _install(transformer: torch.nn.Module, state: PatchState) -> None:
    entered = [0]  # patched attention layers entered during the current transformer call
    before, after = _transformer_hooks(state, entered)
    state.handles.append(transformer.register_forward_pre_hook(before, with_kwargs=True))
    state.handles.append(transformer.register_forward_hook(after, always_call=True))
    seen: set[int] = set()
    for layer, module in enumerate(state.modules):
        processor = getattr(module, "processor", None)
        if processor is not None and id(processor) not in seen:
            seen.add(id(processor))
            had = "_attention_backend" in vars(processor)
            state.saved_backends.append((processor, had, vars(processor).get("_attention_backend")))
            if "_attention_backend" in {n for c in type(processor).__mro__ for n in vars(c)} or had:
                # The pin is also what makes code compiled before `patch` re-trace (and so see the hooks):
                # dynamo does not guard on hook dicts that were empty at compile time
                # (torch._dynamo.config.skip_nnmodule_hook_guards) but guards this attribute by identity
                # (enum, None) or type and value (str), so store a value of another type than the current one.
                current = processor._attention_backend
                processor._attention_backend = "native" if type(current) is not str else _native_backend_enum()
        mode = _AttentionInterceptor(state, layer)
        state.handles.append(module.register_forward_pre_hook(_enter_hook(mode, entered)))
        state.handles.append(module.register_forward_hook(_exit_hook(mode), always_call=True))
    transformer.__dict__[STATE_ATTR] = state


def unpatch(pipe_or_transformer: Any) -> Any:
    """Remove sparse-dit from a pipeline or transformer; a no-op where it was not patched. Returns its input."""
    for transformer, _ in resolve_transformers(pipe_or_transformer):
        state: PatchState | None = transformer.__dict__.pop(STATE_ATTR, None)
        if state is None:
            continue
        for handle in state.handles:
            handle.remove()
        for processor, had, value in state.saved_backends:
            if had:
                processor._attention_backend = value
            else:
                vars(processor).pop("_attention_backend", None)
    return pipe_or_transformer


def patch_state(model: torch.nn.Module) -> PatchState | None:
    """The state of a patched transformer (for inspection), or None."""
    return unwrap_compiled(model).__dict__.get(STATE_ATTR)

