"""Universal spectral tokenizer: patching, the patch-mask rule, survey-independent wavelength
embeddings, masked attention, the Gaussian loss, the median guard, mixed-length batches, the
adaptation head on frozen tokens, and the paper's parameter count (abstractly)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from spectrax.models import parameter_count
from spectrax.models.registry import build_model
from spectrax.models.tokenizer import (AdaptationHead, AdaptedTokenizer, SpectralTokenizer,
                                       expected_parameter_count, gaussian_nll, normalise,
                                       patch_mask, patchify, pixel_validity,
                                       tokenizer_config, unpatchify)

TINY = tokenizer_config("tiny")
P = TINY.patch_size


@pytest.fixture(scope="module")
def adapted():
    """A tiny tokenizer + a 3-output head; initialised once (eager init is slow on a busy CPU)."""
    return AdaptedTokenizer(TINY, 3, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tiny(adapted):
    return adapted.tokenizer


@nnx.jit
def embed(model, wave):
    """(per-pixel [B, L, D], pooled [B, N, D]) wavelength embeddings."""
    return model.wavelength_embedding(wave), model.embed_wavelength(wave)


@nnx.jit
def forward(model, flux, mask, wave, ivar):
    return model(flux, mask, wave, ivar=ivar, train=False)


@nnx.jit
def encode_normalised(model, flux_n, sigma_n, valid, wave):
    return model.encode_normalised(flux_n, sigma_n, valid, wave, train=False)


@nnx.jit
def decode(model, tokens, token_mask, wave):
    return model.decode(tokens, token_mask, wave, train=False)


def sdss_grid(n):
    """SDSS-like log-linear grid, Å (float32)."""
    return (10.0 ** (3.5523 + 1e-4 * np.arange(n))).astype(np.float32)


def desi_grid(n=7781):
    """DESI-like linear grid, 0.8 Å, Å (float32)."""
    return (3600.0 + 0.8 * np.arange(n)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Patching and the patch mask
# ---------------------------------------------------------------------------------------------

def test_patchify_unpatchify_round_trip():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 100)), jnp.float32)
    patches = patchify(x, 32, -7.0)
    assert patches.shape == (2, 4, 32)
    np.testing.assert_array_equal(patches[:, -1, 4:], -7.0)            # 128 - 100 filled pixels
    np.testing.assert_array_equal(patches[:, 1], x[:, 32:64])
    np.testing.assert_array_equal(unpatchify(patches, 100), x)
    # Trailing feature axes ride along.
    y = jnp.stack([x, -x], axis=-1)
    np.testing.assert_array_equal(unpatchify(patchify(y, 32, 0.0), 100), y)


def test_patch_mask_rule():
    p = 4
    valid = jnp.asarray([[1, 1, 0, 0,   1, 1, 1, 0,   1, 1, 1, 1,   1, 0, 0, 0]], bool)
    # exactly half bad -> bad; one bad of four -> valid; all valid -> valid; 3 bad -> bad.
    np.testing.assert_array_equal(patch_mask(valid, p), [[False, True, True, False]])
    # Padding added past L counts as bad: 10 pixels -> last patch has 2 valid + 2 padding.
    np.testing.assert_array_equal(patch_mask(jnp.ones((1, 10), bool), p), [[True, True, False]])
    np.testing.assert_array_equal(patch_mask(jnp.ones((1, 11), bool), p), [[True, True, True]])
    # Padding pixels in the array (λ = −1) are bad even if their mask says valid.
    wave = jnp.asarray([[5000., 5001., -1., -1., 5004., 5005., 5006., -1.]])
    ok = pixel_validity(jnp.ones((1, 8)), jnp.ones((1, 8)), wave, jnp.ones((1, 8), bool))
    np.testing.assert_array_equal(patch_mask(ok, p), [[False, True]])


# ---------------------------------------------------------------------------------------------
# Wavelength embeddings
# ---------------------------------------------------------------------------------------------

def test_same_wavelength_same_embedding_across_surveys(tiny):
    """An SDSS-like log-linear array and a DESI-like linear array that share the wavelengths of
    one patch at different positions (and batch rows) embed them identically."""
    # SDSS row padded (λ = −1) to the DESI length, as in a mixed batch; one compiled shape.
    sdss = np.concatenate([sdss_grid(4000), np.full(7781 - 4000, -1.0, np.float32)])
    desi = desi_grid()
    desi[480:512] = sdss[96:128]                           # DESI patch 15 = SDSS patch 3
    sdss_batch = np.stack([sdss, sdss])
    desi_batch = np.stack([desi_grid(), desi])            # row 1 carries the shared block
    emb_sdss, pooled_sdss = embed(tiny, jnp.asarray(sdss_batch))
    emb_desi, pooled_desi = embed(tiny, jnp.asarray(desi_batch))
    np.testing.assert_allclose(emb_sdss[0, 96:128], emb_desi[1, 480:512], rtol=0, atol=1e-6)
    np.testing.assert_allclose(pooled_sdss[0, 3], pooled_desi[1, 15], rtol=0, atol=1e-6)
    # ... and the embedding does tell different wavelengths apart.
    assert float(jnp.abs(pooled_sdss[0, 3] - pooled_sdss[0, 4]).max()) > 1e-3
    assert float(jnp.abs(pooled_desi[0, 15] - pooled_desi[1, 15]).max()) > 1e-3


def test_pooled_embedding_excludes_padding(tiny):
    wave = np.full((2, 7781), -1.0, np.float32)
    wave[0, :20] = desi_grid(20)                # patch 0: 20 real wavelengths + 12 padding
    per_pixel, pooled = embed(tiny, jnp.asarray(wave))
    np.testing.assert_allclose(pooled[0, 0], per_pixel[0, :20].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(per_pixel[0, 20:], 0.0)
    np.testing.assert_array_equal(pooled[0, 1:], 0.0)    # padding only


# ---------------------------------------------------------------------------------------------
# Masked attention
# ---------------------------------------------------------------------------------------------

def test_bad_patches_are_ignored_as_keys(tiny):
    rng = np.random.default_rng(1)
    n, length = 6, 6 * P
    wave = jnp.asarray(desi_grid(length)[None])
    flux = rng.normal(1.0, 0.1, (1, length)).astype(np.float32)
    sigma = np.full((1, length), 0.1, np.float32)
    valid = np.ones((1, length), bool)
    valid[0, 2 * P:2 * P + P // 2] = False      # patch 2: exactly half bad -> bad patch
    changed = flux.copy()
    changed[0, 2 * P:3 * P] += 50.0              # its valid AND masked pixels change
    args = lambda f, v: (jnp.asarray(f), jnp.asarray(sigma), jnp.asarray(v), wave)  # noqa: E731
    tokens, token_mask = encode_normalised(tiny, *args(flux, valid))
    tokens2, _ = encode_normalised(tiny, *args(changed, valid))
    np.testing.assert_array_equal(token_mask[0], [True, True, False, True, True, True])
    others = np.array([0, 1, 3, 4, 5])
    np.testing.assert_allclose(tokens[0, others], tokens2[0, others], rtol=0, atol=1e-5)
    assert float(jnp.abs(tokens[0, 2] - tokens2[0, 2]).max()) > 1e-3   # its own output moves
    # The decoder keeps it out too: only the bad patch's own pixels change.
    recon, recon2 = decode(tiny, tokens, token_mask, wave), decode(tiny, tokens2, token_mask, wave)
    keep = np.ones(length, bool)
    keep[2 * P:3 * P] = False
    np.testing.assert_allclose(recon[0, keep], recon2[0, keep], rtol=0, atol=1e-5)
    # Control: the same change to a VALID patch moves the other tokens.
    valid_all = np.ones((1, length), bool)
    t_a, _ = encode_normalised(tiny, *args(flux, valid_all))
    t_b, _ = encode_normalised(tiny, *args(changed, valid_all))
    assert float(jnp.abs(t_a[0, others] - t_b[0, others]).max()) > 1e-3
    assert n == token_mask.shape[1]


def test_fully_masked_spectrum_stays_finite(tiny):
    # Same shapes as the mixed-survey batch, so the compiled forward is reused.
    length = 7781
    wave = jnp.asarray(desi_grid(length)[None].repeat(2, 0))
    flux = jnp.full((2, length), jnp.nan).at[1].set(1.0)
    mask = jnp.zeros((2, length), bool).at[1].set(True)
    ivar = jnp.zeros((2, length)).at[1].set(100.0)
    out = forward(tiny, flux, mask, wave, ivar)
    assert not bool(out.token_mask[0].any()) and bool(out.token_mask[1, :-1].all())
    for x in (out.tokens, out.reconstruction, out.flux, out.sigma, out.scale):
        assert bool(jnp.isfinite(x).all())
    assert np.isfinite(float(out.loss()))

    @nnx.jit
    def loss_and_grads(model, flux, mask, wave, ivar):
        return nnx.value_and_grad(
            lambda m: m(flux, mask, wave, ivar=ivar, train=False).loss())(model)

    # Both rows fully masked: loss 0, gradients finite (zero).
    loss, grads = loss_and_grads(tiny, flux, jnp.zeros_like(mask), wave, ivar)
    assert float(loss) == 0.0
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------------------------------------
# Loss and normalisation
# ---------------------------------------------------------------------------------------------

def test_gaussian_nll_matches_hand_computation():
    pred = jnp.asarray([[1.0, 2.0, 3.0], [0.5, 0.0, 9.0]])
    target = jnp.asarray([[1.5, 2.0, jnp.nan], [0.0, 1.0, 4.0]])
    sigma = jnp.asarray([[0.5, 1.0, 0.0], [2.0, 0.0, 1.0]])
    mask = jnp.asarray([[True, True, False], [True, False, True]])
    chi = [(0.5 / 0.5) ** 2, 0.0, (0.5 / 2.0) ** 2, (5.0 / 1.0) ** 2]
    np.testing.assert_allclose(gaussian_nll(pred, target, sigma, mask), sum(chi) / 4, rtol=1e-6)
    const = sum(2 * np.log(s) + np.log(2 * np.pi) for s in (0.5, 1.0, 2.0, 1.0))
    np.testing.assert_allclose(gaussian_nll(pred, target, sigma, mask, include_constants=True),
                               (sum(chi) + const) / 4, rtol=1e-6)
    # σ = 0 at a pixel the mask calls valid: dropped, not inf.
    np.testing.assert_allclose(gaussian_nll(pred, target, sigma, jnp.ones((2, 3), bool)),
                               sum(chi) / 4, rtol=1e-6)
    # Fully masked: 0, with finite gradients.
    none = jnp.zeros((2, 3), bool)
    assert float(gaussian_nll(pred, target, sigma, none)) == 0.0
    g = jax.grad(gaussian_nll)(pred, target, sigma, none)
    assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) == 0.0


def test_normalise_median_guard_and_nan_under_mask():
    flux = jnp.asarray([[2.0, 4.0, 6.0, jnp.nan],       # median 4 (NaN masked)
                        [-3.0, -1.0, -2.0, 5.0],        # median < 0 -> floor 0.1
                        [0.0, 0.0, 0.0, 0.0],           # median 0 -> floor
                        [jnp.nan, 1.0, 2.0, 3.0]])      # nothing valid -> floor
    sigma = jnp.asarray([[1.0, 1.0, 1.0, jnp.nan]] + [[1.0] * 4] * 3)
    valid = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    flux_n, sigma_n, scale = normalise(flux, sigma, valid, 0.1)
    np.testing.assert_allclose(scale, [4.0, 0.1, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(flux_n[0], [0.5, 1.0, 1.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(sigma_n[0], [0.25, 0.25, 0.25, 0.0], rtol=1e-6)
    np.testing.assert_allclose(flux_n[1, :3], [-30.0, -10.0, -20.0], rtol=1e-5)
    assert bool(jnp.isfinite(flux_n).all()) and bool(jnp.isfinite(sigma_n).all())
    np.testing.assert_array_equal(flux_n[3], 0.0)


# ---------------------------------------------------------------------------------------------
# Forward on a mixed-survey batch
# ---------------------------------------------------------------------------------------------

def mixed_batch():
    """Row 0: 4000-pixel SDSS-like spectrum padded to 7781 (λ −1, ivar 0, NaN flux, mask True as
    in MMU files); row 1: 7781-pixel DESI-like spectrum with a negative median and bad pixels."""
    rng = np.random.default_rng(2)
    length = 7781
    wave = np.stack([np.concatenate([sdss_grid(4000), np.full(length - 4000, -1.0)]),
                     desi_grid(length)]).astype(np.float32)
    flux = np.stack([rng.normal(30.0, 3.0, length),
                     rng.normal(-0.05, 0.3, length)]).astype(np.float32)
    flux[0, 4000:] = np.nan
    ivar = np.stack([np.full(length, 0.1), np.full(length, 10.0)]).astype(np.float32)
    ivar[0, 4000:] = 0.0
    mask = rng.random((2, length)) > 0.05
    mask[0, 4000:] = True
    return tuple(jnp.asarray(x) for x in (flux, mask, wave, ivar))


def test_tiny_forward_on_mixed_lengths(tiny):
    flux, mask, wave, ivar = mixed_batch()
    out = forward(tiny, flux, mask, wave, ivar)
    n = -(-7781 // P)
    assert out.reconstruction.shape == (2, 7781) and out.reconstruction.dtype == jnp.float32
    assert out.tokens.shape == (2, n, TINY.d_model) and out.token_mask.shape == (2, n)
    for x in (out.tokens, out.reconstruction, out.scale, out.loss()):
        assert bool(jnp.isfinite(x).all())
    # SDSS row: patches past pixel 4000 are padding -> bad; the rest valid (5% masked pixels).
    assert not bool(out.token_mask[0, 4000 // P:].any())
    assert int(out.token_mask[0, :4000 // P].sum()) == 4000 // P
    assert bool(out.token_mask[1, :-1].all()) and not bool(out.token_mask[1, -1])  # 5 px of 32
    assert not bool(out.pixel_mask[0, 4000:].any())
    np.testing.assert_allclose(out.scale[1], 0.1)          # negative median -> floor
    assert 25.0 < float(out.scale[0]) < 35.0
    # A requested grid with another number of patches is refused.
    with pytest.raises(ValueError, match="patches"):
        tiny.decode(out.tokens, out.token_mask, wave[:, :7781 - P])


# ---------------------------------------------------------------------------------------------
# Adaptation head on frozen tokens
# ---------------------------------------------------------------------------------------------

def test_adaptation_head_on_frozen_tokens(adapted):
    model = adapted
    assert model.frozen_paths == ("tokenizer",)
    flux, mask, wave, ivar = mixed_batch()
    out = forward(model.tokenizer, flux, mask, wave, ivar)     # compiled already
    tokens, token_mask = out.tokens, out.token_mask
    head = model.head
    assert isinstance(head, AdaptationHead)
    apply_head = nnx.jit(lambda h, t, m: h(t, m))
    logits = apply_head(head, tokens, token_mask)
    assert logits.shape == (2, 3) and bool(jnp.isfinite(logits).all())
    # The output moves with the head's own parameters ...
    graphdef, params, rest = nnx.split(head, nnx.Param, ...)
    bumped = nnx.merge(graphdef, jax.tree.map(lambda p: p + 0.1, params), rest)
    assert float(jnp.abs(apply_head(bumped, tokens, token_mask) - logits).max()) > 1e-4
    # A spectrum without valid tokens still gives a finite output.
    assert bool(jnp.isfinite(apply_head(head, tokens, jnp.zeros_like(token_mask))).all())
    # ... and gradients reach the head only: the tokens are frozen (stop_gradient).
    grads = nnx.jit(lambda m, *a: nnx.grad(lambda m: m(*a[:3], ivar=a[3]).sum())(m))(
        model, flux, mask, wave, ivar)
    tok_g, head_g = jax.tree.leaves(grads["tokenizer"]), jax.tree.leaves(grads["head"])
    assert tok_g and head_g
    assert all(float(jnp.abs(g).max()) == 0.0 for g in tok_g)
    assert all(float(jnp.abs(g).max()) > 0.0 for g in head_g)


# ---------------------------------------------------------------------------------------------
# Sizes and registration (abstract: nothing is allocated)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,count", [("paper", 37_880_352), ("small", 806_048),
                                           ("tiny", 20_352)])
def test_parameter_counts(variant, count):
    cfg = tokenizer_config(variant)
    model = nnx.eval_shape(lambda: SpectralTokenizer(cfg, rngs=nnx.Rngs(0)))
    assert parameter_count(model) == expected_parameter_count(cfg) == count


def test_registry_builds_the_tokenizer():
    m = ml_collections.ConfigDict({"name": "tokenizer", "variant": "tiny", "head": "",
                                   "dtype": "float32", "batch_mixing_attention": False})
    model = nnx.eval_shape(lambda: build_model(m, rngs=nnx.Rngs(0)))
    assert isinstance(model, SpectralTokenizer) and model.cfg == TINY
