"""Pallas kernels. Each kernel package keeps a pure-jnp `*_reference` beside its kernels
and threads `interpret` through every entry point.

This package depends on jax only (no flax, ml-collections or tensorflow-datasets), so it
imports on the GPU machines as they are.
"""
