"""lqseg-jax: segmentation of low-quality and adverse-condition images in JAX/Flax NNX."""
