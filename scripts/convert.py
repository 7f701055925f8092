"""Converts released PyTorch checkpoints into our NNX state (saved with orbax).

Each converter module in lqseg_jax/convert/ that defines `register_cli(subparsers)` adds one
subcommand; `python scripts/convert.py --help` lists them. Errors in the inputs end in one line and exit
code 2 (--debug before the format, or LQSEG_DEBUG=1: the traceback).
"""

import argparse
import importlib
import pkgutil

import lqseg_jax.convert
from lqseg_jax.cli import add_debug_flag, report_errors


@report_errors
def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for info in sorted(pkgutil.iter_modules(lqseg_jax.convert.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"lqseg_jax.convert.{info.name}")
        if hasattr(module, "register_cli"):
            module.register_cli(sub)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
