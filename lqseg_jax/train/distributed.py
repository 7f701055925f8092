"""Multi-process start-up: jax.distributed when the run is launched as several processes.

Set, for every process, LQSEG_COORDINATOR=host:port, LQSEG_NUM_PROCESSES=N and LQSEG_PROCESS_ID=i
(multi-node GPU, or several CPU processes on one machine, which then use gloo collectives). On TPU pods
and SLURM, jax.distributed.initialize() finds the cluster itself: set LQSEG_DISTRIBUTED=auto.
"""

from __future__ import annotations

import os

import jax


def initialize_from_env() -> bool:
    """Initialises jax.distributed if the environment asks for it; returns whether it did."""
    if os.environ.get("LQSEG_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
        return True
    coordinator = os.environ.get("LQSEG_COORDINATOR")
    if not coordinator:
        return False
    missing = [v for v in ("LQSEG_NUM_PROCESSES", "LQSEG_PROCESS_ID") if v not in os.environ]
    if missing:
        raise RuntimeError(f"LQSEG_COORDINATOR is set but {', '.join(missing)} is not (set all three)")
    if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=int(os.environ["LQSEG_NUM_PROCESSES"]),
        process_id=int(os.environ["LQSEG_PROCESS_ID"]),
    )
    return True
