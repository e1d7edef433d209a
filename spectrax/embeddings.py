r"""Tokenizer embeddings: export them to HDF5, and project them to 2-D.

Export (the ``--embeddings`` mode of ``spectrax.predict``; or :func:`export_embeddings`)::

    python -m spectrax.predict --config=configs/tokenizer_pretrain.py \
        --checkpoint=runs/tokenizer_pretrain-small --input=data/mine --embeddings=emb.h5

runs the restored tokenizer's ENCODER (:meth:`SpectralTokenizer.encode`, jitted; for a
``tokenizer_adapted`` run, its frozen ``.tokenizer``) over every spectrum of the inputs (shard
directories and/or DESI coadd FITS files, as the catalogue path reads them: bad pixels masked
and counted, unusable records refused by name) and writes, per spectrum, its token sequence and
its mean-pooled vector. Other models are refused (:class:`EmbeddingsError`). With
``--embeddings`` the command writes the HDF5 file and no catalogue.

Lengths: spectra keep their native grids. Each is padded to the smallest length in
``config.data.buckets`` that holds it (the training rule, :func:`spectrax.data.pipeline.
bucket_plan`; one compilation per bucket; a longer spectrum is refused); a config without
buckets pads to ``config.data.length`` when set, else runs each spectrum at its own length.
Padding never changes an embedding: padding pixels are masked, padding-only tokens are masked
as attention keys and are not stored, so a spectrum's tokens are the same (to float32 rounding,
~1e-6) in whatever bucket or batch it lands (tested against a direct ``encode`` call at its
native length).

HDF5 layout (n spectra, D = ``d_model``, N_i = ceil(L_i / P) tokens of spectrum i, L_i its
native pixel count, P the patch size; T = Σ N_i)::

    /ids              [n]      int64    target id (TARGETID, specobjid, simulator id)
    /pooled           [n, D]   float32  mean of spectrum i's VALID tokens (token_mask True);
                                        NaN when it has none (n_valid_tokens == 0)
    /n_pixels         [n]      int32    L_i
    /n_tokens         [n]      int32    N_i
    /n_valid_tokens   [n]      int32    Σ token_mask of spectrum i
    /token_offsets    [n + 1]  int64    spectrum i's tokens are rows offsets[i]:offsets[i+1]
    /tokens           [T, D]   float32 or float16 (attrs dtype)   the encoder's output tokens
    /token_mask       [T]      bool     True = valid token (> P/2 valid pixels in its patch)
    /labels/<name>    [n]      float32  every label column of the inputs (mixture shards: z,
                                        class, teff, logg, feh, survey), NaN where unknown;
                                        class and survey carry attrs ``categories`` (names of
                                        the integer codes, spectrax.spectra.CLASS_NAMES /
                                        SURVEY_NAMES)
    /split            [n]      str      shard split ("train", "val", "test"; "" for FITS files)
    /source           [n]      str      input name (shard directory or FITS file name)
    /order            [n]      int64    read order over all inputs; rows are written grouped by
                                        length bucket, ``np.argsort(order)`` restores it

``/tokens``, ``/token_mask`` and ``/token_offsets`` are present only when tokens were exported
(``tokens=True``, the default; ``--embeddings_tokens=false`` keeps the pooled vectors only,
~N times smaller: 244 float32 tokens of D = 512 are 0.5 MB per DESI spectrum).

Root attributes: ``format`` ("spectrax-embeddings"), ``format_version``, ``config`` (its name),
``config_json`` (the whole config), ``model`` ("name:variant"), ``model_name``, ``variant``,
``encoder`` ("tokenizer" or "tokenizer_adapted.tokenizer"), ``tokenizer_config`` (JSON of the
TokenizerConfig), ``d_model``, ``patch_size``, ``checkpoint`` (absolute run directory),
``step``, ``buckets``, ``length_policy``, ``pooling``, ``token_dtype``, ``tokens_stored``,
``label_names`` (JSON), ``inputs`` (JSON), ``split``, ``n_spectra``, ``n_tokens_total``,
``created`` (UTC ISO time), ``spectrax_version``.

The file is written to ``<output>.tmp`` and renamed when complete, so a reader never sees a
partial file; an interrupted export starts over (unlike the catalogue, it is not resumable).

Projection (2-D view of the pooled vectors)::

    python -m spectrax.embeddings plot --embeddings=emb.h5 --colour=class --out=proj.png \
        [--method=auto|umap|pca] [--max_points=N]

UMAP when ``umap-learn`` is installed (``auto``, the default, or ``umap``; not a dependency of
spectrax), PCA otherwise (numpy only). ``class`` and ``survey`` are drawn as categories, other
labels with a colour bar. Rows without a value of the colour label (NaN) and rows without a
pooled vector are left out, and how many is printed.

From Python::

    from spectrax.embeddings import export_embeddings, load_embeddings, token_sequence
    export_embeddings(config, "runs/tokenizer_pretrain-small", ["data/mine"], "emb.h5")
    emb = load_embeddings("emb.h5")        # dict of arrays: ids, pooled, labels, ...
    tok, mask = token_sequence("emb.h5", 3)  # [N_3, D], [N_3] of spectrum 3
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import spectrax
from spectrax import plots, sharding
from spectrax.data import inputs, pipeline, shards
from spectrax.data.readers import READERS
from spectrax.inference import InferenceModel
from spectrax.models.tokenizer import AdaptedTokenizer, SpectralTokenizer
from spectrax.spectra import CLASS_NAMES, SURVEY_NAMES, SpectrumError

FORMAT = "spectrax-embeddings"
FORMAT_VERSION = 1
# Models whose encoder this module can run: the tokenizer and the tokenizer under a head.
TOKENIZER_MODELS = ("tokenizer", "tokenizer_adapted")
POOLING = "mean over valid tokens (token_mask True); NaN when a spectrum has none"
# Label columns whose values are integer codes of named categories.
CATEGORICAL = ("class", "survey")


class EmbeddingsError(ValueError):
    """A config, model or embeddings file this module cannot use; the message says why."""


# ==============================================================================================
# The encoder
# ==============================================================================================
def check_config(config) -> None:
    """Raises EmbeddingsError unless ``config.model.name`` is a tokenizer model (before any
    checkpoint is read, so the mistake costs nothing)."""
    name = config.model.name
    if name not in TOKENIZER_MODELS:
        raise EmbeddingsError(
            f"config {config.name!r} uses model {name!r}; embeddings are exported only for "
            f"tokenizer models {list(TOKENIZER_MODELS)} (e.g. configs/tokenizer_pretrain.py, "
            "or a tokenizer_adapted config, whose frozen .tokenizer is used)")


def encoder_of(model):
    """The :class:`~spectrax.models.tokenizer.SpectralTokenizer` whose ``encode`` gives the
    embeddings: the model itself, or the frozen ``.tokenizer`` of an AdaptedTokenizer."""
    if isinstance(model, SpectralTokenizer):
        return model
    if isinstance(model, AdaptedTokenizer):
        return model.tokenizer
    raise EmbeddingsError(f"model {type(model).__name__} is not a tokenizer; embeddings are "
                          f"exported only for {list(TOKENIZER_MODELS)}")


def mean_pool(tokens, token_mask):
    """Mean of the valid tokens.

    Args:
      tokens: [B, N, D] any float dtype; token_mask: [B, N] bool, True = valid.

    Returns:
      pooled [B, D] float32 (zeros where a row has no valid token: the caller flags those),
      count [B] int32 (valid tokens per row).
    """
    w = jnp.asarray(token_mask, jnp.float32)
    total = jnp.einsum("bnd,bn->bd", jnp.asarray(tokens, jnp.float32), w)
    count = w.sum(-1)
    return total / jnp.maximum(count, 1.0)[:, None], count.astype(jnp.int32)


def encode_batch(encoder, batch) -> dict[str, Any]:
    """Embeddings of a SpectrumBatch (jittable): the raw-flux ``encode`` of the tokenizer,
    as its task calls it (flux, mask, wavelength, ivar), in inference mode.

    Returns:
      tokens [B, N, D] float32, token_mask [B, N] bool, pooled [B, D] float32,
      n_valid_tokens [B] int32; N = ceil(L / P) for the batch's (padded) length L.
    """
    tokens, token_mask = encoder.encode(batch.flux, batch.mask, batch.wavelength,
                                        ivar=batch.ivar, train=False)
    pooled, count = mean_pool(tokens, token_mask)
    return {"tokens": tokens.astype(jnp.float32), "token_mask": token_mask, "pooled": pooled,
            "n_valid_tokens": count}


def length_policy(config) -> inputs.LengthPolicy:
    """How records are padded for the encoder (module docstring): buckets, else up to
    ``config.data.length``, else each at its own length."""
    return inputs.LengthPolicy.for_model(config.data, exact=False)


# ==============================================================================================
# HDF5 writing
# ==============================================================================================
class _Writer:
    """Appends rows to growable HDF5 datasets (chunked, so memory stays one batch)."""

    def __init__(self, path: Path, d_model: int, label_names: Sequence[str], tokens: bool,
                 token_dtype: str):
        self.f = h5py.File(path, "w")
        self.n = 0
        self.t = 0
        self.tokens = tokens
        text = h5py.string_dtype()
        rows = 1024

        def grow(name, shape, dtype, chunk):
            return self.f.create_dataset(name, shape=(0,) + shape, maxshape=(None,) + shape,
                                         dtype=dtype, chunks=(chunk,) + shape)

        self.d = {"ids": grow("ids", (), np.int64, rows),
                  "pooled": grow("pooled", (d_model,), np.float32, 256),
                  "n_pixels": grow("n_pixels", (), np.int32, rows),
                  "n_tokens": grow("n_tokens", (), np.int32, rows),
                  "n_valid_tokens": grow("n_valid_tokens", (), np.int32, rows),
                  "split": grow("split", (), text, rows),
                  "source": grow("source", (), text, rows),
                  "order": grow("order", (), np.int64, rows)}
        group = self.f.create_group("labels")
        self.labels = {}
        for name in label_names:
            self.labels[name] = grow(f"labels/{name}", (), np.float32, rows)
        for name in CATEGORICAL:
            if name in self.labels:
                self.labels[name].attrs["categories"] = json.dumps(list(_categories(name)))
        group.attrs["names"] = json.dumps(list(label_names))
        if tokens:
            self.d["tokens"] = grow("tokens", (d_model,), np.dtype(token_dtype), 1024)
            self.d["token_mask"] = grow("token_mask", (), bool, 4096)
            self.d["tokens"].attrs["dtype"] = token_dtype
            self.offsets = [0]

    @staticmethod
    def _append(ds, values, start):
        values = np.asarray(values)
        if values.dtype.kind == "U":  # h5py writes variable-length strings from objects
            values = values.astype(object)
        ds.resize(start + len(values), axis=0)
        ds[start:start + len(values)] = values

    def write(self, rows: dict[str, np.ndarray], labels: np.ndarray,
              tokens: list[np.ndarray] | None, masks: list[np.ndarray] | None) -> None:
        """One batch: ``rows`` per-spectrum arrays [b, ...], ``labels`` [b, K] (NaN unknown),
        ``tokens``/``masks`` the b ragged sequences [N_i, D] / [N_i]."""
        b = len(rows["ids"])
        for key, ds in self.d.items():
            if key in rows:
                self._append(ds, rows[key], self.n)
        for j, ds in enumerate(self.labels.values()):
            self._append(ds, labels[:, j], self.n)
        if self.tokens:
            flat = np.concatenate(tokens, 0).astype(self.d["tokens"].dtype)
            self._append(self.d["tokens"], flat, self.t)
            self._append(self.d["token_mask"], np.concatenate(masks, 0), self.t)
            for t in tokens:
                self.offsets.append(self.offsets[-1] + len(t))
            self.t += len(flat)
        self.n += b

    def close(self, attrs: dict) -> None:
        if self.tokens:
            self.f.create_dataset("token_offsets", data=np.asarray(self.offsets, np.int64))
        for k, v in attrs.items():
            self.f.attrs[k] = v
        self.f.close()


def _categories(name: str) -> tuple[str, ...]:
    return {"class": CLASS_NAMES, "survey": SURVEY_NAMES}[name]


# ==============================================================================================
# Export
# ==============================================================================================
def export_embeddings(config, checkpoint: str | Path, input_paths: Sequence[str],
                      output: str | Path, *, batch_size: int = 64, split: str | None = None,
                      survey: str = "auto", tokens: bool = True, token_dtype: str = "float32"
                      ) -> dict[str, Any]:
    """Writes the tokenizer embeddings of every spectrum of ``input_paths`` to ``output`` (HDF5,
    layout in the module docstring).

    Args:
      config: the config the checkpoint was trained with (model ``tokenizer`` or
        ``tokenizer_adapted``; others raise EmbeddingsError before anything is read).
      checkpoint: run directory (or its checkpoints/ folder).
      input_paths: what :func:`spectrax.data.inputs.discover` takes: files of any survey,
        directories, shard directories.
      output: the HDF5 file to write (replaced atomically when complete).
      batch_size: spectra per jitted call (rounded up to a multiple of the local devices).
      split: only this split of shard inputs (default: all).
      survey: survey of raw files, or "auto" (from their names).
      tokens: store the token sequences too (False: pooled vectors only).
      token_dtype: "float32" or "float16", storage type of the tokens (pooled stays float32,
        computed from the float32 tokens).

    Returns:
      summary dict: rows, tokens (stored token rows), d_model, output, step, reader_counts,
      refused (messages of what was skipped: records or files, each named).

    Raises:
      EmbeddingsError: not a tokenizer model, or a bad ``token_dtype``.
      SpectrumError: no usable spectrum in any input.
    """
    check_config(config)
    if token_dtype not in ("float32", "float16"):
        raise EmbeddingsError(f"token_dtype must be 'float32' or 'float16', got {token_dtype!r}")
    model = InferenceModel.from_checkpoint(config, checkpoint)
    cfg = encoder_of(model.model()).cfg
    p, d = cfg.patch_size, cfg.d_model
    encode = model.jit(lambda m, b: encode_batch(encoder_of(m), b))
    batch_size = sharding.round_up_batch(batch_size, model.local_devices)
    policy = length_policy(config)
    found = inputs.discover(input_paths, survey=survey, split=split)
    label_names: list[str] = []
    for u in found.units:  # every label column of the inputs, without reading spectra
        names = (shards.read_manifest(u.directory).label_names
                 if isinstance(u, inputs.ShardUnit) else READERS[u.survey].LABEL_NAMES)
        label_names += [n for n in names if n not in label_names]
    counts: dict[str, int] = {}
    refused = [f"{f}: {r}" for f, r in found.skipped]
    rows = inputs.model_records(found.units, policy, counts, refused.append)

    def numbered():
        for order, row in enumerate(rows):
            row.meta["_order"] = order
            yield row

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    writer = _Writer(tmp, d, label_names, tokens, token_dtype)
    try:
        with tqdm(total=sum(u.size_hint() for u in found.units), desc="embeddings",
                  unit="spectrum", dynamic_ncols=True,
                  disable=jax.process_index() != 0) as bar:
            for batch, group in pipeline.batches_by_length(numbered(), batch_size, label_names):
                out = encode(model.state, model.device_batch(batch))
                out = {k: np.asarray(v) for k, v in out.items()}
                _write_batch(writer, group, batch, out, p, tokens)
                bar.update(len(group))
        if writer.n == 0:
            raise SpectrumError(f"no spectra found in --input {list(map(str, input_paths))}"
                                + (": " + "; ".join(refused[:5]) if refused else ""))
        attrs = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "config": config.name,
            "config_json": config.to_json_best_effort(),
            "model": f"{config.model.name}:{config.model.variant}",
            "model_name": config.model.name, "variant": str(config.model.variant),
            "encoder": ("tokenizer" if config.model.name == "tokenizer"
                        else f"{config.model.name}.tokenizer"),
            "tokenizer_config": json.dumps(dataclasses.asdict(cfg)),
            "d_model": d, "patch_size": p, "checkpoint": str(Path(checkpoint).absolute()),
            "step": int(model.step), "buckets": json.dumps(list(policy.buckets)),
            "length_policy": json.dumps(dataclasses.asdict(policy)), "pooling": POOLING,
            "token_dtype": token_dtype, "tokens_stored": bool(tokens),
            "label_names": json.dumps(label_names),
            "inputs": json.dumps([str(i) for i in input_paths]), "split": split or "",
            "n_spectra": writer.n, "n_tokens_total": writer.t,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "spectrax_version": spectrax.__version__}
        writer.close(attrs)
        os.replace(tmp, output)
    except BaseException:
        try:
            writer.f.close()
        except Exception:
            pass
        tmp.unlink(missing_ok=True)
        raise
    return {"rows": writer.n, "tokens": writer.t, "d_model": d, "output": str(output),
            "step": int(model.step), "reader_counts": counts, "refused": refused}


def _write_batch(writer: _Writer, group: list[inputs.ModelRecord], batch, out: dict, p: int,
                 tokens: bool) -> None:
    """Host side of one batch: cut each row's tokens to its native N_i = ceil(L_i / P)."""
    b = len(group)  # rows past b are padding rows of the last batch
    lengths = np.array([len(r.record["flux"]) for r in group], np.int32)
    n_tok = -(-lengths // p)
    mask = out["token_mask"][:b]
    # Tokens past N_i cover bucket padding only (λ = −1, masked), so none can be valid.
    past = np.arange(mask.shape[1])[None, :] >= n_tok[:, None]
    assert not np.any(mask & past), "a token of bucket padding is marked valid"
    count = out["n_valid_tokens"][:b]
    pooled = np.where((count > 0)[:, None], out["pooled"][:b], np.nan).astype(np.float32)
    metas = [r.meta for r in group]
    rows = {"ids": batch.ids[:b], "pooled": pooled, "n_pixels": lengths, "n_tokens": n_tok,
            "n_valid_tokens": count.astype(np.int32),
            "split": [str(m.get("SPLIT", "")) for m in metas],
            "source": [str(m.get("SOURCE", "")) for m in metas],
            "order": np.array([m["_order"] for m in metas], np.int64)}
    labels = np.where(batch.label_mask[:b], batch.labels[:b], np.nan).astype(np.float32)
    seqs = [out["tokens"][i, :n_tok[i]] for i in range(b)] if tokens else None
    seq_masks = [mask[i, :n_tok[i]] for i in range(b)] if tokens else None
    writer.write(rows, labels, seqs, seq_masks)


# ==============================================================================================
# Reading
# ==============================================================================================
def _open(path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--embeddings {path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise EmbeddingsError(f"{path}: not an HDF5 file ({e})") from e
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise EmbeddingsError(f"{path}: not a spectrax embeddings file (attribute format is "
                              f"{f.attrs.get('format')!r}, expected {FORMAT!r})")
    return f


def load_embeddings(path, *, tokens: bool = False) -> dict[str, Any]:
    """The per-spectrum arrays of an embeddings file as numpy arrays: ids, pooled, n_pixels,
    n_tokens, n_valid_tokens, split, source, order, labels (dict name -> [n]), attrs (dict);
    with ``tokens=True`` also tokens [T, D], token_mask [T] and token_offsets [n + 1]."""
    with _open(path) as f:
        out: dict[str, Any] = {k: f[k][...] for k in ("ids", "pooled", "n_pixels", "n_tokens",
                                                       "n_valid_tokens", "order")}
        for k in ("split", "source"):
            out[k] = np.array([s.decode() if isinstance(s, bytes) else s for s in f[k][...]])
        out["labels"] = {k: f["labels"][k][...] for k in json.loads(f.attrs["label_names"])}
        out["attrs"] = dict(f.attrs)
        if tokens:
            if "tokens" not in f:
                raise EmbeddingsError(f"{path}: exported without token sequences "
                                      "(tokens=False / --embeddings_tokens=false)")
            for k in ("tokens", "token_mask", "token_offsets"):
                out[k] = f[k][...]
    return out


def token_sequence(path, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Spectrum ``i``'s tokens [N_i, D] and token mask [N_i] (row i of the file)."""
    with _open(path) as f:
        if "tokens" not in f:
            raise EmbeddingsError(f"{path}: exported without token sequences")
        a, b = f["token_offsets"][i:i + 2]
        return f["tokens"][a:b], f["token_mask"][a:b]


# ==============================================================================================
# Projection and the plot command
# ==============================================================================================
def pca(x: np.ndarray, k: int = 2) -> np.ndarray:
    """[n, D] -> [n, k] principal-component coordinates (numpy only).

    The SVD of the D × D covariance (not of the n × D data: memory stays D², whatever n), with
    each component's sign fixed so its largest loading is positive (reproducible figures).
    """
    x = np.asarray(x, np.float64)
    xc = x - x.mean(0)
    cov = xc.T @ xc / max(len(x) - 1, 1)
    u, _, _ = np.linalg.svd(cov)
    comps = u[:, :k]
    sign = np.sign(comps[np.abs(comps).argmax(0), np.arange(comps.shape[1])])
    return xc @ (comps * np.where(sign == 0, 1.0, sign))


def project(x: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D projection of [n, D] vectors -> (xy [n, 2], the method used: "umap" or "pca").

    ``auto`` and ``umap`` use umap-learn when it is importable (not a dependency of spectrax);
    without it they fall back to PCA, and ``umap`` says so.
    """
    if method not in ("auto", "umap", "pca"):
        raise EmbeddingsError(f"--method must be auto, umap or pca, got {method!r}")
    if method in ("auto", "umap"):
        try:
            import umap  # noqa: F401  optional
        except ImportError:
            if method == "umap":
                print("spectrax.embeddings: umap-learn is not installed; using PCA "
                      "(pip install umap-learn for UMAP)", flush=True)
        else:
            reducer = umap.UMAP(n_components=2, random_state=seed,
                                n_neighbors=max(2, min(15, len(x) - 1)))
            return np.asarray(reducer.fit_transform(np.asarray(x, np.float32))), "umap"
    return pca(x, 2), "pca"


def plot(embeddings: str | Path, colour: str, out: str | Path, *, method: str = "auto",
         max_points: int = 0, seed: int = 0) -> dict[str, Any]:
    """Projects the pooled vectors of an embeddings file to 2-D and draws them coloured by
    ``colour`` (a label column, or a per-spectrum column such as n_valid_tokens).

    Rows without a pooled vector (no valid token) or without a colour value (NaN) are left
    out and counted; ``max_points`` > 0 draws a random subset of that many (seeded).

    Returns:
      {"path", "method", "plotted", "dropped_no_label", "dropped_no_vector"}.
    """

    with _open(embeddings) as f:
        pooled = f["pooled"][...]
        names = json.loads(f.attrs["label_names"])
        if colour in names:
            ds = f["labels"][colour]
        elif colour in f and isinstance(f[colour], h5py.Dataset) and f[colour].ndim == 1 \
                and len(f[colour]) == len(pooled) and f[colour].dtype.kind in "iuf":
            ds = f[colour]
        else:
            numeric = [k for k in ("n_pixels", "n_tokens", "n_valid_tokens") if k in f]
            raise EmbeddingsError(f"{embeddings}: no colour column {colour!r}; label columns "
                                  f"{names}, other columns {numeric}")
        c = ds[...].astype(np.float64)
        categories = None
        if "categories" in ds.attrs:
            categories = tuple(json.loads(ds.attrs["categories"]))
        elif colour in CATEGORICAL:
            categories = _categories(colour)
    has_vec = np.all(np.isfinite(pooled), axis=1)
    has_label = np.isfinite(c)
    keep = has_vec & has_label
    dropped_label = int(np.sum(has_vec & ~has_label))
    dropped_vec = int(np.sum(~has_vec))
    if dropped_label:
        print(f"left out {dropped_label} spectra without a {colour} value (NaN)", flush=True)
    if dropped_vec:
        print(f"left out {dropped_vec} spectra without a pooled vector (no valid token)",
              flush=True)
    idx = np.flatnonzero(keep)
    if max_points and len(idx) > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_points, replace=False))
    if len(idx) < 3:
        raise EmbeddingsError(f"{embeddings}: only {len(idx)} spectra have both a pooled "
                              f"vector and a {colour} value; nothing to project")
    xy, used = project(pooled[idx], method, seed)
    print(f"projection: {used.upper()} of {len(idx)} pooled vectors (D = {pooled.shape[1]})",
          flush=True)
    path = plots.embedding_projection(xy, c[idx], Path(out), method=used.upper(),
                                      colour_name=colour, categories=categories)
    return {"path": str(path), "method": used, "plotted": int(len(idx)),
            "dropped_no_label": dropped_label, "dropped_no_vector": dropped_vec}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spectrax.embeddings",
        description="Tokenizer embeddings (export them with python -m spectrax.predict "
                    "--embeddings=emb.h5).")
    sub = parser.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("plot", help="2-D projection of the mean-pooled vectors")
    pl.add_argument("--embeddings", required=True, help="HDF5 file written by the export")
    pl.add_argument("--colour", "--color", default="class",
                    help="label column to colour by (class, survey, z, teff, ...)")
    pl.add_argument("--out", default="embeddings.png", help="PNG to write")
    pl.add_argument("--method", default="auto", choices=("auto", "umap", "pca"),
                    help="auto: UMAP when umap-learn is installed, else PCA")
    pl.add_argument("--max_points", type=int, default=0,
                    help="draw a random subset of this many spectra (0: all)")
    args = parser.parse_args(argv)
    try:
        res = plot(args.embeddings, args.colour, args.out, method=args.method,
                   max_points=args.max_points)
    except (EmbeddingsError, FileNotFoundError) as e:
        print(f"spectrax.embeddings: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {res['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
