"""torch.compile on a patched WanTransformer3DModel (real diffusers, tiny config, CPU, reference backend).

Regional compile (``compile_repeated_blocks``, diffusers' recommended way) and whole-model compile
(``torch.compile(transformer)`` / ``transformer.compile()``), with ``patch`` before and after compiling: the compiled
model must give the eager patched output, count its sparse calls, never recompile across denoising steps once warm,
and give the dense output again after ``unpatch``.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import make_wan_transformer, wan_inputs

import sparse_dit
from sparse_dit import PatternSpec

LAYERS = 2
TIMESTEPS = (900, 600, 300)  # one denoising run; the clock restarts when t rises again
BLOCK = 16
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code is cached per code object, so across models: each test starts from none. Inductor compiles
    in this process: its pool of compile workers would take the CPU from the test on a small machine. (torch._dynamo
    is imported here, not at collection: test_kernel_triton sets TRITON_INTERPRET=1 when it is collected.)"""
    import torch._inductor.config

    torch._dynamo.reset()
    with torch._inductor.config.patch(compile_threads=1):
        yield
    torch._dynamo.reset()


@pytest.fixture
def setup():
    x, _, text = wan_inputs(frames=3, height=6, width=10)  # 180 tokens: not a multiple of the block
    g = torch.Generator().manual_seed(0)
    nb = -(-180 // BLOCK)
    mask = (torch.rand(1, 2, nb, nb, generator=g) < 0.3) | torch.eye(nb, dtype=torch.bool)
    spec = PatternSpec("mask", block_mask=mask, block_size=BLOCK)
    return make_wan_transformer(layers=LAYERS), spec, x, text


def run(model, x, text, t):
    with torch.no_grad():
        return model(x, torch.full((1,), t, dtype=torch.long), text).sample


def patch(model, spec, **kw):
    return sparse_dit.patch(model, pattern=spec, backend="reference", block_size=BLOCK, **kw)


def calls(model):
    s = sparse_dit.patch_state(model).stats
    return s["sparse_calls"], s["dense_calls"]


def check_compiled_run(model, compiled, expected, warm_up=True):
    """Runs the denoising timesteps through ``compiled``: after the first (warm-up) call, or from the first call
    without ``warm_up``, a recompile is an error."""
    before = calls(model)
    outs = [run(compiled, *expected["inputs"], TIMESTEPS[0])] if warm_up else []
    with torch.compiler.set_stance("fail_on_recompile"):
        outs += [run(compiled, *expected["inputs"], t) for t in TIMESTEPS[len(outs):]]
    for out, ref in zip(outs, expected["outputs"]):
        torch.testing.assert_close(out, ref, **TOL)
    sparse, dense = calls(model)
    assert (sparse - before[0], dense - before[1]) == expected["calls"]


def eager_reference(model, spec, x, text, dense_steps=1):
    """Eager outputs over TIMESTEPS: dense (unpatched) and patched, plus the calls the patched run counts."""
    dense = run(model, x, text, TIMESTEPS[0])
    patch(model, spec, dense_steps=dense_steps)
    outputs = [run(model, x, text, t) for t in TIMESTEPS]
    counted = calls(model)
    sparse_dit.unpatch(model)
    assert counted == ((len(TIMESTEPS) - dense_steps) * LAYERS, dense_steps * LAYERS)
    assert not torch.allclose(outputs[-1], run(model, x, text, TIMESTEPS[-1]), atol=1e-3), "the mask must matter"
    return dense, {"inputs": (x, text), "outputs": outputs, "calls": counted}


def test_regional_compile_patch_before_and_again_after_unpatch(setup):
    model, spec, x, text = setup
    dense, expected = eager_reference(model, spec, x, text)
    patch(model, spec, dense_steps=1)  # step 0 dense, then sparse: switching is eager, no recompile
    model.compile_repeated_blocks(fullgraph=False)
    check_compiled_run(model, model, expected)
    sparse_dit.unpatch(model)
    torch.testing.assert_close(run(model, x, text, TIMESTEPS[0]), dense, **TOL)
    patch(model, spec, dense_steps=1)  # patched again: the code compiled for the first patch serves it
    check_compiled_run(model, model, expected, warm_up=False)


@pytest.mark.parametrize("user_backend", [None, "enum", "str"])
def test_regional_compile_patch_after_compiled_run(setup, user_backend):
    """Compiled and run dense first: `patch` must still reach the compiled blocks (dynamo does not guard hook
    dicts that were empty at compile time), also when the user had pinned the native backend already."""
    model, spec, x, text = setup
    for block in model.blocks:
        if user_backend == "enum":
            block.attn1.set_attention_backend("native")
        elif user_backend == "str":
            block.attn1.processor._attention_backend = "native"
    dense, expected = eager_reference(model, spec, x, text)
    model.compile_repeated_blocks(fullgraph=False, backend="eager")  # the guard logic is dynamo's, not inductor's
    torch.testing.assert_close(run(model, x, text, TIMESTEPS[0]), dense, **TOL)
    patch(model, spec, dense_steps=1)
    check_compiled_run(model, model, expected)
    sparse_dit.unpatch(model)
    torch.testing.assert_close(run(model, x, text, TIMESTEPS[0]), dense, **TOL)
    if user_backend == "str":
        assert vars(model.blocks[0].attn1.processor)["_attention_backend"] == "native"


def test_torch_compile_whole_model_then_patch_the_compiled_wrapper(setup):
    model, spec, x, text = setup
    dense, expected = eager_reference(model, spec, x, text)
    compiled = torch.compile(model)  # an OptimizedModule wrapping the model
    patch(compiled, spec, dense_steps=1)  # the wrapper is accepted and the model inside it patched
    assert sparse_dit.is_patched(model) and sparse_dit.is_patched(compiled)
    check_compiled_run(model, compiled, expected)
    sparse_dit.unpatch(compiled)
    assert not sparse_dit.is_patched(model)
    torch.testing.assert_close(run(compiled, x, text, TIMESTEPS[0]), dense, **TOL)


def test_module_compile_whole_model_patch_after_compiled_run(setup):
    model, spec, x, text = setup
    dense, expected = eager_reference(model, spec, x, text)
    model.compile(backend="eager")  # in place, as `pipe.transformer.compile()`
    torch.testing.assert_close(run(model, x, text, TIMESTEPS[0]), dense, **TOL)
    patch(model, spec, dense_steps=1)
    check_compiled_run(model, model, expected)
    sparse_dit.unpatch(model)
    torch.testing.assert_close(run(model, x, text, TIMESTEPS[0]), dense, **TOL)


def test_regional_compile_keeps_everything_but_the_self_attention_in_graphs(setup):
    """Only sparse-dit's own work runs outside the graphs: the compiled blocks of the patched model hold every op
    of the unpatched block except its self-attention SDPA, and the only graph breaks are at our disabled functions
    (before the fix dynamo traced into `attend`: nonzero/item graph breaks and layout ops in the graphs)."""
    model, spec, x, text = setup

    def ops_and_breaks(patched: bool):
        torch._dynamo.reset()
        graphs: list[Counter] = []

        def record(gm, example_inputs):
            nodes = (n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module"))
            graphs.append(Counter(getattr(n.target, "__name__", str(n.target)) for n in nodes))
            return gm.forward

        model = make_wan_transformer(layers=LAYERS)
        if patched:
            patch(model, spec)
        model.compile_repeated_blocks(fullgraph=False, backend=record)
        torch._dynamo.utils.counters.clear()
        for t in TIMESTEPS:
            run(model, x, text, t)
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
        return sum(graphs, Counter()), len(graphs), breaks

    dense_ops, dense_graphs, dense_breaks = ops_and_breaks(False)
    sparse_ops, sparse_graphs, sparse_breaks = ops_and_breaks(True)
    assert dense_graphs == 1 and not dense_breaks  # one graph for all blocks (shared code) and timesteps
    assert dense_ops - sparse_ops == Counter(scaled_dot_product_attention=1)  # the self-attention
    assert sparse_ops - dense_ops == Counter()
    assert sparse_breaks and all("torch.compiler.disable" in reason for reason in sparse_breaks), sparse_breaks
    assert sparse_graphs <= 6  # per block: before attn1 | projections, norms, RoPE | permutes | out proj | rest


def test_fullgraph_is_refused_loudly(setup):
    """sparse-dit's attention runs eagerly (data-dependent layouts, per-model caches), so a patched block cannot be
    one graph: fullgraph=True must fail, not fall back to dense attention."""
    model, spec, x, text = setup
    patch(model, spec)
    model.compile_repeated_blocks(fullgraph=True, backend="eager")
    with pytest.raises(torch._dynamo.exc.Unsupported, match="torch.compiler.disable"):
        run(model, x, text, TIMESTEPS[0])


def test_compiled_before_patch_never_silently_dense():
    """A processor without `_attention_backend` (CogVideoX) gives dynamo nothing that `patch` changes, so code
    compiled and run before `patch` keeps running dense attention: sparse-dit must say so."""
    from model_builders import cogvideox

    model, kw, _, _ = cogvideox()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(**kw)
    patch(compiled, PatternSpec("tile", window=(1, 1, 1), tile=(1, 2, 2)))
    with pytest.warns(UserWarning, match="no patched attention layer ran"), torch.no_grad():
        compiled(**kw)
    torch.compiler.reset()  # the remedy the warning names
    with torch.no_grad():
        compiled(**kw)
    assert calls(model)[0] == len(model.transformer_blocks)
