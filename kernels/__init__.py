"""Pallas kernels with pure-JAX references (installed as lqseg_jax.kernels)."""
