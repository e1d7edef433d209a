"""SpectraFM: exact parameter counts (abstractly), the wavelength encoding, the padding embedding,
attention with an extra key/value against a float64 reference, the loss, the samplers, chunked
inference, standardisation and input errors."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from spectrax.models import parameter_count, parameter_table
from spectrax.models import spectrafm as S
from spectrax.models.registry import build_model

TINY = S.spectrafm_config("tiny")
LABELS = TINY.label_token_ids


def abstract(variant):
    return nnx.eval_shape(lambda: S.SpectraFM(S.spectrafm_config(variant), rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def tiny():
    """The tiny model with weights drawn by numpy: initialising eagerly compiles every
    initialiser shape, which costs seconds on a shared 2-core CPU. Row 0 of the embedding tables
    is NOT zero here, which also checks that padding is masked at lookup."""
    graphdef, state = nnx.split(abstract("tiny"))
    rng = np.random.default_rng(0)

    def fill(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # dropout rng streams
            return jax.random.split(jax.random.key(0), leaf.shape)
        if jnp.issubdtype(leaf.dtype, jnp.integer):  # their counters
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.3, leaf.shape), leaf.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


# Every model test uses [B, N] = [2, 16] so this function compiles once for the whole module.
@nnx.jit
def _forward(model, values, wavelength, token_ids, request_ids):
    return model(values, wavelength, token_ids, request_ids, return_attention=True)


def apply(model, values, wavelength, token_ids, request_ids):
    """(prediction [B], log_variance [B]) of the jitted, deterministic forward pass."""
    return forward(model, values, wavelength, token_ids, request_ids)[:2]


def forward(model, values, wavelength, token_ids, request_ids):
    """(prediction, log_variance, attention) as numpy."""
    out = _forward(model, values, wavelength, token_ids, request_ids)
    return tuple(np.asarray(o) for o in out)


B, N = 2, 16


def tokens(batch, n, seed=0, n_valid=None):
    """Standardised values, APOGEE-range wavelengths and pixel token ids, [B, N] each."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(batch, n)).astype(np.float32)
    wave = rng.uniform(15152.0, 16944.0, (batch, n)).astype(np.float32)
    ids = np.full((batch, n), TINY.pixel_token_id, np.int32)
    if n_valid is not None:
        ids[:, n_valid:] = 0
        wave[:, n_valid:] = 0.0
    return values, wave, ids


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------

def test_paper_parameter_counts():
    model = abstract("paper")
    assert parameter_count(model) == 11_870_722
    assert parameter_count(model, exclude=("embedding",)) == 8_020_482
    parts = dict(parameter_table(model, depth=2))
    D = 256
    attention = 4 * D * D + 4 * D + 2 * D
    block = lambda f: attention + 2 * D * f + f + D + 4 * D  # noqa: E731
    assert parts["embedding/weight"] == parts["embedding/bias"] == 7520 * 256
    assert parts["encoder/0"] == block(2048) == 1_315_584
    assert parts["encoder/1"] == block(1024) == 790_272
    assert parts["decoder/blocks"] == block(2048) + block(1024) + block(512) == 2_633_472
    assert parts["decoder/mlp"] == 3_280_640
    assert parts["decoder/pred_head"] == parts["decoder/logvar_head"] == 257
    att = dict(parameter_table(model, depth=3))["encoder/0/attention"]
    assert att == attention == 263_680


def test_registry_builds_every_variant():
    m = ml_collections.ConfigDict(dict(name="spectrafm", variant="paper", dtype="float32",
                                       head="", batch_mixing_attention=False))
    model = nnx.eval_shape(lambda: build_model(m, rngs=nnx.Rngs(0)))
    assert isinstance(model, S.SpectraFM) and parameter_count(model) == 11_870_722
    for variant in ("small", "tiny"):
        cfg = S.spectrafm_config(variant)
        assert cfg.num_token_ids == 7 and sorted(cfg.label_token_ids.values()) == [2, 3, 4, 5, 6]
        assert parameter_count(abstract(variant)) < 300_000
    assert S.LABEL_TOKEN_IDS == {"TEFF": 7515, "LOGG": 7516, "O_FE": 7517, "MG_FE": 7518,
                                 "FE_H": 7519}
    with pytest.raises(ValueError, match="unknown SpectraFM variant"):
        S.spectrafm_config("huge")


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------

