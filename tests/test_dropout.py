"""spectrax.nn.Dropout: byte-resolution masks, nnx.Dropout's interface."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectrax.nn import Dropout
from spectrax.nn.dropout import keep_mask, threshold


@pytest.mark.parametrize("rate, expected", [(0.1, 26), (0.05, 13), (0.5, 128), (0.0, 0),
                                            (1.0, 256), (0.001, 0)])
def test_threshold_is_the_nearest_multiple_of_one_256th(rate, expected):
    assert threshold(rate) == expected
    with pytest.raises(ValueError, match="outside"):
        threshold(1.5)


@pytest.mark.parametrize("shape", [(64, 1000), (8, 7, 1001), (4003,)])
def test_keep_fraction_matches_the_effective_rate(shape):
    keep = np.asarray(keep_mask(jax.random.key(3), shape, 0.1))
    assert keep.shape == shape and keep.dtype == bool
    n = keep.size
    p = 1 - 26 / 256
    # 5 standard deviations of a binomial fraction: fails for a wrong threshold or bit layout.
    assert abs(keep.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    # Neighbouring elements come from the four bytes of one word: they must be independent.
    flat = keep.reshape(-1)[: (keep.size // 2) * 2].reshape(-1, 2)
    both = np.mean(flat[:, 0] & flat[:, 1])
    assert abs(both - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / len(flat))


def test_masks_differ_between_keys_and_repeat_for_one_key():
    a = keep_mask(jax.random.key(0), (16, 256), 0.3)
    b = keep_mask(jax.random.key(1), (16, 256), 0.3)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, keep_mask(jax.random.key(0), (16, 256), 0.3))


def test_dropout_preserves_the_expectation_and_dtype():
    layer = Dropout(0.1, rngs=nnx.Rngs(dropout=0))
    x = jnp.ones((256, 512), jnp.bfloat16)
    y = layer(x, deterministic=False)
    assert y.dtype == jnp.bfloat16
    kept = np.asarray(y, np.float32) != 0
    np.testing.assert_allclose(np.asarray(y, np.float32)[kept], 1 / (1 - 26 / 256), rtol=1e-2)
    assert abs(float(jnp.mean(y.astype(jnp.float32))) - 1.0) < 0.01
    assert layer.effective_rate == 26 / 256
    # A new mask on every call (the RNG stream advances).
    assert not np.array_equal(y, layer(x, deterministic=False))


def test_deterministic_zero_and_one_rates_and_broadcast_dims():
    x = jnp.arange(24.0).reshape(2, 3, 4) + 1
    np.testing.assert_array_equal(Dropout(0.5, rngs=nnx.Rngs(0))(x, deterministic=True), x)
    np.testing.assert_array_equal(Dropout(0.0, rngs=nnx.Rngs(0))(x, deterministic=False), x)
    np.testing.assert_array_equal(Dropout(1.0, rngs=nnx.Rngs(0))(x, deterministic=False), 0)
    layer = Dropout(0.5, broadcast_dims=(1,), rngs=nnx.Rngs(dropout=2))
    y = np.asarray(layer(jnp.ones((64, 3, 4)), deterministic=False))
    # One mask per (batch, feature), shared along the broadcast axis.
    assert (y == y[:, :1, :]).all() and 0 < (y == 0).mean() < 1
    with pytest.raises(ValueError, match="deterministic"):
        Dropout(0.5, deterministic=None, rngs=nnx.Rngs(0))(x)


def test_gradient_flows_through_kept_elements_only():
    layer = Dropout(0.25, rngs=nnx.Rngs(dropout=5))
    key = jax.random.key(7)
    x = jnp.ones((32, 40))
    y, grad = jax.value_and_grad(lambda x: jnp.sum(layer(x, deterministic=False, rngs=key)))(x)
    out = layer(x, deterministic=False, rngs=key)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(out))   # d(out)/dx = mask · scale
    np.testing.assert_allclose(float(y), float(jnp.sum(out)))
