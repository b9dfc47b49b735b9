"""The benchmarks of ist_optim, one package per study (see README.md).

Run from the repository root as modules, e.g. ``python -m benchmarks.budget --report ...``;
each study's modules import :mod:`benchmarks.benchkit` and their siblings relatively, and
``ist_optim`` through its public names only (``tests/benchmarks/test_benchkit.py`` checks
it). The commands, the tables they produced and what they mean are in
docs/benchmarks.md; the results it quotes are under ``benchmarks/results/<study>/``.
"""
