"""The ``sparse-dit`` command line. Each subcommand lives in its own module and registers itself here.

A user error (a bad value, a missing file, a profile that does not fit, no GPU) is answered with one line
on stderr that says what to change, and exit code 2. ``--debug`` (or SPARSE_DIT_DEBUG=1) shows the
traceback instead. Every subcommand checks all its arguments before it builds or runs a model.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn, Sequence

from sparse_dit.commands._common import UsageError, debug_enabled

# subcommand -> module with ``add_arguments(parser)`` and ``run(args) -> int``
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "check": ("sparse_dit.commands.check", "patch a small Wan transformer and compare dense vs sparse output"),
    "density": ("sparse_dit.commands.density", "print the attention density a static pattern has on a video grid"),
    "eval": ("sparse_dit.commands.eval", "PSNR/SSIM/density of a sparse pattern vs dense on the trained reference model"),
    "demo": ("sparse_dit.commands.demo", "generate with the reference model dense and sparse; write a side-by-side mp4"),
    "profile": ("sparse_dit.commands.profile", "calibrate a model and write a per-layer/head sparsity profile"),
    "inspect": ("sparse_dit.commands.inspect", "summarise a profile and plot its pattern map"),
}

# Errors the library raises for bad input; their messages name the fix. Anything else is a bug and keeps
# its traceback.
USER_ERRORS = (UsageError, ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, PermissionError)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block): ``sparse-dit demo: error: ... (--help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per subcommand."""
    parser = OneLineParser(
        prog="sparse-dit",
        description=(
            "Sparse attention for diffusers DiT pipelines. Patch a pipeline in Python with "
            "sparse_dit.patch(pipe, pattern=... or profile=...); these commands check, measure and inspect."
        ),
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: environment variable SPARSE_DIT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
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
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error (also: SPARSE_DIT_DEBUG=1)")
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns its exit code (2 for a user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False)) or debug_enabled()
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        if not isinstance(err, UsageError):  # raised by the library, possibly deep in a run: say where to look
            message += " (--debug shows where)"
        print(f"sparse-dit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"sparse-dit {args.command}: interrupted; files written so far are complete, nothing was half-written",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
