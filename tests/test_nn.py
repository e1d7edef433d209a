"""Shared layers: sinusoidal/wavelength embeddings, masked attention, PyTorch-shaped transformer
layers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectrax.nn import (MultiHeadAttention, TransformerDecoderLayer, TransformerEncoderLayer,
                         WavelengthEmbedding, sinusoidal_embedding)


# Layer tests share one width (D, H, FFN) with the SpecPT 'small'/'tokens' variants: on CPU the
# cost of a test is mostly compiling each operation once per shape.
D, H, FFN = 128, 4, 256


@nnx.jit(static_argnames="deterministic")
def run(module, *args, deterministic=True, **kwargs):
    """module(*args, **kwargs) compiled as one program (cheaper than op-by-op on CPU)."""
    return module(*args, deterministic=deterministic, **kwargs)


def param_count(module) -> int:
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------

def test_sinusoidal_embedding_layout_and_values():
    x = jnp.array([[0.0, 0.25], [1.0, 2.5]])
    emb = sinusoidal_embedding(x, dim=6, min_period=1.0, max_period=4.0)   # periods 1, 2, 4
    assert emb.shape == (2, 2, 6) and emb.dtype == jnp.float32
    periods = np.array([1.0, 2.0, 4.0])
    angles = 2 * np.pi * np.asarray(x, np.float64)[..., None] / periods
    expected = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)
    np.testing.assert_allclose(emb, expected, atol=1e-6)
    # x = 0: sin half 0, cos half 1.
    np.testing.assert_array_equal(emb[0, 0], [0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize("dim", [0, 3, -2])
def test_sinusoidal_embedding_rejects_odd_or_empty_dim(dim):
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(jnp.zeros(3), dim, 1.0, 2.0)


def test_wavelength_embedding_depends_only_on_wavelength():
    emb = WavelengthEmbedding(32, 16, rngs=nnx.Rngs(0))
    assert emb.features == 16
    desi = jnp.asarray(3600.0 + 0.8 * np.arange(200, dtype=np.float32))
    # Another "survey": different length, the shared wavelengths at other positions.
    other = jnp.concatenate([jnp.array([5000.5, 7000.25, -1.0]), desi[50:120]])[None, :]
    embed = nnx.jit(lambda module, wave: module(wave))
    e_desi = embed(emb, desi)
    e_other = embed(emb, other)
    assert e_desi.shape == (200, 16) and e_other.shape == (1, 73, 16)
    # Equal to float32 rounding, not bitwise: the projection's matmul is blocked differently for
    # the two shapes, so its sums are accumulated in another order.
    np.testing.assert_allclose(e_other[0, 3:], e_desi[50:120], rtol=0, atol=2e-6)
    # Equal values inside one array too.
    twice = embed(emb, jnp.array([4861.35, 6564.6, 4861.35]))
    np.testing.assert_array_equal(twice[0], twice[2])
    assert not np.allclose(twice[0], twice[1])


def test_wavelength_embedding_is_zero_on_padding_without_nan_gradients():
    for emb in (WavelengthEmbedding(8), WavelengthEmbedding(8, 4, rngs=nnx.Rngs(0))):
        wave = jnp.array([-1.0, 0.0, 5000.0])
        out, grad = nnx.jit(lambda m, w: (m(w), jax.grad(lambda w: m(w).sum())(w)))(emb, wave)
        np.testing.assert_array_equal(out[:2], 0.0)
        assert np.any(out[2] != 0)
        assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("projection", [None, 16])
def test_wavelength_embedding_summed_equals_the_sum_of_embeddings(projection):
    """summed() (the tokenizer's pooled patches) reduces before joining the sin and cos halves;
    the values are bitwise those of summing the per-pixel embedding, padding included."""
    rng = np.random.default_rng(0)
    wave = np.where(rng.random((3, 7, 32)) > 0.1, rng.uniform(3600, 9800, (3, 7, 32)), -1.0)
    wave = jnp.asarray(wave, jnp.float32)
    emb = WavelengthEmbedding(64, projection, rngs=nnx.Rngs(0))
    for axis in (-1, 1):
        np.testing.assert_array_equal(jax.jit(lambda w: emb.summed(w, axis))(wave),
                                      jax.jit(lambda w: emb(w).sum(axis % 3))(wave))


def test_wavelength_embedding_needs_rngs_for_projection():
    with pytest.raises(ValueError, match="rngs"):
        WavelengthEmbedding(8, 4)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def reference_attention(mha: MultiHeadAttention, q_in, kv_in, key_mask):
    """Float64 numpy multi-head softmax attention with the module's weights."""
    def linear(layer, x):
        return (np.asarray(x, np.float64) @ np.asarray(layer.kernel[...], np.float64)
                + np.asarray(layer.bias[...], np.float64))

    b, lq, d = q_in.shape
    h, hd = mha.num_heads, mha.head_dim
    q = linear(mha.q_proj, q_in).reshape(b, lq, h, hd).transpose(0, 2, 1, 3)
    k = linear(mha.k_proj, kv_in).reshape(b, -1, h, hd).transpose(0, 2, 1, 3)
    v = linear(mha.v_proj, kv_in).reshape(b, -1, h, hd).transpose(0, 2, 1, 3)
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    logits = np.where(key_mask[:, None, None, :], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    ctx = (weights @ v).transpose(0, 2, 1, 3).reshape(b, lq, d)
    return linear(mha.out_proj, ctx)


def test_attention_parameter_count_matches_pytorch():
    d = 512
    mha = nnx.eval_shape(lambda: MultiHeadAttention(d, 8, rngs=nnx.Rngs(0)))
    assert param_count(mha) == 4 * d * d + 4 * d == 1_050_624


def test_masked_attention_matches_float64_reference():
    rng = np.random.default_rng(0)
    b, lq, lk, d = 3, 5, 7, D
    mha = MultiHeadAttention(d, H, rngs=nnx.Rngs(1))
    q_in = rng.normal(size=(b, lq, d)).astype(np.float32)
    kv_in = rng.normal(size=(b, lk, d)).astype(np.float32)
    key_mask = rng.random((b, lk)) > 0.4
    key_mask[:, 0] = True                      # at least one valid key per sample
    key_mask[2] = [True] + [False] * (lk - 1)  # a sample with a single valid key
    out = run(mha, jnp.asarray(q_in), jnp.asarray(kv_in), jnp.asarray(key_mask))
    np.testing.assert_allclose(out, reference_attention(mha, q_in, kv_in, key_mask), atol=1e-5)
    # No mask = all keys valid.
    out = run(mha, jnp.asarray(q_in), jnp.asarray(kv_in), None)
    np.testing.assert_allclose(out, reference_attention(mha, q_in, kv_in,
                                                        np.ones((b, lk), bool)), atol=1e-5)


@pytest.mark.parametrize("implementation", ["auto", "deferred", "blocked", "xla"])
def test_attention_implementations_match_float64_reference(implementation):
    rng = np.random.default_rng(3)
    mha = MultiHeadAttention(D, H, implementation=implementation, rngs=nnx.Rngs(2))
    q_in = rng.normal(size=(2, 6, D)).astype(np.float32) * 3  # large logits: softmax stability
    kv_in = rng.normal(size=(2, 9, D)).astype(np.float32) * 3
    key_mask = rng.random((2, 9)) > 0.5
    key_mask[:, 0] = True
    out = run(mha, jnp.asarray(q_in), jnp.asarray(kv_in), jnp.asarray(key_mask))
    np.testing.assert_allclose(out, reference_attention(mha, q_in, kv_in, key_mask), atol=2e-5)


def _qkv(rng, b, t, s, n, h, scale=2.0, dtype=jnp.float32):
    return tuple(jnp.asarray(rng.normal(size=shape) * scale, dtype)
                 for shape in ((b, t, n, h), (b, s, n, h), (b, s, n, h)))


def _reference_attend(q, k, v, mask):
    """Float64 softmax attention written out (jnp, so it can be differentiated)."""
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", weights, v)


@pytest.mark.parametrize("implementation", ["deferred", "blocked"])
def test_attention_gradients_match_jax_reference(implementation):
    """The deferred normalisation (max under stop_gradient, division after the value matmul) and
    the blocked custom VJP have the same gradients as jax.nn.dot_product_attention's softmax."""
    from spectrax.nn import attend
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, 2, 5, 70, 3, 4)   # 70 keys: three blocks of 32, the last one ragged
    mask = jnp.asarray(rng.random((2, 1, 1, 70)) > 0.3).at[:, :, :, 0].set(True)
    loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, mask,  # noqa: E731
                                                             implementation=impl)))
    ours = jax.grad(loss(implementation), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="flash"):
        attend(q, k, v, implementation="flash")


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 75), (2, 3, 6, 75), None])
def test_blocked_attention_and_its_gradients_match_float64(mask_shape):
    """In float64 the blocked forward and its custom VJP agree with plain softmax attention to
    rounding (1e-12), for key-padding masks, per-head per-query masks and no mask, with keys
    spanning several blocks and a block that is entirely masked."""
    from spectrax.nn.attention import blocked_attention
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        q, k, v = _qkv(rng, 2, 6, 75, 3, 8, dtype=jnp.float64)
        if mask_shape is None:
            mask, full = None, jnp.ones((1, 1, 1, 75), bool)
        else:
            mask = jnp.asarray(rng.random(mask_shape) > 0.4).at[..., 0].set(True)
            mask = mask.at[..., 32:64].set(False)   # the whole second block masked
            full = mask
        np.testing.assert_allclose(blocked_attention(q, k, v, mask),
                                   _reference_attend(q, k, v, full), atol=1e-12)
        cot = jnp.asarray(rng.normal(size=q.shape))
        ours = jax.grad(lambda *a: jnp.sum(blocked_attention(*a, mask) * cot), (0, 1, 2))(q, k, v)
        ref = jax.grad(lambda *a: jnp.sum(_reference_attend(*a, full) * cot), (0, 1, 2))(q, k, v)
        for a, b in zip(ours, ref):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(a, b, atol=1e-12)


