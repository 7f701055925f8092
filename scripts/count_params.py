"""Parameter counts of an experiment's network, from abstract models (shapes only, no memory).

    python scripts/count_params.py --config configs/rass.py [--breakdown]

Prints one JSON object {"total": N, "trainable": M}: every parameter of the model plus the frozen networks
the system runs outside it (RASS: the CLIP text encoder), and those the system's `trainable` filter
selects. --breakdown D adds {"parts": {submodule path cut at D components, or outside network: count}}.
"""

import argparse
import json
import math

import jax
from flax import nnx

from lqseg_jax.cli import add_debug_flag, report_errors, setup_logging
from lqseg_jax.models.tracing import abstract_model, param_count
from lqseg_jax.systems import get_system
from lqseg_jax.train.config import load_config


def _count(state) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def _parts(model: nnx.Module, depth: int) -> dict[str, int]:
    """Parameter counts per dotted path prefix of `depth` components."""
    parts: dict[str, int] = {}
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(str(p) for p in path[:depth])
        parts[name] = parts.get(name, 0) + math.prod(leaf.shape)
    return parts


def count(config, *, breakdown: int = 0) -> dict:
    system = get_system(config)
    model = abstract_model(lambda: system.build_model(nnx.Rngs(params=0, dropout=0)))
    outside = system.frozen_outside_model()
    result = {
        "total": param_count(model) + sum(param_count(m) for m in outside.values()),
        "trainable": _count(nnx.state(model, system.trainable)),
    }
    if breakdown:
        parts = _parts(model, breakdown)
        parts.update({name: param_count(m) for name, m in outside.items()})
        result["parts"] = parts
    return result


@report_errors
def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="experiment config file[:variant]")
    parser.add_argument(
        "--breakdown", type=int, default=0, metavar="D", help="also count per submodule (depth D)"
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    setup_logging()
    print(json.dumps(count(load_config(args.config), breakdown=args.breakdown)))


if __name__ == "__main__":
    main()
