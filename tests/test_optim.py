"""spectrax.optim: the fused clip + AdamW + guard step against optax's chain (values, state
layout, frozen parameters, skipped steps), the CPU-friendly norms against float64, and the
schedules."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from spectrax import optim


def _config(name="adamw", schedule="cosine", clip_norm=1.0, weight_decay=1e-2, warmup=3):
    return ml_collections.ConfigDict({"optim": {
        "name": name, "lr": 1e-2, "weight_decay": weight_decay, "clip_norm": clip_norm,
        "schedule": schedule, "warmup_steps": warmup, "plateau_patience": 2, "t0_epochs": 2,
        "eta_min": 1e-4}})


def _params(seed=0):
    """Leaves of sizes that exercise the 8-wide reductions: ragged tails, a large kernel, a
    scalar-like bias."""
    r = np.random.default_rng(seed)
    return {"big": {"kernel": jnp.asarray(r.normal(size=(301, 77)), jnp.float32),
                    "bias": jnp.asarray(r.normal(size=(77,)), jnp.float32)},
            "head": {"kernel": jnp.asarray(r.normal(size=(5, 3)), jnp.float32),
                     "bias": jnp.asarray(r.normal(size=(3,)), jnp.float32)}}


def _grads(seed, scale):
    return jax.tree.map(lambda x: x * 0 + scale * jnp.asarray(
        np.random.default_rng(seed).normal(size=x.shape), jnp.float32), _params())


def _reference_step(opt, params, state, grads):
    """optax's chain as built by build_optimizer, applied the plain way."""
    updates, state = opt.tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


@pytest.mark.parametrize("schedule,clip_norm,frozen", [
    ("cosine", 1.0, False), ("constant", 0.0, False), ("cosine_restarts", 1.0, True),
    ("constant", 5.0, True)])
def test_fused_adamw_matches_optax_chain(schedule, clip_norm, frozen):
    params = _params()
    labels = optim.freeze_labels_for(params, ("head",)) if frozen else None
    opt = optim.build_optimizer(_config(schedule=schedule, clip_norm=clip_norm), 20, labels,
                                steps_per_epoch=3)
    assert opt.adamw is not None
    state = ref_state = opt.init(params)
    ref_params = params
    step = jax.jit(lambda p, s, g: optim.apply_step(opt, p, s, g, loss=jnp.float32(1.0)))
    for i in range(6):
        # Gradient norms of ~0.1 and ~40: clipping inactive and active in turn.
        grads = _grads(i, 0.003 if i % 2 else 1.0)
        params, state, norm, applied = step(params, state, grads)
        ref_params, ref_state = _reference_step(opt, ref_params, ref_state, grads)
        assert bool(applied)
        np.testing.assert_allclose(norm, optax.tree.norm(grads), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
            # Moments are sums of terms of ~0.1 that cancel: compare at that scale.
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-8)
    # The same layout as optax's own state: checkpoints written either way restore.
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    if frozen:
        for a, b in zip(jax.tree.leaves(params["head"]), jax.tree.leaves(_params()["head"])):
            np.testing.assert_array_equal(a, b)


def test_nonfinite_gradient_or_loss_changes_nothing():
    params = _params()
    opt = optim.build_optimizer(_config(), 20)
    state = opt.init(params)
    step = jax.jit(lambda p, s, g, loss: optim.apply_step(opt, p, s, g, loss=loss))
    params, state, _, _ = step(params, state, _grads(0, 1.0), jnp.float32(1.0))
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), _grads(1, 1.0))
    for grads, loss in ((bad, jnp.float32(1.0)), (_grads(2, 1.0), jnp.float32(jnp.inf))):
        new_params, new_state, norm, applied = step(params, state, grads, loss)
        assert not bool(applied)
        for a, b in zip(jax.tree.leaves((new_params, new_state)),
                        jax.tree.leaves((params, state))):
            np.testing.assert_array_equal(a, b)


def test_guard_update_keeps_parameters_on_an_overflowing_update():
    params = _params()
    cfg = _config(name="sgd", clip_norm=0.0, warmup=0, schedule="constant")
    cfg.optim.lr = 1e38
    opt = optim.build_optimizer(cfg, 5)
    assert opt.adamw is None  # SGD goes through optax's update
    state = opt.init(params)
    grads = _grads(0, 10.0)
    new, _, _, applied = optim.apply_step(opt, params, state, grads, loss=jnp.float32(1.0),
                                          guard_update=True)
    assert not bool(applied)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    new, _, _, applied = optim.apply_step(opt, params, state, grads, loss=jnp.float32(1.0))
    assert bool(applied) and not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(new))


def test_sgd_and_plateau_go_through_optax():
    params = _params()
    for cfg in (_config(name="sgd"), _config(schedule="plateau")):
        opt = optim.build_optimizer(cfg, 10)
        assert opt.adamw is None and opt.uses_value == (cfg.optim.schedule == "plateau")
        state = ref_state = opt.init(params)
        p, ref = params, params
        for i in range(3):
            grads = _grads(i, 1.0)
            p, state, _, _ = optim.apply_step(opt, p, state, grads, loss=jnp.float32(2.0))
            extra = {"value": jnp.float32(2.0)} if opt.uses_value else {}
            updates, ref_state = opt.tx.update(grads, ref_state, ref, **extra)
            ref = optax.apply_updates(ref, updates)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)  # ulps: XLA may form FMAs


@pytest.mark.parametrize("size", [1, 7, 8, 255, 257, 1001, 100_003])
def test_sum_of_squares_matches_float64(size):
    x = np.random.default_rng(size).normal(size=size).astype(np.float32)
    expected = np.sum(x.astype(np.float64) ** 2)
    np.testing.assert_allclose(float(jax.jit(optim.sum_of_squares)(x)), expected, rtol=2e-6)
    tree = {"a": x, "b": x[: size // 2 + 1].reshape(-1, 1)}
    both = expected + np.sum(x[: size // 2 + 1].astype(np.float64) ** 2)
    np.testing.assert_allclose(float(optim.global_norm(tree)), np.sqrt(both), rtol=2e-6)


def test_schedules_and_unknown_names():
    sched = optim.cosine_warm_restarts(1.0, 10, 0.0)
    values = np.array([float(sched(s)) for s in range(21)])
    assert values[0] == pytest.approx(1.0) and values[10] == pytest.approx(1.0)
    assert values[5] == pytest.approx(0.5, abs=1e-6)
    lr = optim.learning_rate(_config(schedule="cosine", warmup=3), 20)
    assert float(lr(0)) == 0.0 and float(lr(3)) == pytest.approx(1e-2)
    assert float(lr(19)) < 1e-2
    with pytest.raises(ValueError, match="schedule"):
        optim.learning_rate(_config(schedule="linear"), 10)
    with pytest.raises(ValueError, match="adamw or sgd"):
        optim.build_optimizer(_config(name="lion"), 10)
