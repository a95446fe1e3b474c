"""Helpers to run and check context parallelism in real processes (used by the tests and the CLI)."""

from .multiprocess import RankFailure, run_on_ranks

__all__ = ["RankFailure", "run_on_ranks"]
