"""Process-wide settings, applied by the command-line entry points (never on import).

``python -m spectrax.train`` / ``predict`` / ``prepare`` / ``attention_maps`` /
``baselines.template_fit`` and the benchmarks call :func:`configure` first thing. Library users
who want the same settings call it themselves, before their first JAX computation::

    import spectrax.runtime
    spectrax.runtime.configure()
"""
from __future__ import annotations

import logging
import os
from importlib import metadata

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def configure() -> None:
    """XLA:CPU tuning (:func:`tune_xla_cpu`) and quiet library loggers (absl warnings and up:
    Orbax logs every save at INFO; Apache Beam's runner and workers log at INFO; XLA's C++
    INFO lines off unless ``TF_CPP_MIN_LOG_LEVEL`` is set)."""
    tune_xla_cpu()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("absl", "apache_beam"):
        logging.getLogger(name).setLevel(logging.WARNING)


def tune_xla_cpu() -> None:
    """Turns off XLA:CPU's YNNPACK library fusions unless the user's ``XLA_FLAGS`` chose.

    In jaxlib 0.10 they route large reductions through a slow kernel: the gradient-norm reduction
    of SpecPT 'small' (a 7792 × 7781 kernel, for clipping) alone took ~1.0 s of a 1.7 s training
    step; with the fusions off the step takes 0.66 s, and the tokenizer and SpectraFM steps
    are 7-17 % faster too (2-core x86 machine, 2026-11-23, jax.profiler traces of the step
    with the flag on and off). The flag only concerns the CPU backend and is read when jax
    starts its backends, so it must be set before the first computation. Only set for jaxlib
    0.10.x (XLA refuses unknown flags; re-measure before extending). Opt out with
    ``SPECTRAX_KEEP_XLA_FLAGS=1``.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("SPECTRAX_KEEP_XLA_FLAGS") == "1" or YNN_FLAG in flags:
        return
    try:  # XLA aborts on a flag it does not know: only set it for the jaxlib it was tested with
        if not metadata.version("jaxlib").startswith("0.10."):
            return
    except metadata.PackageNotFoundError:
        return
    os.environ["XLA_FLAGS"] = (flags + " " + YNN_FLAG + "=").strip()
