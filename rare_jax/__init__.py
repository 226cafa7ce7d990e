"""rare_jax: rare-category classifiers on a tight labeling budget, in JAX/Flax."""

__version__ = "0.1.0"
