"""The CPU AdamW kernel (spectrax/kernels/adamw.cc) against the XLA path of
spectrax.optim.apply_step: parameters and moments equal to rounding over several steps (clipping
on and off, weight decay, frozen and non-float32 leaves, leaves spanning several work items,
a skipped step, donated buffers), and a kernel that cannot be built says why (KernelUnavailable,
which spectrax.kernels.load turns into a warning and the XLA path)."""
from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from spectrax import kernels, optim

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="no C++ compiler: the kernel cannot be built here")


def _config(clip_norm=1.0, weight_decay=1e-2):
    return ml_collections.ConfigDict({"optim": {
        "name": "adamw", "lr": 1e-2, "weight_decay": weight_decay, "clip_norm": clip_norm,
        "schedule": "cosine", "warmup_steps": 2, "plateau_patience": 2, "t0_epochs": 2,
        "eta_min": 1e-4}})


def _params():
    r = np.random.default_rng(0)
    return {"wide": jnp.asarray(r.normal(size=(301, 777)), jnp.float32),  # 3.6 work items
            "bias": jnp.asarray(r.normal(size=(7,)), jnp.float32),
            "half": jnp.asarray(r.normal(size=(4, 5)), jnp.bfloat16),     # not float32: XLA
            "head": jnp.asarray(r.normal(size=(5, 3)), jnp.float32)}


def _grads(seed, scale):
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * r.normal(size=x.shape), x.dtype),
                        _params())


def _run(monkeypatch, use_kernel, opt, steps):
    monkeypatch.setenv(kernels.ENV_SWITCH, "1" if use_kernel else "0")
    assert optim.adamw_kernel_ready() == use_kernel
    # Parameters and state donated, as the trainer's step does: the kernel updates in place.
    step = jax.jit(lambda p, s, g, loss: optim.apply_step(opt, p, s, g, loss=loss),
                   donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, _params())
    state = opt.init(params)
    if use_kernel:
        assert "spectrax_adamw_f32" in step.lower(params, state, _grads(0, 1.0),
                                                  jnp.float32(1.0)).as_text()
    history = []
    for i, (scale, loss) in enumerate(steps):
        params, state, norm, applied = step(params, state, _grads(i, scale), jnp.float32(loss))
        history.append(jax.device_get((params, state, norm, applied)))
    return history


@pytest.mark.parametrize("clip_norm,weight_decay,frozen", [
    (1.0, 1e-2, False), (0.0, 0.0, False), (5.0, 1e-2, True)])
def test_kernel_equals_the_xla_path_to_rounding(monkeypatch, clip_norm, weight_decay, frozen):
    labels = optim.freeze_labels_for(_params(), ("head",)) if frozen else None
    opt = optim.build_optimizer(_config(clip_norm, weight_decay), 20, labels)
    # Gradient norms ~3 and ~2000: clipping off and on in turn; step 3 has a non-finite loss
    # (skipped: nothing may change).
    steps = [(0.003, 1.0), (1.0, 1.0), (0.003, float("nan")), (1.0, 2.0), (0.003, 0.5)]
    with_kernel = _run(monkeypatch, True, opt, steps)
    reference = _run(monkeypatch, False, opt, steps)
    for k, (a, b) in enumerate(zip(with_kernel, reference)):
        assert bool(a[3]) == bool(b[3]) == (k != 2)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            # XLA contracts m·b1 + g·(1-b1) into an FMA, the kernel rounds the product first:
            # an ulp of the larger term (moments are sums of terms that cancel).
            scale = np.max(np.abs(y)) if y.size else 0.0
            np.testing.assert_allclose(x, y, rtol=5e-7, atol=5e-7 * scale, err_msg=f"step {k}")
    # The skipped step changed nothing.
    for x, y in zip(jax.tree.leaves(with_kernel[2][:2]), jax.tree.leaves(with_kernel[1][:2])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The parameters moved (the comparison is not between two copies of the start).
    assert not np.array_equal(with_kernel[-1][0]["wide"], np.asarray(_params()["wide"]))
    if frozen:
        np.testing.assert_array_equal(with_kernel[-1][0]["head"], np.asarray(_params()["head"]))


def test_a_kernel_that_cannot_be_built_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECTRAX_CACHE_DIR", str(tmp_path))     # nothing cached there
    monkeypatch.setenv("CXX", "false")                          # a "compiler" that fails
    with pytest.raises(kernels.KernelUnavailable, match="compiling adamw.cc failed"):
        kernels.build("adamw")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(kernels.KernelUnavailable, match="no-such-compiler"):
        kernels.build("adamw")
