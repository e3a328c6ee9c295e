"""Pallas kernels, installed as ``rwkvunet_jax.kernels`` (see pyproject.toml)."""
