"""Benchmarks (``memkit bench ...``): ratios measured side by side in one run."""
