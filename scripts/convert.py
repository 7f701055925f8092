"""Converts released PyTorch checkpoints into our NNX state (saved with orbax).

Each converter module in lqseg_jax/convert/ that defines `register_cli(subparsers)` adds one
subcommand; `python scripts/convert.py --help` lists them. Every subcommand reads --src and writes --out
(`mask2former CHECKPOINT OUT`, the old positional form, still works with a deprecation note). Errors in the
inputs end in one line and exit code 2 (--debug before the format, or LQSEG_DEBUG=1: the traceback).
"""

import argparse
import importlib
import pkgutil

import lqseg_jax.convert
from lqseg_jax.cli import add_debug_flag, report_errors, setup_logging


def build_parser() -> argparse.ArgumentParser:
    """The parser with one subcommand per converter module that defines `register_cli(subparsers)`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for info in sorted(pkgutil.iter_modules(lqseg_jax.convert.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"lqseg_jax.convert.{info.name}")
        if hasattr(module, "register_cli"):
            module.register_cli(sub)
    add_debug_flag(parser)
    return parser


@report_errors
def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_logging()
    args.run(args)


if __name__ == "__main__":
    main()