def reference_pe(lam, d=256):
    """float64 numpy version of the reference's positional_encoding_spectral."""
    lam = np.asarray(lam, np.float64)
    norm = (lam - 15000.0) / 2000.0
    div = np.exp(np.arange(0, d, 2) * -(np.log(10000.0) / d))
    pe = np.zeros(lam.shape + (d,))
    pe[..., 0::2] = np.sin(1000.0 * norm[..., None] * div)
    pe[..., 1::2] = np.cos(1000.0 * norm[..., None] * div)
    return np.where((lam == 0)[..., None], 0.0, pe)


def test_wavelength_encoding_matches_float64_reference():
    lam = np.array([[15000.0, 15152.3, 16000.0, 16943.7, 17000.0, 0.0]], np.float32)
    got = np.asarray(S.wavelength_encoding(lam, S.spectrafm_config("paper")))
    want = reference_pe(lam.astype(np.float64))
    assert got.shape == (1, 6, 256)
    # Angles reach 1000 rad: float32 rounding of the angle gives ~1e-4 absolute.
    np.testing.assert_allclose(got, want, atol=5e-4)
    np.testing.assert_array_equal(got[0, 5], 0.0)
    # interleaved: even dims sin, odd dims cos; λ = λ_min gives (0, 1, 0, 1, ...)
    np.testing.assert_allclose(got[0, 0, 0::2], 0.0, atol=1e-7)
    np.testing.assert_allclose(got[0, 0, 1::2], 1.0, atol=1e-7)
    # spectrax padding (−1) and NaN wavelengths carry no position either
    none = np.asarray(S.wavelength_encoding(np.array([-1.0, np.nan], np.float32), TINY))
    np.testing.assert_array_equal(none, 0.0)


