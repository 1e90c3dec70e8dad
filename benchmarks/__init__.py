"""Benchmarks of fesmia-hooks: cost, training overhead, fidelity, honesty, and defaults.

Run ``python benchmarks/run.py`` (full, tens of minutes) or ``python benchmarks/run.py
--quick`` (a few minutes); both write ``benchmarks/results.json`` and regenerate
``BENCHMARKS.md``. Every figure is a ratio or a count measured in one process.
"""
