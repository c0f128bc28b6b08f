"""Experiment tests run single-threaded (tests/helpers.py: ``one_thread``)."""

from helpers import one_thread  # noqa: F401  (an autouse fixture)