def test_padding_row_contributes_zero(tiny):
    emb = S.TokenEmbedding(TINY, rngs=nnx.Rngs(1))
    # Even if an optimiser moved row 0, padding must stay exactly zero.
    emb.weight[...] = emb.weight[...].at[0].set(3.0)
    emb.bias[...] = emb.bias[...].at[0].set(-2.0)
    out = emb(jnp.array([[5.0, 1.0]]), jnp.array([[0.0, 16000.0]]), jnp.array([[0, 1]]))
    np.testing.assert_array_equal(np.asarray(out[0, 0]), 0.0)
    assert np.abs(np.asarray(out[0, 1])).sum() > 0
    np.testing.assert_array_equal(np.asarray(emb.request(jnp.array([0]))), 0.0)
    # In the model: padding tokens, wherever they sit and whatever their values, change nothing
    # (the model has no positions besides wavelength, so moving tokens must not matter either).
    values, wave, ids = tokens(B, N, n_valid=10)
    values[:, 10:] = 7.0
    req = np.array([LABELS["TEFF"], LABELS["FE_H"]], np.int32)
    order = np.random.default_rng(5).permutation(N)
    moved = values[:, order], wave[:, order], ids[:, order]
    moved[0][moved[2] == 0] = -3.0
    np.testing.assert_allclose(apply(tiny, values, wave, ids, req), apply(tiny, *moved, req),
                               atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Attention with an extra key/value
# ---------------------------------------------------------------------------------------------

def reference_attention(att, q_in, kv_in, key_mask):
    """float64 numpy multi-head attention with PyTorch's add_bias_kv semantics."""
    p = lambda lin, x: x @ np.asarray(lin.kernel[...], np.float64) + np.asarray(  # noqa: E731
        lin.bias[...], np.float64)
    B, Lq, D = q_in.shape
    H, Dh = att.num_heads, att.head_dim
    q = p(att.q_proj, q_in).reshape(B, Lq, H, Dh)
    k = np.concatenate([p(att.k_proj, kv_in),
                        np.broadcast_to(np.asarray(att.bias_k[...], np.float64), (B, 1, D))], 1)
    v = np.concatenate([p(att.v_proj, kv_in),
                        np.broadcast_to(np.asarray(att.bias_v[...], np.float64), (B, 1, D))], 1)
    k, v = k.reshape(B, -1, H, Dh), v.reshape(B, -1, H, Dh)
    mask = np.concatenate([key_mask, np.ones((B, 1), bool)], 1)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(Dh)
    logits = np.where(mask[:, None, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(B, Lq, D)
    return p(att.out_proj, out), w.mean(1)[..., :-1]


def test_attention_with_extra_kv_matches_float64_reference():
    att = S.AttentionWithExtraKV(16, 4, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    q_in = rng.normal(size=(3, 2, 16))
    kv_in = rng.normal(size=(3, 5, 16))
    key_mask = np.array([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], bool)
    want, want_w = reference_attention(att, q_in, kv_in, key_mask)
    q32, kv32 = jnp.asarray(q_in, jnp.float32), jnp.asarray(kv_in, jnp.float32)
    fused = att(q32, kv32, key_mask)
    explicit, weights = att(q32, kv32, key_mask, return_weights=True)
    np.testing.assert_allclose(np.asarray(fused), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(explicit), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(weights), want_w, atol=1e-5, rtol=1e-5)
    # fully masked sample: finite, and it attends only to the extra value
    assert np.isfinite(np.asarray(fused)).all()
    np.testing.assert_array_equal(np.asarray(weights[2]), 0.0)


def test_fully_masked_sequence_is_finite(tiny):
    values, wave, ids = tokens(B, N)
    ids[0] = 0
    values[1] = np.nan  # NaN values are masked too
    req = np.array([LABELS["LOGG"], LABELS["TEFF"]], np.int32)
    pred, logvar, att = forward(tiny, values, wave, ids, req)
    assert np.isfinite(pred).all() and np.isfinite(logvar).all()
    np.testing.assert_array_equal(att, 0.0)  # all weight on the extra key
    # the gradient through a fully masked attention row is finite too (no 0/0 in the softmax)
    att_layer = S.AttentionWithExtraKV(8, 2, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 3, 8))
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, x, jnp.zeros((1, 3), bool)))))(att_layer)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------------------------------------
# Forward pass and input errors
# ---------------------------------------------------------------------------------------------

def test_forward_pass_finite_with_attention(tiny):
    values, wave, ids = tokens(B, N, n_valid=12)
    ids[0, 0] = LABELS["TEFF"]  # a known label as an input token (no wavelength)
    wave[0, 0] = 0.0
    req = np.array([LABELS["FE_H"], LABELS["MG_FE"]], np.int32)
    pred, logvar, att = forward(tiny, values, wave, ids, req)
    assert pred.shape == logvar.shape == (B,) and pred.dtype == np.float32
    assert np.isfinite(pred).all() and np.isfinite(logvar).all()
    assert att.shape == (B, N)
    np.testing.assert_array_equal(att[:, 12:], 0.0)
    assert (att[:, :12].sum(1) <= 1 + 1e-6).all() and (att[:, :12] > 0).all()
    amap = S.attention_map(att, ids != 0, np.broadcast_to(np.arange(N), (B, N)), N)
    np.testing.assert_allclose(amap[:12].sum(), 1.0, atol=1e-6)


def test_dropout_everywhere_at_the_configured_rate():
    model = abstract("paper")
    rates = [m.rate for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Dropout)]
    # per block: attention, two residual branches (5 blocks); one shared in the decoder MLP
    assert len(rates) == 5 * 3 + 1 and set(rates) == {0.05}