def test_blocked_attention_batch_chunks_change_nothing():
    """Walking the batch in chunks (CPU cache blocking, lax.map) gives the same outputs and
    gradients as one pass over the whole batch, for a mask per sample and a broadcast mask."""
    from spectrax.nn.attention import blocked_attention
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        q, k, v = _qkv(rng, 4, 5, 40, 2, 4, dtype=jnp.float64)
        for mask in (jnp.asarray(rng.random((4, 1, 1, 40)) > 0.3).at[..., 0].set(True),
                     jnp.asarray(rng.random((1, 1, 5, 40)) > 0.3).at[..., 0].set(True)):
            def loss(chunk):
                return lambda *a: jnp.sum(jnp.cos(blocked_attention(*a, mask,
                                                                    batch_chunk=chunk)))
            whole = jax.value_and_grad(loss(4), (0, 1, 2))(q, k, v)
            for chunk in (1, 2):
                chunked = jax.value_and_grad(loss(chunk), (0, 1, 2))(q, k, v)
                for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole)):
                    np.testing.assert_allclose(a, b, atol=1e-12)


def test_blocked_attention_in_bfloat16_keeps_float32_statistics():
    from spectrax.nn.attention import blocked_attention
    rng = np.random.default_rng(6)
    q, k, v = _qkv(rng, 2, 8, 40, 2, 8, scale=1.0)
    mask = jnp.asarray(rng.random((2, 1, 1, 40)) > 0.2).at[..., 0].set(True)
    out = blocked_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _reference_attend(q, k, v, mask),
                               atol=3e-2)


