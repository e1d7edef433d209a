"""Shared test set-up: the settings the command-line entry points apply (shared paths and helpers: tests/helpers.py)."""
from __future__ import annotations

from spectrax import runtime

# What `python -m spectrax.train` etc. do first; tests run training in-process.
runtime.configure()
