"""The interface every task implements (see :mod:`spectrax.tasks`) and the model call."""
from __future__ import annotations


import numpy as np

from spectrax.data.preprocess import median_normalise
from spectrax.spectra import SpectrumBatch


class Task:
    """Defaults of the optional hooks (see the module docstring)."""

    label_names: tuple[str, ...] = ()

    def bind_labels(self, available) -> None:
        """Called with the shards' label names before training or prediction."""

    def fit_state(self, label_stats: dict, data_dir=None) -> None:
        """Called with the train split's per-label statistics (``manifest.stats['labels']``)
        and the shard directory (for statistics a task computes itself)."""

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict | None) -> None:
        """Restores what :meth:`state` returned (from a checkpoint's metadata)."""

    def calibration_splits(self, model) -> tuple[str, ...]:
        """Splits whose evaluation outputs :meth:`calibrate` takes after the last training step
        of ``model`` (an abstract model is enough); empty: nothing is fitted after training."""
        return ()

    def calibrate(self, outputs: dict[str, dict]) -> None:
        """Fits a post-training calibration on {split: the evaluation's concatenated outputs}
        (:func:`spectrax.evaluation.evaluate`) and keeps it in :meth:`state`."""


def forward(model, batch: SpectrumBatch, *, train: bool):
    """Calls ``model`` on ``batch`` with the inputs its family expects (module docstring)."""
    if getattr(model, "takes_raw_spectra", False):
        return model(batch.flux, batch.mask, batch.wavelength, ivar=batch.ivar, train=train)
    flux_n, _, _, _ = median_normalise(batch.flux, batch.ivar, batch.mask)
    return model(flux_n, batch.mask, batch.wavelength, train=train)


def model_inputs(batch: SpectrumBatch):
    """Median-normalised model inputs; bad pixels are 0 and masked."""
    flux_n, ivar_n, scale, fallback = median_normalise(batch.flux, batch.ivar, batch.mask)
    return flux_n, ivar_n, scale, fallback


def valid_rows(out) -> np.ndarray:
    """[N] bool: the rows of an evaluation's concatenated outputs that hold a real spectrum."""
    return np.asarray(out["valid"], bool)
