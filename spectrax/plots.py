"""Figures people look at: reconstructions, predicted vs true redshift, residuals, loss curves.

Every function writes one PNG and returns its path; matplotlib runs headless (Agg).
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

OUTLIER = 0.15  # |Δz| / (1 + z) beyond which a redshift is an outlier (SPECS.md section 5)


def save_figure(fig, path: Path) -> Path:
    """Writes ``fig`` to ``path`` (parents made, 110 dpi, tight) and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def reconstructions(batch, recon: np.ndarray, path: Path, n: int = 6) -> Path:
    """Observed flux (grey, masked pixels hidden) and reconstruction (red) for n spectra."""
    n = int(min(n, int(np.sum(batch.valid))))
    fig, axes = plt.subplots(n, 1, figsize=(11, 1.9 * n), sharex=True, squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        m = np.asarray(batch.mask[i])
        wave = np.asarray(batch.wavelength[i])
        flux = np.where(m, np.asarray(batch.flux[i]), np.nan)
        ax.plot(wave, flux, color="0.6", lw=0.4, label="observed")
        ax.plot(wave[m], np.asarray(recon[i])[m], color="C3", lw=0.7, label="reconstruction")
        lo, hi = np.nanpercentile(flux, [1, 99]) if np.isfinite(flux).any() else (0, 1)
        pad = 0.3 * (hi - lo + 1e-9)
        ax.set_ylim(lo - pad, hi + pad)
        label = ""
        if batch.labels.shape[1] and batch.label_mask[i, 0]:
            label = f"z = {float(batch.labels[i, 0]):.4f}"
        ids = getattr(batch, "ids", None)
        if ids is not None:
            label = f"id {int(ids[i])}  {label}"
        ax.text(0.01, 0.85, label, transform=ax.transAxes, fontsize=8)
        ax.set_ylabel("flux")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("observed wavelength [Å]")
    return save_figure(fig, path)


def redshift_scatter(z_true: np.ndarray, z_pred: np.ndarray, path: Path) -> Path:
    """Predicted vs true redshift, with the 1:1 line and the ±0.15 (1+z) outlier bounds."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    lo, hi = float(min(z_true.min(), z_pred.min())), float(max(z_true.max(), z_pred.max()))
    grid = np.linspace(lo, hi, 100)
    out = np.abs(z_true - z_pred) / (1 + z_true) > OUTLIER
    ax.scatter(z_true[~out], z_pred[~out], s=3, alpha=0.5, color="C0", label="test spectra")
    if out.any():
        ax.scatter(z_true[out], z_pred[out], s=6, color="C3", label=f"outliers ({out.sum()})")
    ax.plot(grid, grid, "k-", lw=0.8)
    for sign in (-1, 1):
        ax.plot(grid, grid + sign * OUTLIER * (1 + grid), "k--", lw=0.6)
    ax.set_xlabel("true z")
    ax.set_ylabel("predicted z")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def redshift_residuals(z_true: np.ndarray, z_pred: np.ndarray, path: Path) -> Path:
    """Histogram of Δz/(1+z) (log y axis) with the ±0.15 outlier lines."""
    r = (z_true - z_pred) / (1 + z_true)
    fig, ax = plt.subplots(figsize=(6, 4))
    span = max(0.2, float(np.percentile(np.abs(r), 99.9)) * 1.1)
    ax.hist(np.clip(r, -span, span), bins=121, range=(-span, span), color="C0")
    ax.set_yscale("log")
    for sign in (-1, 1):
        ax.axvline(sign * OUTLIER, color="C3", ls="--", lw=0.8)
    ax.set_xlabel("Δz / (1 + z_true)   (Δz = z_true − z_pred)")
    ax.set_ylabel("spectra")
    return save_figure(fig, path)


def loss_curve(metrics_jsonl: Path, path: Path) -> Path:
    """Training (and evaluation) loss against step from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss")
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    return save_figure(fig, path)


def reconstruction_rows(rows, path: Path, title: str = "") -> Path:
    """Observed flux (grey) and reconstruction (red) for spectra given as (batch, predictions,
    row) triples; ``predictions['reconstruction']`` is in flux units. Padding is not drawn."""
    n = len(rows)
    fig, axes = plt.subplots(n, 1, figsize=(11, 1.8 * n), squeeze=False)
    for ax, (batch, pred, i) in zip(axes[:, 0], rows):
        wave = np.asarray(batch.wavelength[i])
        m = np.asarray(batch.mask[i]) & (wave > 0)
        real = wave > 0
        flux = np.where(m, np.asarray(batch.flux[i]), np.nan)
        recon = np.where(real, np.asarray(pred["reconstruction"][i]), np.nan)
        # Gaps between CCDs / chips stay gaps: break the line where λ jumps.
        order = np.argsort(np.where(real, wave, np.inf))[: int(real.sum())]
        w = wave[order]
        jump = np.r_[False, np.diff(w) > 20 * np.median(np.diff(w))] if len(w) > 2 else None
        def gapped(y):
            y = y[order].astype(float)
            if jump is not None:
                y[jump] = np.nan
            return y
        ax.plot(w, gapped(flux), color="0.6", lw=0.4, label="observed")
        ax.plot(w, gapped(recon), color="C3", lw=0.6, label="reconstruction")
        if np.isfinite(flux).any():
            lo, hi = np.nanpercentile(flux, [1, 99])
            pad = 0.3 * (hi - lo + 1e-9)
            ax.set_ylim(lo - pad, hi + pad)
        ids = getattr(batch, "ids", None)
        if ids is not None:
            ax.text(0.01, 0.85, f"id {int(ids[i])}", transform=ax.transAxes, fontsize=8)
        ax.set_ylabel("flux")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    if title:
        axes[0, 0].set_title(title, fontsize=9)
    axes[-1, 0].set_xlabel("observed wavelength [Å]")
    return save_figure(fig, path)


def confusion(cm: np.ndarray, names, path: Path) -> Path:
    """Confusion matrix (rows true, columns predicted), coloured by row-normalised fraction,
    annotated with counts and fractions."""
    cm = np.asarray(cm)
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{frac[i, j]:.1%}", ha="center", va="center",
                    fontsize=8, color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    return save_figure(fig, path)


def label_scatter(labels: np.ndarray, pred: np.ndarray, valid: np.ndarray, names,
                  path: Path) -> Path:
    """Predicted vs true for each label column, with the 1:1 line and scaled MAD / bias."""
    k = len(names)
    fig, axes = plt.subplots(1, k, figsize=(4.2 * k, 4.0), squeeze=False)
    for j, (ax, name) in enumerate(zip(axes[0], names)):
        v = valid[:, j]
        y, yp = labels[v, j], pred[v, j]
        if not len(y):
            continue
        ax.scatter(y, yp, s=3, alpha=0.5)
        lo, hi = float(min(y.min(), yp.min())), float(max(y.max(), yp.max()))
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
        r = yp - y
        smad = 1.4826 * np.median(np.abs(r - np.median(r)))
        ax.set_title(f"{name}: scaled MAD {smad:.3g}, bias {np.mean(r):.3g} (n={len(y)})",
                     fontsize=9)
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
    return save_figure(fig, path)


def embedding_projection(xy: np.ndarray, colour: np.ndarray, path: Path, *, method: str,
                         colour_name: str, categories=None) -> Path:
    """A 2-D projection of embeddings coloured by a label (categorical when ``categories``
    names the integer values, else a continuous colour bar)."""
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    if categories is not None:
        for k, name in enumerate(categories):
            sel = colour == k
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=4, alpha=0.6, label=f"{name} ({sel.sum()})")
        ax.legend(fontsize=8, markerscale=3)
    else:
        ok = np.isfinite(colour)
        sc = ax.scatter(xy[ok, 0], xy[ok, 1], c=colour[ok], s=4, alpha=0.7, cmap="viridis")
        fig.colorbar(sc, ax=ax, label=colour_name)
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    ax.set_title(f"embeddings ({method}) coloured by {colour_name}", fontsize=9)
    return save_figure(fig, path)
