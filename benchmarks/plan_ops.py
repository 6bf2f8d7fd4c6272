"""How many operations one plan of the dynamic patterns issues (CPU, Triton interpreter; no GPU needed).

    python benchmarks/plan_ops.py

At small shapes (Wan 480p with a few dynamic heads per layer, as a mixed plan has) a plan's cost is set by how many
kernels it launches, not by its arithmetic: each launch costs host time and a few microseconds of GPU time however
little it computes. This counts, for one warm k-means plan and one prune plan through the fused (Triton) planners,
the torch operations (by name; views and other metadata-only ops included, they cost host time but launch nothing)
and the Triton kernel launches. The planners are run under the Triton interpreter, whose own tensor operations are
left out of the count; the sequence of calls is the GPU's.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import argparse  # noqa: E402
import collections  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import ensure_sparse_dit  # noqa: E402

ensure_sparse_dit()

from sparse_dit.geometry import Geometry  # noqa: E402
from sparse_dit.patterns import kmeans, prune  # noqa: E402

# ops that only make a new view of existing memory: no kernel
METADATA_OPS = {"view", "alias", "unsqueeze", "expand", "slice", "detach", "transpose", "select", "as_strided", "permute",
                "squeeze", "t", "unflatten", "_reshape_alias"}


class OpCounter(TorchDispatchMode):
    """Counts torch operations by name, except those the Triton interpreter issues to emulate a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        while frame is not None:
            if "triton/runtime/interpreter" in frame.f_code.co_filename.replace("\\", "/"):
                return func(*args, **(kwargs or {}))
            frame = frame.f_back
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(build) -> tuple[collections.Counter, collections.Counter]:
    """(torch ops, Triton launches) by name of one call of ``build()``."""
    from triton.runtime import interpreter

    launches: collections.Counter[str] = collections.Counter()
    original = interpreter.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        launches[getattr(self.fn, "__name__", "?")] += 1
        return original(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = counted
    try:
        with OpCounter() as counter:
            build()
    finally:
        interpreter.GridExecutor.__call__ = original
    return counter.ops, launches


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=3, help="heads planned in one call (a mixed Wan 480p layer: 3 of 12)")
    args = p.parse_args()
    geometry = Geometry(1, args.heads, 16, 2, 8, 16)  # small: the interpreter is slow; the op sequence does not depend on size
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, geometry.seq_len, args.heads, 16, generator=g)
    k = torch.randn(1, geometry.seq_len, args.heads, 16, generator=g)
    state: dict = {}
    params = dict(q_clusters=2, k_clusters=4, iters=2)

    def plan_kmeans():
        kmeans.build(geometry, args.heads, 128, "cpu", q=q, k=k, state=state, planner="triton", **params)

    def plan_prune():
        prune.build(geometry, args.heads, 128, "cpu", q=q, k=k, state={}, keep_ratio=0.3, planner="triton")

    plan_kmeans()  # the cold start; the count below is a warm plan, as on every later call
    for name, build in (("k-means, warm", plan_kmeans), ("prune", plan_prune)):
        ops, launches = count(build)
        metadata = sum(n for op, n in ops.items() if op in METADATA_OPS)
        total = sum(ops.values())
        print(f"{name}: {total} torch ops ({total - metadata} that can launch a kernel, {metadata} views), "
              f"{sum(launches.values())} Triton launches")
        print("  torch: " + ", ".join(f"{op} {n}" for op, n in ops.most_common()))
        print("  Triton: " + ", ".join(f"{fn} {n}" for fn, n in launches.most_common()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
