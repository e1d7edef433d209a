"""spectrax: transformer models for astronomical spectra in JAX/Flax.

Entry points: ``python -m spectrax.train``, ``python -m spectrax.predict``,
``python -m spectrax.prepare``. The batch type is :class:`spectrax.spectra.SpectrumBatch`.
"""
__version__ = "0.1.0"


def _tune_xla_cpu() -> None:
    """Turns off XLA:CPU's YNNPACK library fusions unless the user's ``XLA_FLAGS`` chose.

    In jaxlib 0.10 they route large reductions through a slow kernel: the gradient-norm reduction
    of SpecPT 'small' (a 7792 × 7781 kernel, for clipping) alone took ~1.0 s of a 1.7 s training
    step; with the fusions off the step takes 0.66 s, and the tokenizer and SpectraFM steps
    are 7-17 % faster too (2-core x86 machine, 2026-11-23, jax.profiler traces of the step
    with the flag on and off; benchmarks/RESULTS.md has the resulting step times). The flag
    only concerns the CPU backend and is read when jax starts its backends, so importing spectrax
    after jax has run a computation leaves it unset (set it yourself then). Only set for jaxlib
    0.10.x (XLA refuses unknown flags; re-measure before extending). Opt out with
    ``SPECTRAX_KEEP_XLA_FLAGS=1``.
    """
    import os
    from importlib import metadata
    flag = "--xla_cpu_experimental_ynn_fusion_type"
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("SPECTRAX_KEEP_XLA_FLAGS") == "1" or flag in flags:
        return
    try:  # XLA aborts on a flag it does not know: only set it for the jaxlib it was tested with
        if not metadata.version("jaxlib").startswith("0.10."):
            return
    except metadata.PackageNotFoundError:
        return
    os.environ["XLA_FLAGS"] = (flags + " " + flag + "=").strip()


_tune_xla_cpu()