def test_unknown_label_raises_clear_error(tiny):
    values, wave, ids = tokens(B, N)
    with pytest.raises(ValueError, match="not label token ids"):
        tiny(values, wave, ids, np.array([LABELS["TEFF"], 99], np.int32))
    with pytest.raises(ValueError, match="not label token ids"):  # the pixel id is no label
        tiny(values, wave, ids, np.array([TINY.pixel_token_id] * 2, np.int32))
    with pytest.raises(ValueError, match="token_ids must lie"):
        tiny(values, wave, ids + 10, np.array([LABELS["TEFF"]] * 2, np.int32))
    # under jit nothing can raise: the unknown request gives NaN, the known one a number
    pred, _ = apply(tiny, values, wave, ids, np.array([LABELS["TEFF"], 99], np.int32))
    assert np.isfinite(pred[0]) and np.isnan(pred[1])


def test_out_of_range_wavelength_raises(tiny):
    values, wave, ids = tokens(1, 4)
    wave[0, 2] = 5000.0
    with pytest.raises(ValueError, match="outside SpectraFM's encoding range"):
        tiny(values, wave, ids, np.array([LABELS["TEFF"]], np.int32))
    with pytest.raises(ValueError, match="outside"):
        S.check_wavelength_range(wave, TINY)
    ids[0, 2] = 0  # the same pixel as padding is fine
    S.check_wavelength_range(np.where(ids != 0, wave, 0.0), TINY)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------

def test_loss_matches_hand_computation():
    pred = np.array([0.5, -1.0, 2.0], np.float32)
    logvar = np.array([0.0, np.log(0.25), 1.0], np.float32)
    y = np.array([1.0, -1.0, np.nan], np.float32)
    sigma = np.array([0.0, 0.5, 0.1], np.float32)
    valid = np.array([True, True, False])
    # row 0: var 1, (0.5)^2 / var + ln var; row 1: var 0.25 + 0.5^2 = 0.5, residual 0
    v0, v1 = 1.0 + 1e-8, 0.5 + 1e-8
    want = 0.5 * ((0.25 / v0 + np.log(v0)) + (0.0 + np.log(v1))) / 2
    got = S.spectrafm_loss(pred, logvar, y, sigma, valid)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    # the NaN target of the invalid row leaks into neither loss nor gradient
    g = jax.grad(lambda p: S.spectrafm_loss(p, logvar, y, sigma, valid))(jnp.asarray(pred))
    assert np.isfinite(np.asarray(g)).all() and float(g[2]) == 0.0
    assert float(S.spectrafm_loss(pred, logvar, y, sigma, np.zeros(3, bool))) == 0.0
    # bf16 inputs are computed in fp32
    bf = S.spectrafm_loss(jnp.asarray(pred, jnp.bfloat16), logvar, y, sigma, valid)
    assert bf.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------

def test_sample_request_never_picks_unknown_label():
    rng = np.random.default_rng(0)
    label_mask = rng.random((64, 5)) < 0.4
    label_mask[0] = False            # a star without any label
    label_mask[1] = [0, 0, 1, 0, 0]  # exactly one label
    label_mask[2] = True
    draw = jax.jit(jax.vmap(S.sample_request, in_axes=(0, None)))
    index, valid = draw(jax.random.split(jax.random.key(0), 300), label_mask)
    index, valid = np.asarray(index), np.asarray(valid)
    has_any = label_mask.any(1)
    np.testing.assert_array_equal(valid, np.broadcast_to(has_any, valid.shape))
    picked = label_mask[np.arange(64)[None, :], index]
    assert picked[:, has_any].all()  # never a NaN label for a star that has any
    assert not valid[:, 0].any() and (index[:, 1] == 2).all()
    # uniform among the known labels: star 2 knows all five, each ~1/5 of 300 draws
    counts = np.bincount(index[:, 2], minlength=5)
    assert counts.min() > 35 and counts.max() < 85


