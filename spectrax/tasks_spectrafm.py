"""SpectraFM's task: request one stellar label from up to 512 randomly chosen pixel tokens, with a
predicted uncertainty (SPECS.md §4), plus chunked inference and attention maps.

Per training step and star: the valid pixels (mask, 0.05 <= flux <= 1.2, inside
``pixel_range``, |z| <= 10 after per-pixel robust standardisation) are sampled down to
``context`` tokens (:func:`spectrax.models.spectrafm.sample_pixels`), and one label is requested,
uniformly among the star's known labels (never a NaN one). Loss: Gaussian NLL with the
predicted log-variance plus the label's own error (``<LABEL>_ERR`` columns when the shards have
them), in fp32.

Statistics: per-pixel median / MAD-std of the flux and per-label median / MAD-std, from the
FIRST training set (the synthetic one), carried in the checkpoint's task state and reused by
every fine-tune and by inference (SPECS.md §4: "statistics from the synthetic training set,
reused for real spectra and all fine-tunes").

Prediction (evaluation, ``spectrax.predict``): every valid pixel of the range is used through
chunked inference inside jit: a fixed permutation of the range's pixels
(:func:`~spectrax.models.spectrafm.chunk_permutation`), chunks of ``context``, one forward pass per
chunk and label, predictions and σ averaged over the chunks in which the star has valid pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectrax import metrics as M
from spectrax import plots
from spectrax.data import shards
from spectrax.models import spectrafm as fm
from spectrax.tasks import Task

FLUX_RANGE = (0.05, 1.2)   # SPECS.md §4: normalised flux outside this is bad (NaN)
STATS_MAX_SPECTRA = 2000   # spectra read to fit the per-pixel statistics
GIANTS = (1.0, 3.5)        # log g range of the paper's scatter table


class SpectraFMTask(Task):
    """See the module docstring.

    Args:
      labels: labels to train on and predict (subset of ``spectrafm.LABEL_NAMES``, e.g.
        ("FE_H",) for the stage-3 fine-tune).
      pixel_range: (first, stop) pixel indices of the full grid the model may use; (0, 0) =
        all (stage 2: (0, 3757); stage 3: :data:`spectrax.models.spectrafm.FE_WINDOW`).
      context: tokens per forward pass; None = the model's context length (512 in the paper).
      chunk_seed: seed of the chunked-inference permutation.
    """

    uses_rng = True

    def __init__(self, labels: tuple[str, ...] = fm.LABEL_NAMES,
                 pixel_range: tuple[int, int] = (0, 0), context: int | None = None,
                 chunk_seed: int = 0):
        unknown = sorted(set(labels) - set(fm.LABEL_NAMES))
        if unknown:
            raise ValueError(f"SpectraFM knows labels {fm.LABEL_NAMES}; cannot request {unknown}")
        self.labels = tuple(labels)
        self.pixel_range = tuple(int(p) for p in pixel_range)
        self.context = None if context is None else int(context)
        self.chunk_seed = int(chunk_seed)
        self.label_names = self.labels
        self.has_errors = False
        self.stats: dict[str, Any] | None = None

    # -- labels and statistics -------------------------------------------------------------
    def bind_labels(self, available) -> None:
        missing = [n for n in self.labels if n not in available]
        if missing:
            raise ValueError(f"the shards have no label columns {missing} (have {list(available)})")
        errors = tuple(f"{n}_ERR" for n in self.labels)
        self.has_errors = all(e in available for e in errors)
        self.label_names = self.labels + (errors if self.has_errors else ())

    def fit_state(self, label_stats: dict, data_dir=None) -> None:
        rows = []
        for rec in shards.iter_records(data_dir, "train"):
            f = np.where(rec["mask"], rec["flux"], np.nan)
            f = np.where((f >= FLUX_RANGE[0]) & (f <= FLUX_RANGE[1]), f, np.nan)
            rows.append(f)
            if len(rows) >= STATS_MAX_SPECTRA:
                break
        lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            raise ValueError(f"{data_dir}: SpectraFM needs spectra on one pixel grid, found "
                             f"lengths {sorted(lengths)[:5]}")
        median, mad = fm.fit_standardizer(np.stack(rows))
        self.stats = {
            "pixel_median": median.tolist(), "pixel_mad": mad.tolist(),
            "label_median": {n: label_stats[n]["median"] for n in fm.LABEL_NAMES
                             if n in label_stats},
            "label_mad": {n: label_stats[n]["mad_std"] for n in fm.LABEL_NAMES
                          if n in label_stats}}

    def state(self) -> dict:
        return {"stats": self.stats, "label_names": list(self.label_names)}

    def load_state(self, state) -> None:
        if state and state.get("stats"):
            self.stats = state["stats"]
            missing = [n for n in self.labels if n not in self.stats["label_median"]]
            if missing:
                raise ValueError(f"the base model's statistics have no labels {missing}")

    # -- tokens ------------------------------------------------------------------------------
    def _standardised(self, batch):
        """(z [B, L] standardised flux, usable [B, L] bool) for the model's pixel tokens."""
        if self.stats is None:
            raise RuntimeError("SpectraFMTask used before fit_state/load_state")
        median = np.asarray(self.stats["pixel_median"], np.float32)
        if batch.flux.shape[1] != median.size:
            raise ValueError(f"batch has {batch.flux.shape[1]} pixels, the statistics "
                             f"{median.size}: SpectraFM needs the grid it was trained on")
        flux = batch.flux
        ok = batch.mask & (flux >= FLUX_RANGE[0]) & (flux <= FLUX_RANGE[1])
        a, b = self.pixel_range
        if b > a:
            pix = jnp.arange(flux.shape[1])
            ok = ok & (pix >= a) & (pix < b)
        z = fm.standardize(jnp.where(ok, flux, jnp.nan),
                           (median, np.asarray(self.stats["pixel_mad"], np.float32)))
        ok = ok & jnp.isfinite(z) & batch.valid[:, None]
        return jnp.where(ok, z, 0.0), ok

    def _label_arrays(self):
        """(median [K], MAD-std [K]) of the trained labels, as jax constants."""
        med = jnp.array([self.stats["label_median"][n] for n in self.labels], jnp.float32)
        mad = jnp.array([self.stats["label_mad"][n] for n in self.labels], jnp.float32)
        return med, mad

    def context_of(self, model) -> int:
        return self.context or model.cfg.context_length

    @staticmethod
    def _request_ids(model, names):
        ids = model.cfg.label_token_ids
        return np.array([ids[n] for n in names], np.int32)

    def loss(self, model, batch, *, train: bool, rng=None):
        key = jax.random.key(0) if rng is None else rng  # evaluation: a fixed draw
        k_pix, k_lab = jax.random.split(key)
        z, ok = self._standardised(batch)
        idx, tok_ok = fm.sample_pixels(k_pix, ok, self.context_of(model))
        values = jnp.where(tok_ok, jnp.take_along_axis(z, idx, axis=1), 0.0)
        wave = jnp.where(tok_ok, jnp.take_along_axis(batch.wavelength, idx, axis=1), 0.0)
        ids = jnp.where(tok_ok, model.cfg.pixel_token_id, fm.PADDING_TOKEN_ID)
        k = len(self.labels)
        known = batch.label_mask[:, :k] & batch.valid[:, None]
        which, has = fm.sample_request(k_lab, known)
        med, mad = self._label_arrays()
        y = (jnp.take_along_axis(batch.labels[:, :k], which[:, None], 1)[:, 0]
             - med[which]) / mad[which]
        if self.has_errors:
            err = jnp.take_along_axis(batch.labels[:, k:2 * k], which[:, None], 1)[:, 0]
            err_ok = jnp.take_along_axis(batch.label_mask[:, k:2 * k], which[:, None], 1)[:, 0]
            sigma = jnp.where(err_ok, err, 0.0) / mad[which]
        else:
            sigma = jnp.zeros_like(y)
        request = jnp.asarray(self._request_ids(model, self.labels))[which]
        pred, logvar = model(values, wave, ids, request, train=train)
        loss = fm.spectrafm_loss(pred, logvar, y, sigma, has & batch.valid)
        return loss, {"tokens_per_star": tok_ok.sum(-1).mean(),
                      "abs_err_std_units": jnp.sum(jnp.where(has, jnp.abs(pred - y), 0.0))
                      / jnp.maximum(has.sum(), 1)}

    # -- chunked inference --------------------------------------------------------------------
    def chunk_layout(self, model, num_pixels: int) -> fm.ChunkLayout:
        """How this task cuts a ``num_pixels`` spectrum for ``model`` (its pixel range, context
        and chunk seed)."""
        return fm.chunk_layout(num_pixels, self.context_of(model), self.chunk_seed,
                               self.pixel_range)

    def predict_standardised(self, model, batch, names=None, *, return_attention=False):
        """Chunk-averaged (prediction, σ) [B, K] in standardised units for labels ``names``
        (:func:`spectrax.models.spectrafm.chunked_predict`), plus per-chunk attention
        [C, K, B, context] and chunk masks [C, B, context] when asked."""
        names = self.labels if names is None else tuple(names)
        z, ok = self._standardised(batch)
        return fm.chunked_predict(model, z, batch.wavelength, ok, self._request_ids(model, names),
                                  self.chunk_layout(model, z.shape[1]),
                                  return_attention=return_attention)

    def predict(self, model, batch) -> dict[str, Any]:
        pred, sigma = self.predict_standardised(model, batch)
        med, mad = self._label_arrays()
        return {"pred": pred * mad + med, "sigma": sigma * mad}

    # -- metrics ---------------------------------------------------------------------------
    def _truth(self, out, name):
        k = self.labels.index(name)
        return np.where(out["label_mask"][:, k] & out["valid"], out["labels"][:, k], np.nan)

    def metrics(self, out) -> dict[str, float]:
        res: dict[str, float] = {"n": int(np.sum(out["valid"]))}
        logg = self._truth(out, "LOGG") if "LOGG" in self.labels else None
        feh = self._truth(out, "FE_H") if "FE_H" in self.labels else None
        for k, name in enumerate(self.labels):
            y = self._truth(out, name)
            v = np.isfinite(y) & np.isfinite(out["pred"][:, k])
            if not v.any():
                continue
            yp = out["pred"][:, k]
            res.update({f"{name}_scatter": M.scatter(y[v], yp[v]), f"{name}_rmse": M.rmse(y[v], yp[v]),
                        f"{name}_scaled_mad": M.scaled_mad(y[v], yp[v]),
                        f"{name}_bias": float(np.mean(yp[v] - y[v])),
                        f"{name}_sigma_median": float(np.nanmedian(out["sigma"][v, k])),
                        f"n_{name}": int(v.sum())})
            if logg is not None:  # the paper's table: giants, 1.0 < log g < 3.5
                g = v & (logg > GIANTS[0]) & (logg < GIANTS[1])
                if g.any():
                    res[f"{name}_scatter_giants"] = M.scatter(y[g], yp[g])
            if feh is not None:
                cut = fm.IRON_POOR_FE_H  # (NaN [Fe/H] is in neither group)
                for tag, sel in (("iron_poor", feh < cut), ("iron_rich", feh >= cut)):
                    s = v & sel
                    if s.any():
                        res[f"{name}_rmse_{tag}"] = M.rmse(y[s], yp[s])
                        res[f"n_{tag}"] = int(s.sum())
        return res

    def figures(self, out, examples, workdir: Path, n: int) -> list[Path]:
        truth = np.stack([self._truth(out, name) for name in self.labels], 1)
        return [plots.label_scatter(np.nan_to_num(truth), out["pred"],
                                    np.isfinite(truth) & np.isfinite(out["pred"]), self.labels,
                                    workdir / "labels_pred_vs_true.png")]

    def catalogue(self, out) -> dict[str, np.ndarray]:
        cols = {}
        for k, name in enumerate(self.labels):
            cols[f"{name}_PRED"] = out["pred"][:, k]
            cols[f"{name}_SIGMA"] = out["sigma"][:, k]
        return cols
