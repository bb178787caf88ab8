"""Benchmarks, run from the repository root as modules (they import each other as `bench.*`):

    .venv/bin/python -m bench.shared_prefix --markdown /tmp/shared_prefix.md

Each prints a header (command, date, commit, versions, machine) and the table bench/RESULTS.md shows.
"""
