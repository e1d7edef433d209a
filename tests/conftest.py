"""Shared test set-up: the settings the command-line entry points apply, the fixtures path."""
from __future__ import annotations

from pathlib import Path

from spectrax import runtime

# What `python -m spectrax.train` etc. do first; tests run training in-process.
runtime.configure()

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "fixtures" / "real"