def test_auto_picks_by_backend_dtype_and_shape():
    from spectrax.nn.attention import MATERIALISE_LIMIT_BYTES, choose_implementation
    f32, bf16 = jnp.float32, jnp.bfloat16
    # CPU: materialised scores (faster in the models' whole steps) until they get too large.
    assert choose_implementation((32, 512, 4, 16), (32, 513, 4, 16), f32, "cpu") == "deferred"
    assert choose_implementation((32, 1, 4, 16), (32, 513, 4, 16), f32, "cpu") == "deferred"
    n_big = int(np.sqrt(MATERIALISE_LIMIT_BYTES / 4 / 32 / 4)) + 1
    assert choose_implementation((32, n_big, 4, 16), (32, n_big, 4, 16), f32, "cpu") == "blocked"
    # GPU: cuDNN for bf16 and head dims it takes, otherwise by the size of the scores.
    assert choose_implementation((8, 197, 12, 64), (8, 197, 12, 64), bf16, "gpu") == "cudnn"
    assert choose_implementation((8, 197, 12, 64), (8, 197, 12, 64), f32, "gpu") == "deferred"
    assert choose_implementation((8, 512, 4, 12), (8, 512, 4, 12), bf16, "gpu") == "deferred"
    n = int(np.sqrt(MATERIALISE_LIMIT_BYTES / 4 / 8)) + 1
    assert choose_implementation((8, n, 1, 64), (8, n, 1, 64), f32, "tpu") == "blocked"


