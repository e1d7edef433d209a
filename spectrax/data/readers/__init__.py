"""Readers that turn survey files (DESI, SDSS, LAMOST, APOGEE, GALAH) into spectrax records.

Each reader returns records in the form :func:`spectrax.spectra.sanitize_record` produces
(float32 flux/ivar with 0 at bad pixels, bool mask with True = valid) together with counts of
what it skipped and why, so that no spectrum is dropped silently.
"""
