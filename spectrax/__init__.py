"""spectrax: transformer models for astronomical spectra in JAX/Flax.

Entry points: ``python -m spectrax.train``, ``python -m spectrax.predict``,
``python -m spectrax.prepare``. The batch type is :class:`spectrax.spectra.SpectrumBatch`.
Importing spectrax changes no process-wide setting; the entry points apply
:func:`spectrax.runtime.configure`.
"""
__version__ = "0.1.0"