@pytest.mark.parametrize("t,s", [(5, 7), (4, 6), (3, 8), (6, 9)])
def test_cudnn_padding_to_even_lengths_changes_nothing(t, s):
    """cuDNN needs a [B, N|1, T, S] bias and even T, S in training: even_lengths pads (masked
    keys, dropped queries); attention over the padded problem equals the original."""
    from spectrax.nn.attention import even_lengths
    rng = np.random.default_rng(t * s)
    q, k, v = _qkv(rng, 2, t, s, 3, 8)
    mask = jnp.asarray(rng.random((2, 1, 1, s)) > 0.3).at[..., 0].set(True)
    qp, kp, vp, mp = even_lengths(q, k, v, mask)
    assert qp.shape[1] % 2 == 0 and kp.shape[1] % 2 == 0 and mp.shape[2:] == (qp.shape[1],
                                                                                kp.shape[1])
    np.testing.assert_allclose(jax.nn.dot_product_attention(qp, kp, vp, mask=mp)[:, :t],
                               jax.nn.dot_product_attention(q, k, v, mask=mask), atol=1e-6)


def test_fully_masked_keys_give_zeros_and_finite_gradients():
    rng = np.random.default_rng(1)
    mha = MultiHeadAttention(D, H, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(2, 4, D)), jnp.float32)
    key_mask = jnp.array([[True, False, True, False], [False] * 4])
    @nnx.jit
    def output_and_input_gradient(mha, x):
        return mha(x, x, key_mask), jax.grad(lambda x: jnp.sum(mha(x, x, key_mask) ** 2))(x)

    out, grad = output_and_input_gradient(mha, x)
    np.testing.assert_array_equal(out[1], 0.0)
    assert np.all(np.isfinite(out)) and np.any(out[0] != 0)
    assert np.all(np.isfinite(grad))


def test_attention_bf16_compute_keeps_fp32_params():
    mha = MultiHeadAttention(D, H, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 3, D), jnp.float32)
    out = run(mha, x, x, jnp.array([[True, True, False], [False, False, False]]))
    assert out.dtype == jnp.bfloat16
    assert {v.dtype for _, v in nnx.to_flat_state(nnx.state(mha, nnx.Param))} == {
        jnp.dtype(jnp.float32)}
    assert np.all(np.isfinite(np.asarray(out, np.float32)))


def test_attention_dropout_only_when_not_deterministic():
    mha = MultiHeadAttention(D, H, dropout=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 6, D))
    np.testing.assert_array_equal(run(mha, x, x), run(mha, x, x))
    assert not np.allclose(run(mha, x, x, deterministic=False), run(mha, x, x))


# ---------------------------------------------------------------------------------------------
# Transformer layers
# ---------------------------------------------------------------------------------------------

def test_transformer_layer_parameter_counts_match_pytorch():
    enc = nnx.eval_shape(lambda: TransformerEncoderLayer(512, 8, 2048, rngs=nnx.Rngs(0)))
    dec = nnx.eval_shape(lambda: TransformerDecoderLayer(512, 8, 2048, rngs=nnx.Rngs(0)))
    assert param_count(enc) == 3_152_384
    assert param_count(dec) == 4_204_032


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_ignores_masked_keys(norm_first, activation):
    layer = TransformerEncoderLayer(D, H, FFN, dropout=0.1, activation=activation,
                                    norm_first=norm_first, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 6, D))
    key_mask = jnp.array([[True] * 4 + [False] * 2, [True] * 6])
    changed = x.at[0, 4:].set(100.0)          # garbage on the masked tokens of sample 0
    out = run(layer, x, key_mask)
    out_changed = run(layer, changed, key_mask)
    assert out.shape == (2, 6, D)
    np.testing.assert_allclose(out_changed[0, :4], out[0, :4], atol=1e-5)
    np.testing.assert_array_equal(out_changed[1], out[1])


def test_post_ln_layer_output_is_normalised():
    # Post-LN (PyTorch's default) ends with a LayerNorm: each output token has mean 0, std 1 at
    # initialisation (scale 1, bias 0); pre-LN does not.
    x = 3.0 + 5.0 * jax.random.normal(jax.random.key(2), (2, 6, D))
    post = run(TransformerEncoderLayer(D, H, FFN, rngs=nnx.Rngs(0)), x)
    np.testing.assert_allclose(post.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(post.std(-1), 1.0, atol=1e-3)
    pre = run(TransformerEncoderLayer(D, H, FFN, norm_first=True, rngs=nnx.Rngs(0)), x)
    assert np.abs(np.asarray(pre.mean(-1))).max() > 0.5


def test_decoder_layer_shapes_and_memory_mask():
    layer = TransformerDecoderLayer(D, H, FFN, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 3, D))
    memory = jax.random.normal(jax.random.key(4), (2, 5, D))
    memory_mask = jnp.array([[True, True, False, False, False], [True] * 5])
    out = run(layer, x, memory, memory_mask=memory_mask)
    assert out.shape == (2, 3, D)
    out2 = run(layer, x, memory.at[0, 2:].set(-50.0), memory_mask=memory_mask)
    np.testing.assert_allclose(out2[0], out[0], atol=1e-5)


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="activation"):
        TransformerEncoderLayer(8, 2, 16, activation="swish", rngs=nnx.Rngs(0))


