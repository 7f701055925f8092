"""Host-side datasets and grain pipelines, device-side degradation (installed as lqseg_jax.data_pipelines)."""
