"""SpecPT: exact parameter counts (abstractly), stem geometry, forward passes, masking, the
batch-mixing defect flag, and encoder weight transfer from the autoencoder to the redshift model."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectrax.models import (SpecPTAutoencoder, SpecPTEncoder, SpecPTRedshift, parameter_count,
                             specpt_config, stem_lengths, stem_token_geometry)
from spectrax.models import specpt
from spectrax.models.registry import module_counts

L = 7781
# Model initialisation on CPU is dominated by compiling each initialiser once per shape, so the
# tests reuse few shapes: 'small' (paper architecture) and 'tokens' share D=128, FFN=256.
SMALL = specpt_config("small")
# Same shapes, fewer layers: compiles faster, for the redshift-head tests.
SHALLOW = specpt_config("small", num_encoder_layers=1, text_head_blocks=1)


def spectra(batch: int, seed: int = 0, masked_fraction: float = 0.5):
    """flux [B, L] (0 where masked), mask [B, L], wavelength [B, L] on the DESI grid."""
    rng = np.random.default_rng(seed)
    mask = rng.random((batch, L)) >= masked_fraction
    flux = np.where(mask, rng.normal(1.0, 0.2, (batch, L)), 0.0).astype(np.float32)
    wave = np.broadcast_to(3600.0 + 0.8 * np.arange(L, dtype=np.float32), (batch, L))
    return jnp.asarray(flux), jnp.asarray(mask), jnp.asarray(wave)


@nnx.jit(static_argnames="train")
def apply(model, flux, mask, wave, train=False):
    return model(flux, mask, wave, train=train)


@nnx.jit
def encode(encoder, flux, mask, wave):
    return encoder(flux, mask, wave, train=False)


# ---------------------------------------------------------------------------------------------
# Parameter counts (abstract: nothing is allocated)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def paper_autoencoder():
    return nnx.eval_shape(lambda: SpecPTAutoencoder(specpt_config("paper"), rngs=nnx.Rngs(0)))


def test_paper_autoencoder_parameter_count_and_stages(paper_autoencoder):
    model = paper_autoencoder
    assert parameter_count(model) == 1_120_475_621
    stages = module_counts(model, 4)
    assert stages["encoder/stem/blocks/0"] == 2_816       # conv1 + BatchNorm
    assert stages["encoder/stem/blocks/1"] == 172_416     # conv2 + BatchNorm
    assert stages["encoder/stem/blocks/2"] == 361_216     # conv3 + BatchNorm
    tops = module_counts(model, 2)
    assert tops["encoder/proj"] == 63_832_576
    assert tops["encoder/transformer"] == 9_457_152
    assert module_counts(model, 1)["decoder"] == 12_612_096
    assert module_counts(model, 1)["linear1"] == 63_956_736
    assert module_counts(model, 1)["linear2"] == 970_080_613
    # BatchNorm running statistics exist but are not parameters.
    stats = nnx.state(model, nnx.BatchStat)
    assert len(nnx.to_flat_state(stats)) == 6


def test_paper_redshift_parameter_counts():
    cfg = specpt_config("paper")
    text = nnx.eval_shape(lambda: SpecPTRedshift(cfg, "paper_text", rngs=nnx.Rngs(0)))
    count = nnx.eval_shape(lambda: SpecPTRedshift(cfg, "paper_count", rngs=nnx.Rngs(0)))
    unregistered = SpecPTRedshift.UNREGISTERED_PATHS
    assert unregistered == ("encoder/stem",)
    assert parameter_count(text, exclude=unregistered) == 77_103_617
    assert parameter_count(count, exclude=unregistered) == 74_016_257
    text_parts = module_counts(text, 2)
    assert text_parts["head/attention"] == 1_050_624
    assert text_parts["head/mlp_blocks"] == 5 * 526_336
    assert text_parts["head/prediction"] == 131_585
    count_parts = module_counts(count, 3)
    assert count_parts["head/mlp_blocks/0"] == 329_472
    assert count_parts["head/mlp_blocks/1"] == count_parts["head/mlp_blocks/2"] == 198_400
    assert count_parts["head/prediction/output"] == 257
    # The stem is there (and reused), just not counted by the paper.
    assert parameter_count(text) - parameter_count(text, exclude=unregistered) == 536_448
    assert SpecPTRedshift.FROZEN_BY_HEAD == {
        "paper_text": ("encoder/stem",), "paper_count": ("encoder",), "tokens": ()}


def test_parameter_count_exclusion_matches_whole_path_components():
    model = nnx.eval_shape(lambda: SpecPTRedshift(SMALL, "paper_count", rngs=nnx.Rngs(0)))
    total = parameter_count(model)
    assert parameter_count(model, exclude=("enc",)) == total
    assert parameter_count(model, exclude=("encoder",)) == parameter_count(
        nnx.state(model, nnx.Param)["head"])


# ---------------------------------------------------------------------------------------------
# Configuration and stem geometry
# ---------------------------------------------------------------------------------------------

def test_variants_and_unknown_variant():
    assert specpt_config("paper") == specpt.SpecPTConfig()
    assert specpt_config("small").architecture == "paper"
    assert specpt_config("tokens").architecture == "tokens"
    assert specpt_config("tokens_paper").d_model == 512
    assert specpt_config("tiny").architecture == "tokens"
    with pytest.raises(ValueError, match="paper.*small.*tokens"):
        specpt_config("huge")
    with pytest.raises(dataclasses.FrozenInstanceError):
        specpt_config("paper").d_model = 3
    with pytest.raises(ValueError, match="architecture"):
        specpt_config("paper", architecture="vit")


def test_stem_lengths_and_token_geometry():
    cfg = specpt_config("paper")
    assert stem_lengths(cfg, L) == (7781, 3891, 1946, 973, 487)
    assert cfg.num_tokens == 487 and cfg.flat_features == 124_672
    # Token t's receptive field is centred on pixel 16 t; 16 = ceil(7781 / 487).
    assert stem_token_geometry(cfg) == (0.0, 16)
    assert stem_token_geometry(PAPER_GEOMETRY_TOKENS) == (0.0, 16)
    # The CPU 'tokens' variant: stride 4·2·2·2 = 32 pixels per token, 244 tokens.
    assert stem_token_geometry(specpt_config("tokens")) == (0.0, 32)
    assert specpt_config("tokens").num_tokens == 244


# The token architecture with the paper's stem geometry (16-pixel blocks, 487 tokens).
PAPER_GEOMETRY_TOKENS = specpt_config("tokens", conv_kernels=(41, 21, 11), conv_strides=(2, 2, 2),
                                      conv_paddings=(20, 10, 5))


def test_token_mask_and_wavelength_follow_the_pixel_blocks():
    cfg = PAPER_GEOMETRY_TOKENS
    mask = np.ones((1, L), bool)
    mask[0, 160:168] = False           # token 10 = pixels [160, 176): 8 of 16 bad -> bad
    mask[0, 176:183] = False           # token 11: 7 of 16 bad -> valid
    mask[0, 7776:7778] = False         # token 486 = [7776, 7781), 5 real pixels: 2 bad -> valid
    tokens = np.asarray(specpt.token_mask(cfg, jnp.asarray(mask)))
    assert tokens.shape == (1, 487)
    assert not tokens[0, 10] and tokens[0, 11] and tokens[0, 486]
    assert tokens.sum() == 486
    mask[0, 7778] = False              # 3 of 5 bad -> bad
    assert not np.asarray(specpt.token_mask(cfg, jnp.asarray(mask)))[0, 486]

    wave = np.broadcast_to(3600.0 + 0.8 * np.arange(L, dtype=np.float32), (1, L)).copy()
    wave[0, 7000:] = -1.0              # padding from pixel 7000 on
    centre = np.asarray(specpt.token_wavelength(cfg, jnp.asarray(wave)))[0]
    np.testing.assert_allclose(centre[20], wave[0, 320:336].mean(), rtol=1e-6)
    np.testing.assert_allclose(centre[437], wave[0, 6992:7000].mean(), rtol=1e-6)
    assert (centre[438:] == -1).all()


def test_token_blocks_round_trip_and_other_lengths():
    cfg = PAPER_GEOMETRY_TOKENS
    x = jnp.arange(2 * L, dtype=jnp.float32).reshape(2, L)
    blocks = specpt.token_blocks(cfg, x, 0.0)
    assert blocks.shape == (2, 487, 16)
    np.testing.assert_array_equal(specpt.untoken_blocks(blocks, L), x)
    # The token architecture takes any length (here an SDSS-like 4000 pixels; checked abstractly).
    model = nnx.eval_shape(lambda: SpecPTAutoencoder(cfg, rngs=nnx.Rngs(0)))
    batch = [a[:, :4000] for a in spectra(1)]
    assert nnx.eval_shape(lambda m, *b: m(*b, train=False), model, *batch).shape == (1, 4000)


# ---------------------------------------------------------------------------------------------
# Forward passes (models are built once per module: initialisation dominates the run time)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokens_autoencoder():
    return SpecPTAutoencoder(specpt_config("tokens"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def small_autoencoder():
    return SpecPTAutoencoder(SMALL, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def shallow_text_redshift():
    return SpecPTRedshift(SHALLOW, "paper_text", rngs=nnx.Rngs(0))


def test_small_autoencoder_forward_with_half_the_pixels_masked(small_autoencoder):
    model = small_autoencoder
    flux, mask, wave = spectra(2)
    stem = nnx.eval_shape(lambda e, f, m: e.stem_features(f, m, train=False), model.encoder,
                          flux, mask)
    assert stem.shape == (2, 487, 16)
    out = apply(model, flux, mask, wave)
    assert out.shape == (2, L) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))


def test_tokens_autoencoder_forward_ignores_masked_pixel_values(tokens_autoencoder):
    model = tokens_autoencoder
    flux, mask, wave = spectra(2)
    out = apply(model, flux, mask, wave)
    assert out.shape == (2, L) and np.all(np.isfinite(out))
    # Whatever a masked pixel holds, even NaN, cannot change the result.
    poisoned = jnp.where(mask, flux, jnp.nan)
    np.testing.assert_array_equal(apply(model, poisoned, mask, wave), out)


def test_stem_gradients_under_jit(tokens_autoencoder):
    # The stem's max-pool must stay differentiable when traced (a training step); the attention
    # gradients with masked keys are checked in test_nn.
    flux = spectra(2)[0]

    @nnx.jit
    def loss_and_grad(stem):
        return nnx.value_and_grad(lambda s: jnp.mean(s(flux, train=False) ** 2))(stem)

    loss, grads = loss_and_grad(tokens_autoencoder.encoder.stem)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert np.isfinite(loss) and leaves
    assert all(np.all(np.isfinite(g)) for g in leaves) and any(np.any(g != 0) for g in leaves)


def test_paper_architecture_rejects_other_lengths():
    model = nnx.eval_shape(lambda: SpecPTEncoder(SMALL, rngs=nnx.Rngs(0)))
    flux, mask, wave = (x[:, :7000] for x in spectra(1))
    with pytest.raises(ValueError, match="7781 pixels"):
        model(flux, mask, wave, train=False)


def test_bf16_compute_keeps_fp32_parameters():
    # Checked abstractly (tracing, no compilation); numerics of bf16 attention are in test_nn.
    model = nnx.eval_shape(lambda: SpecPTAutoencoder(specpt_config("tokens", dtype="bfloat16"),
                                                     rngs=nnx.Rngs(0)))
    dtypes = {v.dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    hidden = nnx.eval_shape(lambda m, *batch: m.encoder(*batch, train=False), model, *spectra(1))
    assert hidden.dtype == jnp.bfloat16
    out = nnx.eval_shape(lambda m, *batch: m(*batch, train=True), model, *spectra(1))
    assert out.shape == (1, L) and out.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Redshift models
# ---------------------------------------------------------------------------------------------

def batch_stats(module):
    return [np.array(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(module, nnx.BatchStat))]


@pytest.mark.parametrize("head", ["paper_text", "paper_count"])
def test_paper_redshift_heads_train_with_frozen_parts_fixed(head, shallow_text_redshift):
    model = nnx.clone(shallow_text_redshift if head == "paper_text"
                      else SpecPTRedshift(SHALLOW, head, rngs=nnx.Rngs(0)))
    stem_stats, head_stats = batch_stats(model.encoder.stem), batch_stats(model.head)
    z = apply(model, *spectra(3), train=True)
    assert z.shape == (3,) and z.dtype == jnp.float32
    assert np.all(np.isfinite(z)) and np.all(z > 0)
    # Both heads freeze the stem (FROZEN_BY_HEAD): it runs in inference mode, so its BatchNorm
    # statistics stay as loaded, while the paper_count head's own BatchNorms do update.
    for after, before in zip(batch_stats(model.encoder.stem), stem_stats):
        np.testing.assert_array_equal(after, before)
    if head == "paper_count":
        assert all(not np.array_equal(after, before)
                   for after, before in zip(batch_stats(model.head), head_stats))


def test_tokens_redshift_head_and_fully_masked_spectrum():
    model = SpecPTRedshift(specpt_config("tokens"), rngs=nnx.Rngs(0))
    assert model.head_name == "tokens"
    flux, mask, wave = spectra(2)
    mask = mask.at[1].set(False)                    # a spectrum with no valid pixel at all
    flux = jnp.where(mask, flux, 0.0)
    z = apply(model, flux, mask, wave)
    assert z.shape == (2,) and np.all(np.isfinite(z)) and np.all(z > 0)


def test_batch_mixing_attention_flag(shallow_text_redshift):
    flux, mask, wave = spectra(3, seed=1)
    other = spectra(3, seed=2)
    # Keep sample 0, replace its batch-mates.
    mixed_in = [jnp.concatenate([a[:1], b[1:]]) for a, b in zip((flux, mask, wave), other)]
    for mixing in (False, True):
        model = (SpecPTRedshift(SHALLOW, "paper_text", batch_mixing_attention=True,
                                rngs=nnx.Rngs(0)) if mixing else shallow_text_redshift)
        z = apply(model, flux, mask, wave)
        z_new_mates = apply(model, *mixed_in)
        if mixing:   # the reference defect: a prediction depends on its batch-mates
            assert abs(float(z[0]) - float(z_new_mates[0])) > 1e-6
        else:
            np.testing.assert_allclose(z_new_mates[0], z[0], rtol=1e-6)


def test_head_and_architecture_must_agree():
    with pytest.raises(ValueError, match="needs the 'tokens' architecture"):
        SpecPTRedshift(SMALL, "tokens", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown SpecPT redshift head"):
        SpecPTRedshift(SMALL, "mdn", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="batch_mixing_attention"):
        SpecPTRedshift(SMALL, "paper_count", batch_mixing_attention=True, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("variant", ["small", "tokens"])
def test_autoencoder_encoder_transfers_to_redshift_model(variant, small_autoencoder,
                                                         tokens_autoencoder):
    autoencoder = tokens_autoencoder if variant == "tokens" else small_autoencoder
    redshift = SpecPTRedshift(autoencoder.cfg, rngs=nnx.Rngs(42))
    flux, mask, wave = spectra(2)
    reference = encode(autoencoder.encoder, flux, mask, wave)
    assert not np.allclose(encode(redshift.encoder, flux, mask, wave), reference)
    # Copy by path: every parameter and BatchNorm statistic of the encoder.
    weights = nnx.state(autoencoder.encoder, nnx.Any(nnx.Param, nnx.BatchStat))
    nnx.update(redshift.encoder, weights)
    np.testing.assert_array_equal(encode(redshift.encoder, flux, mask, wave), reference)


def test_masked_autoencoding_hides_blocks_only_in_training(tokens_autoencoder):
    model = tokens_autoencoder
    flux = jnp.ones((4, L), jnp.float32)
    mask = jnp.ones((4, L), bool)
    hidden_flux, hidden_mask = model.hide_blocks(flux, mask, train=True)
    hidden_mask = np.asarray(hidden_mask)
    blocks = hidden_mask[:, : 243 * 32].reshape(4, 243, 32)
    # whole 32-pixel blocks are hidden, never parts of one
    assert np.all(blocks.all(-1) | ~blocks.any(-1))
    frac = 1 - blocks.all(-1).mean()
    assert 0.2 < frac < 0.4, frac                  # mask_ratio 0.3
    assert np.all(np.asarray(hidden_flux)[~hidden_mask] == 0)
    same_flux, same_mask = model.hide_blocks(flux, mask, train=False)
    assert same_flux is flux and same_mask is mask
