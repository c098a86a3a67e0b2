"""Benchmarks: ``python -m bench.engine`` (the decision function) and ``python -m bench.load`` (end to end).

They print numbers and assert nothing; see bench/README.md.
"""