def test_model_config_resolves_dtype_and_attention():
    """config.model.dtype 'auto' is float32 on this CPU (bfloat16 on GPU/TPU);
    config.model.attention reaches every attention layer of the model through its size
    dataclass (no process-wide default)."""
    import ml_collections

    from spectrax.models import registry

    assert registry.compute_dtype("auto") == ("float32" if jax.default_backend() == "cpu"
                                              else "bfloat16")
    assert registry.compute_dtype("bfloat16") == "bfloat16"
    cfg = ml_collections.ConfigDict({"name": "spectrafm", "variant": "tiny", "dtype": "auto",
                                     "attention": "xla"})
    model = registry.build_model(cfg, rngs=nnx.Rngs(0))
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, MultiHeadAttention)]
    assert len(layers) == 5 and {m.implementation for m in layers} == {"xla"}
    assert model.cfg.dtype in ("float32", jnp.float32)
    # Building another model does not change the first one's layers.
    cfg.attention = "blocked"
    other = registry.build_model(cfg, rngs=nnx.Rngs(0))
    assert {m.implementation for _, m in nnx.iter_graph(other)
            if isinstance(m, MultiHeadAttention)} == {"blocked"}
    assert {m.implementation for m in layers} == {"xla"}
    cfg.attention = "flash"
    with pytest.raises(ValueError, match="config.model.attention"):
        registry.build_model(cfg, rngs=nnx.Rngs(0))


def test_gelu_matches_the_float64_erf_gelu_and_its_derivative():
    import scipy.special

    from spectrax.nn import gelu

    x = jnp.linspace(-12.0, 12.0, 40_001, dtype=jnp.float32)
    x64 = np.asarray(x, np.float64)
    value = 0.5 * x64 * scipy.special.erfc(-x64 / np.sqrt(2.0))
    slope = (0.5 * scipy.special.erfc(-x64 / np.sqrt(2.0))
             + x64 * np.exp(-0.5 * x64 ** 2) / np.sqrt(2.0 * np.pi))
    np.testing.assert_allclose(np.asarray(gelu(x), np.float64), value, rtol=1e-6, atol=1.2e-6)
    grad = jax.vmap(jax.grad(gelu))(x)
    np.testing.assert_allclose(np.asarray(grad, np.float64), slope, rtol=1e-6, atol=3e-7)
    # The same function as jax's exact GELU (erfc form), gradients included.
    np.testing.assert_allclose(grad, jax.vmap(jax.grad(
        lambda v: jax.nn.gelu(v, approximate=False)))(x), atol=3e-7)
    assert gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("shape,routed", [((32, 1024), True), ((2, 3, 1024), True),
                                          ((2048, 1024), False)])
def test_linear_equals_nnx_linear_in_values_and_gradients(shape, routed):
    """spectrax.nn.Linear: the few-rows input gradient (W·dyᵀ, transposed) is the same sums of
    the same products as nnx.Linear's (to float32 rounding) and float64's; only the operand
    order handed to the matmul differs."""
    from spectrax.nn import Linear
    from spectrax.nn.linear import few_rows
    ours = Linear(1024, 96, rngs=nnx.Rngs(0))
    theirs = nnx.Linear(1024, 96, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), shape)
    rows = int(np.prod(shape[:-1]))
    assert few_rows(rows, (1024, 96)) == routed

    def loss(model, x):
        return jnp.sum(jnp.sin(model(x)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    (g_ours, dx_ours), (g_theirs, dx_theirs) = grad(ours, x), grad(theirs, x)
    np.testing.assert_array_equal(ours(x), theirs(x))
    np.testing.assert_allclose(dx_ours, dx_theirs, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_ours.kernel[...], g_theirs.kernel[...], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_ours.bias[...], g_theirs.bias[...], rtol=1e-6, atol=1e-6)
    # Against float64: the input gradient is dy·Wᵀ with dy = cos(x·W + b).
    w, b = np.asarray(ours.kernel[...], np.float64), np.asarray(ours.bias[...], np.float64)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(dx_ours, np.cos(x64 @ w + b) @ w.T, rtol=1e-4, atol=1e-4)
    # The few-rows form is taken exactly where the rule says (its barrier is in the program).
    hlo = jax.jit(jax.grad(loss, argnums=1)).lower(ours, x).as_text()
    assert ("optimization_barrier" in hlo) == routed
