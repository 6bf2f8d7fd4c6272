"""The ``sparse-dit`` command line. Each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# subcommand -> module with ``add_arguments(parser)`` and ``run(args) -> int``
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "check": ("sparse_dit.commands.check", "patch a small Wan transformer and compare dense vs sparse output"),
    "density": ("sparse_dit.commands.density", "print the attention density a static pattern has on a video grid"),
    "eval": ("sparse_dit.commands.eval", "PSNR/SSIM/density of a sparse pattern vs dense on the trained reference model"),
    "demo": ("sparse_dit.commands.demo", "generate with the reference model dense and sparse; write a side-by-side mp4"),
    "profile": ("sparse_dit.commands.profile", "calibrate a model and write a per-layer/head sparsity profile"),
    "inspect": ("sparse_dit.commands.inspect", "summarise a profile and plot its pattern map"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-dit",
        description=(
            "Sparse attention for diffusers DiT pipelines. Patch a pipeline in Python with "
            "sparse_dit.patch(pipe, pattern=... or profile=...); these commands check, measure and inspect."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        p = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
