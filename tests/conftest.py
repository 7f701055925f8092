"""Test session setup: 8 CPU devices before JAX starts, so every test exercises sharding.

A persistent compilation cache (fresh per session) lets tests that build the same jitted functions
through new objects reuse the compiled executables.
"""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)
_CACHE = os.environ.setdefault("LQSEG_TEST_JAX_CACHE", tempfile.mkdtemp(prefix="lqseg-jax-cache-"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic dataset in the ADE20K layout, shared by the session's tests."""
    from lqseg_jax.data_pipelines.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synthetic"), num_train=24, num_val=6, progress=False)


@pytest.fixture(scope="module")
def fast_compile():
    """XLA without most optimisations for a whole module (`pytestmark = pytest.mark.usefixtures(
    "fast_compile")`): compiles tiny models several times faster, same fp32 math, but the compiled programs
    run up to ~10x slower (no fusion), so it pays only for modules that run few steps."""
    from lqseg_jax.models.tracing import light_compilation

    with light_compilation():
        yield
