"""Experiment entry points (thin absl mains) and benchmarks; logic lives in `jaxsun`."""