def test_sample_pixels_only_valid():
    rng = np.random.default_rng(1)
    valid = rng.random((6, 40)) < 0.5
    valid[0] = False
    valid[1] = True
    idx, mask = S.sample_pixels(jax.random.key(1), valid, n=16)
    idx, mask = np.asarray(idx), np.asarray(mask)
    assert idx.shape == mask.shape == (6, 16) and idx.dtype == np.int32
    for b in range(6):
        chosen = idx[b][mask[b]]
        assert valid[b, chosen].all()
        assert len(set(chosen.tolist())) == len(chosen) == min(16, valid[b].sum())
    # fewer pixels than n: all valid ones, the rest masked
    idx, mask = S.sample_pixels(jax.random.key(2), valid[:, :8], n=16)
    idx, mask = np.asarray(idx), np.asarray(mask)
    np.testing.assert_array_equal(mask.sum(1), valid[:, :8].sum(1))
    assert valid[:, :8][np.arange(6)[:, None], idx][mask].all()


# ---------------------------------------------------------------------------------------------
# Chunked inference
# ---------------------------------------------------------------------------------------------

def test_chunked_predict_is_mean_over_fixed_chunks(tiny):
    n, chunk = 37, N  # 3 chunks, the last padded with 11 tokens
    values, wave, _ = tokens(B, n, seed=3)
    layout = S.chunk_layout(n, chunk, seed=0)
    order = layout.order
    ok = np.ones((B, n), bool)
    ok[1, :] = False
    ok[1, order[:chunk]] = True  # star 1: only its first chunk has usable pixels
    req = [LABELS["TEFF"], LABELS["LOGG"]]

    np.testing.assert_array_equal(order, np.random.RandomState(0).permutation(n))
    assert not np.array_equal(order, S.chunk_permutation(n, seed=1))
    assert layout.n_chunks == 3 and (layout.positions()[2, n - 2 * chunk:] == -1).all()

    pred, sigma = jax.jit(lambda v, w, o: S.chunked_predict(tiny, v, w, o, req, layout))(
        values, wave, ok)
    pred, sigma = np.asarray(pred), np.asarray(sigma)
    # by hand: each chunk is the model on exactly its permuted pixels; star 0 averages three
    for k, r in enumerate(req):
        per_chunk = []
        for c in range(3):
            sel = order[c * chunk:(c + 1) * chunk]
            ids = np.where(ok[:, sel], TINY.pixel_token_id, 0).astype(np.int32)
            p, lv = apply(tiny, np.pad(values[:, sel], ((0, 0), (0, chunk - sel.size))),
                          np.pad(np.where(ok[:, sel], wave[:, sel], 0), ((0, 0),
                                                                          (0, chunk - sel.size))),
                          np.pad(ids, ((0, 0), (0, chunk - sel.size))), np.full(B, r, np.int32))
            per_chunk.append((p, np.exp(0.5 * lv)))
        np.testing.assert_allclose(pred[0, k], np.mean([p[0] for p, _ in per_chunk]), atol=1e-5)
        np.testing.assert_allclose(sigma[0, k], np.mean([s_[0] for _, s_ in per_chunk]),
                                   rtol=1e-5)
        np.testing.assert_allclose(pred[1, k], per_chunk[0][0][1], atol=1e-5)  # first chunk only
    none = jax.jit(lambda v, w, o: S.chunked_predict(tiny, v, w, o, req, layout))(
        values, wave, np.zeros_like(ok))
    assert np.isnan(np.asarray(none[0])).all()


# ---------------------------------------------------------------------------------------------
# Standardisation
# ---------------------------------------------------------------------------------------------

def test_standardizer():
    x = np.array([[1.0, 10.0], [2.0, 10.0], [3.0, np.nan], [4.0, 10.0], [100.0, 12.0]])
    median, mad_std = S.fit_standardizer(x)
    np.testing.assert_allclose(median, [3.0, 10.0])
    np.testing.assert_allclose(mad_std, [1.4826 * 1.0, 0.0])
    z = S.standardize(x, (median, mad_std))
    np.testing.assert_allclose(z[:4, 0], (x[:4, 0] - 3.0) / 1.4826, rtol=1e-6)
    assert np.isnan(z[4, 0])          # |z| = 65 > 10
    assert np.isnan(z[:, 1]).all()    # constant column: mad 0, never a finite z
    zj = S.standardize(jnp.asarray(x, jnp.float32), (median, mad_std))
    np.testing.assert_allclose(np.asarray(zj), z, rtol=1e-6)
