"""Benchmarks of the op and of a training step (not installed; run from the checkout root:
``python -m benchmarks.benchmark_frn``, ``python -m benchmarks.benchmark_step``). Timings are reported as
ratios measured in one run, never as pass/fail thresholds."""
