"""Classification of spectra (e.g. GALAXY / QSO / STAR) by cross-entropy."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectrax import metrics as M
from spectrax import plots
from spectrax.spectra import CLASS_NAMES
from spectrax.tasks.base import Task, forward, valid_rows


class ClassificationTask(Task):
    """Classes GALAXY=0, QSO=1, STAR=2 (:data:`spectrax.spectra.CLASS_IDS`) from the ``class``
    label column; cross-entropy over labelled valid rows. The model returns logits [B, C]."""

    def __init__(self, label: str = "class", class_names: tuple[str, ...] = CLASS_NAMES):
        self.label_names = (label,)
        self.class_names = tuple(class_names)

    def _target(self, batch):
        w = (batch.label_mask[:, 0] & batch.valid)
        y = jnp.clip(batch.labels[:, 0].astype(jnp.int32), 0, len(self.class_names) - 1)
        return y, w

    def loss(self, model, batch, *, train: bool, rng=None):
        logits = forward(model, batch, train=train).astype(jnp.float32)
        y, w = self._target(batch)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]
        wf = w.astype(jnp.float32)
        n = jnp.maximum(wf.sum(), 1.0)
        acc = jnp.sum((jnp.argmax(logits, -1) == y) * wf) / n
        return jnp.sum(ce * wf) / n, {"accuracy": acc}

    def predict(self, model, batch) -> dict[str, Any]:
        logits = forward(model, batch, train=False).astype(jnp.float32)
        return {"class_pred": jnp.argmax(logits, -1), "class_prob": jax.nn.softmax(logits)}

    def _selected(self, out):
        v = valid_rows(out) & out["label_mask"][:, 0]
        return out["labels"][v, 0].astype(int), out["class_pred"][v].astype(int)

    def metrics(self, out) -> dict[str, Any]:
        y, yp = self._selected(out)
        c = len(self.class_names)
        if not len(y):
            return {"n": 0}
        recall = M.per_class_recall(y, yp, c)
        res = {"accuracy": M.accuracy(y, yp), "macro_f1": M.macro_f1(y, yp, c), "n": len(y),
               "confusion_matrix": M.confusion_matrix(y, yp, c).tolist()}
        for k, name in enumerate(self.class_names):
            res[f"recall_{name}"] = float(recall[k])
        return res

    def figures(self, out, examples, workdir: Path, n: int) -> list[Path]:
        y, yp = self._selected(out)
        if not len(y):
            return []
        cm = M.confusion_matrix(y, yp, len(self.class_names))
        return [plots.confusion(cm, self.class_names, workdir / "confusion_matrix.png")]

    def catalogue(self, out) -> dict[str, np.ndarray]:
        names = np.array(self.class_names)
        return {"CLASS_PRED": names[out["class_pred"].astype(int)],
                **{f"PROB_{c}": out["class_prob"][:, k] for k, c in enumerate(self.class_names)}}
