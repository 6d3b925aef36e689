"""Benchmark data: ``python -m benchmarks.data.build`` writes a small CoVoST2-shaped En->XX speech translation set.

Python entry point: ``from benchmarks.data.build import build`` (the submodule and the function share the name, so
the package itself imports nothing).
"""
