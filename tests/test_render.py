"""On-device spectrum images (spectrax.render) against numpy/matplotlib references.

Block maps must equal a numpy reimplementation of the reference (plus matplotlib's viridis)
exactly; line plots are compared with matplotlib's own Agg rendering by the IoU of the drawn
pixels. Compiles are the expensive part here, so the tests share two input shapes
(4 × 7781 DESI-like spectra, 4 × 4600 SDSS-length spectra) and a few configs.
"""
from __future__ import annotations

import functools
import io
import types

import jax
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spectrax import render  # noqa: E402
from spectrax.data import grids, synthetic  # noqa: E402

NB, BS, SIZE = 74, 3, 224
CAP = NB * NB
VIRIDIS = matplotlib.colormaps["viridis"]

# Line plots: a pixel counts as drawn when the stroke covers ≥ 25 % of it. Agg computes the
# exact area of the stroked (and path-simplified) polygon; spectrax estimates each pixel's area
# analytically per segment. Both agree on the bulk of the line; they differ only on pixels whose
# coverage is near the threshold along the stroke's edges (a ~0.7 px line has an edge pixel on
# each side of every column) and at sharp joins. Measured IoU here is 0.98–0.995 (also ≥ 0.97
# on sparse 300-pixel spectra); 0.9 leaves room for those edge flips. The noiseless spectra
# make the test discriminating: there a 1 px horizontal shift gives IoU ≈ 0.3, a 1 px vertical
# shift ≈ 0.7 and a doubled line width ≈ 0.65 (noisy spectra fill whole columns and hide them).
IOU_MIN = 0.9
DRAWN = 0.25


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def desi():
    """4 simulated DESI BGS spectra on the 7781-pixel grid (longer than the 5476 cells): two
    noisy, two noiseless (smooth continuum + lines, where a thin line's pixels are few)."""
    noisy = synthetic.simulate_desi_galaxies(2, "bgs", 0)
    clean = synthetic.simulate_desi_galaxies(2, "bgs", 1, noiseless=True)
    flux = np.concatenate([noisy["flux"], clean["flux"]]).astype(np.float32)
    mask = np.concatenate([noisy["mask"], clean["mask"]])
    wave = np.broadcast_to(grids.desi_wavelength(), flux.shape).astype(np.float32)
    return flux, mask, wave


@pytest.fixture(scope="module")
def short():
    """4 spectra of 4600 pixels (SDSS-like length) on a log-linear grid, with flux spanning the
    paper's vmin/vmax and beyond (so under/over colours are exercised), all valid."""
    rng = np.random.default_rng(7)
    wave = (10 ** (3.5486 + 1e-4 * np.arange(4600))).astype(np.float32)
    flux = (40 + 35 * np.sin(np.arange(4600) / 97.0)[None] * rng.uniform(0.5, 2, (4, 1))
            + rng.normal(0, 12, (4, 4600))).astype(np.float32)
    flux[0, :10] = [-1.13, 144.97, 0.0, -50, 500, 71.92, 72.5, 1e-3, -1.12, 144.96]
    return flux, np.ones_like(flux, bool), np.broadcast_to(wave, flux.shape).copy()


# --------------------------------------------------------------------------------------------
# References (numpy / matplotlib)
# --------------------------------------------------------------------------------------------
def blocks(values, fill="standard", empty=0.0):
    """The reference's block fill: value i → 3 × 3 block (i // 74, i % 74), odd rows reversed
    for boustrophedon; values beyond 5476 dropped; everything else ``empty``."""
    img = np.full((SIZE, SIZE), empty, np.float32)
    for i, v in enumerate(values[:CAP]):
        r, c = divmod(i, NB)
        if fill == "boustrophedon" and r % 2:
            c = NB - 1 - c
        img[r * BS:(r + 1) * BS, c * BS:(c + 1) * BS] = v
    return img


def ref_map2d(flux_row, fill="standard", vmin=render.PAPER_VMIN, vmax=render.PAPER_VMAX,
              quantize=True):
    img = blocks(np.asarray(flux_row, np.float32), fill)
    t = (img - np.float32(vmin)) / np.float32(vmax - vmin)
    if quantize:
        return (VIRIDIS(t, bytes=True)[..., :3] / np.float32(255)).astype(np.float32)
    return VIRIDIS(t)[..., :3].astype(np.float32)


def ref_normal(flux_row, dev=False, fill="standard"):
    f = np.asarray(flux_row, np.float32)
    chans = [f]
    if dev:
        d1 = np.gradient(f)
        chans += [d1, np.gradient(d1)]
    out = np.zeros((SIZE, SIZE, 3), np.float32)
    for k, ch in enumerate(chans):
        norm = 255 * (ch - np.min(ch)) / (np.max(ch) - np.min(ch))
        ints = np.array([int(v) for v in norm[:CAP]], np.float32)
        out[..., k] = blocks(ints, fill) / np.float32(255)
    return out


def mpl_line(wave, flux, color="#1f77b4", **kw):
    """RGB uint8 of matplotlib's Agg plot, as the reference draws it (axes filling the 224 px
    figure, no axis, autoscaled with 5 % margins, line width 0.5 pt)."""
    fig = plt.figure(figsize=(2.24, 2.24), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.axis("off")
    ax.plot(wave, flux, lw=0.5, color=color, **kw)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def mpl_overlap(wave, flux):
    fig = plt.figure(figsize=(2.24, 2.24), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.axis("off")
    for w, f, c in zip(np.array_split(wave, 3), np.array_split(flux, 3),
                       ["red", "green", "blue"]):
        ax.plot((w - w.min()) / (w.max() - w.min()), f, color=c, lw=0.5, alpha=0.5)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def drawn(rgb_uint8, full_darkness):
    """Pixels whose darkest channel is ≥ DRAWN of what full coverage would give."""
    dark = 1.0 - np.asarray(rgb_uint8, np.float64).min(axis=-1) / 255.0
    return dark >= DRAWN * full_darkness


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


# --------------------------------------------------------------------------------------------
# Colour table, options, helpers (no compilation)
# --------------------------------------------------------------------------------------------
def test_embedded_viridis_is_matplotlibs():
    assert np.array_equal(render.viridis_table(), render._viridis_from_matplotlib())
    assert render.viridis_table().shape == (256, 3)


def test_representations_and_option_errors(short):
    flux, mask, wave = short
    assert render.representations() == ("simple", "overlap", "map2d", "map2dnormal",
                                        "map2dnormaldev")
    with pytest.raises(ValueError, match="unknown representation"):
        render.render("spiral", flux, mask, wave)
    with pytest.raises(ValueError, match="unknown render option"):
        render.render("map2d", flux, mask, wave, colour="red")
    with pytest.raises(ValueError, match="fill_order"):
        render.RenderConfig(fill_order="zigzag")
    with pytest.raises(ValueError, match="mask has shape"):
        render.render("map2d", flux, mask[:, :10], wave)
    with pytest.raises(ValueError, match="must not decrease"):
        render.render("map2d", flux, mask, wave[:, ::-1].copy())
    cfg = render.RenderConfig(**{"x_limits": [3600.0, 9800.0], "fit": "truncate"})
    assert cfg.x_limits == (3600.0, 9800.0) and hash(cfg) == hash(cfg.replace())
    assert cfg.capacity == CAP


def test_longer_than_the_map_is_an_error_unless_an_option_says_what(desi):
    flux, mask, wave = desi
    for rep in ("map2d", "map2dnormal", "map2dnormaldev"):
        with pytest.raises(ValueError, match=r"7781 pixels.*5476.*truncate.*resample"):
            render.render(rep, flux, mask, wave)
    with pytest.raises(ValueError, match="5476"):
        jax.jit(functools.partial(render.render, "map2d"))(flux, mask, wave)


@pytest.mark.parametrize("fill", ["standard", "boustrophedon"])
def test_cell_index_map_is_the_block_layout(fill):
    values = np.arange(CAP, dtype=np.float32) + 1
    cells = np.concatenate([values, [0.0]])                # last cell = empty
    assert np.array_equal(cells[render.cell_index_map(SIZE, BS, fill)], blocks(values, fill))


def test_png_round_trip_and_uint8(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3)).astype(np.float32) / 255
    path = render.write_png(tmp_path / "x.png", img)
    back = plt.imread(path)
    assert back.shape == (5, 7, 3)
    assert np.array_equal(render.to_uint8(back), render.to_uint8(img))
    assert np.array_equal(render.to_uint8(img), np.round(img * 255).astype(np.uint8))
    assert render.to_uint8(np.array([np.nan, -1.0, 2.0])).tolist() == [0, 0, 255]


# --------------------------------------------------------------------------------------------
# Block maps: exact
# --------------------------------------------------------------------------------------------
def test_map2d_equals_reference_exactly(short):
    flux, mask, wave = short
    out = np.asarray(render.render("map2d", flux, mask, wave))
    assert out.shape == (4, SIZE, SIZE, 3) and out.dtype == np.float32
    for i in range(4):
        assert np.array_equal(out[i], ref_map2d(flux[i])), i
    # Spare strip (3 · 74 = 222): value 0 at the paper's limits = viridis index 1.
    assert np.array_equal(out[0, 222:, :], np.broadcast_to(out[0, 223, 223], (2, SIZE, 3)))
    assert np.array_equal(render.to_uint8(out[0, 223, 223]), VIRIDIS(1, bytes=True)[:3])
    # The reference itself: imshow + savefig PNG (RGBA, fed as RGB) of the zeroed block image.
    img = blocks(flux[0])
    fig = plt.figure(figsize=(2.24, 2.24))
    plt.imshow(img, cmap="viridis", vmin=render.PAPER_VMIN, vmax=render.PAPER_VMAX)
    plt.axis("off")
    plt.gca().set_position([0, 0, 1, 1])
    buf = io.BytesIO()
    plt.savefig(buf, format="png", dpi=100, bbox_inches="tight", pad_inches=0)
    plt.close(fig)
    buf.seek(0)
    png = plt.imread(buf)
    assert png.shape == (SIZE, SIZE, 4)
    assert np.array_equal(render.to_uint8(png[..., :3]), render.to_uint8(out[0]))


def test_map2d_boustrophedon_unquantized_and_minmax(short):
    flux, mask, wave = short
    out = np.asarray(render.render("map2d", flux, mask, wave, fill_order="boustrophedon",
                                   quantize=False))
    for i in range(2):
        assert np.array_equal(out[i], ref_map2d(flux[i], "boustrophedon", quantize=False))
    # Fill orders differ only on odd block rows, which are mirrored.
    std = ref_map2d(flux[0], quantize=False)
    assert not np.array_equal(out[0], std)
    assert np.array_equal(out[0, 0:3], std[0:3])                     # block row 0 identical
    assert np.array_equal(out[0, 3:6, :222], std[3:6, :222][:, ::-1])  # row 1 reversed
    mm = np.asarray(render.render("map2d", flux, mask, wave, map_scale="minmax"))
    for i in range(2):
        lo, hi = float(flux[i].min()), float(flux[i].max())
        img = blocks(flux[i])
        t = (img - np.float32(lo)) / np.float32(hi - lo)
        assert np.array_equal(mm[i], VIRIDIS(t, bytes=True)[..., :3].astype(np.float32) / 255)


@pytest.mark.parametrize("dev", [False, True], ids=["map2dnormal", "map2dnormaldev"])
def test_normal_maps_equal_reference_exactly(short, dev):
    flux, mask, wave = short
    rep = "map2dnormaldev" if dev else "map2dnormal"
    out = np.asarray(render.render(rep, flux, mask, wave))
    for i in range(4):
        assert np.array_equal(out[i], ref_normal(flux[i], dev)), i
    if not dev:
        assert np.all(out[..., 1:] == 0)
    # Cells after the 4600 values are empty (black); the strip too.
    r, c = divmod(4600, NB)
    assert np.all(out[:, r * BS:(r + 1) * BS, c * BS:] == 0)
    assert np.all(out[:, (r + 1) * BS:] == 0)
    assert np.all(out[:, 222:] == 0) and np.all(out[:, :, 222:] == 0)


def test_truncate_drops_values_beyond_5476(desi):
    flux, mask, wave = desi
    out = np.asarray(render.render("map2d", flux, np.ones_like(mask), wave, fit="truncate"))
    for i in range(2):
        assert np.array_equal(out[i], ref_map2d(flux[i][:CAP]))


def test_resample_fills_every_cell(short):
    flux, mask, wave = short
    out = np.asarray(render.render("map2dnormal", flux, mask, wave, fit="resample"))
    for i in range(2):
        w = wave[i].astype(np.float64)
        f = np.interp(np.linspace(w.min(), w.max(), CAP), w, flux[i].astype(np.float64))
        ref = ref_normal(f.astype(np.float32))
        # float32 interpolation vs numpy's float64: the truncated 0–255 level may differ by one
        # where the value sits on an integer boundary.
        diff = np.abs(render.to_uint8(out[i]).astype(int) - render.to_uint8(ref).astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert np.all(out[:, :222, :222, 0].reshape(4, -1).max(axis=1) == 1.0)
    # Every cell holds data: no cell keeps the empty 0 except at the spectrum's minimum.
    assert (out[:, :222, :222, 0] == 0).mean() < 0.01


# --------------------------------------------------------------------------------------------
# Line plots: IoU against matplotlib
# --------------------------------------------------------------------------------------------
def test_simple_matches_matplotlib(desi):
    flux, mask, wave = desi
    out = np.asarray(render.render("simple", flux, np.ones_like(mask), wave))
    assert out.shape == (4, SIZE, SIZE, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    full = 1 - 31 / 255                                  # #1f77b4's darkest channel
    for i in range(4):
        ref = mpl_line(wave[i], flux[i])
        score = iou(drawn(render.to_uint8(out[i]), full), drawn(ref, full))
        assert score >= IOU_MIN, (i, score)
    # White background, line colour #1f77b4 where fully covered.
    assert np.all(out[:, 0, 0] == 1.0)


def test_overlap_matches_matplotlib(desi):
    flux, mask, wave = desi
    out = np.asarray(render.render("overlap", flux, np.ones_like(mask), wave))
    full = 0.5                                           # one line at alpha 0.5
    for i in (0, 2, 3):
        ref = mpl_overlap(wave[i], flux[i])
        score = iou(drawn(render.to_uint8(out[i]), full), drawn(ref, full))
        assert score >= IOU_MIN, (i, score)
        # Each chunk in its own colour: red, green and blue pixels all present.
        o = render.to_uint8(out[i]).astype(int)
        assert (o[..., 0] - o[..., 1] > 60).any() and (o[..., 2] - o[..., 0] > 60).any()
        assert (o[..., 1] - o[..., 0] > 40).any()


def test_gap_mode_breaks_the_line_like_nan(desi):
    flux, mask, wave = desi
    m = mask.copy()
    m[:, 3000:3400] = False                              # a wide gap, visible at 224 px
    out = np.asarray(render.render("simple", flux, m, wave, masked="gap"))
    full = 1 - 31 / 255
    for i in range(2):
        ref = mpl_line(wave[i], np.where(m[i], flux[i], np.nan))
        mine = drawn(render.to_uint8(out[i]), full)
        assert iou(mine, drawn(ref, full)) >= IOU_MIN
        # Autoscaled x: data range plus 5 % each side.
        x = ((wave[i][[3000, 3399]] - wave[i][0]) / (wave[i][-1] - wave[i][0]) + 0.05) / 1.1
        c0, c1 = (x * SIZE).astype(int)
        assert not mine[:, c0 + 2:c1 - 2].any()           # nothing drawn inside the gap


# --------------------------------------------------------------------------------------------
# Bad inputs, padding, jit
# --------------------------------------------------------------------------------------------
def _bad_batch(arrays):
    """Row 0 constant, row 1 NaN + masked pixels, row 2 a spectrum padded at the end, row 3 the
    same spectrum with padding (wavelength −1, garbage flux) in the middle and at the end."""
    flux, mask, wave = (np.array(a) for a in arrays)
    length = flux.shape[1]
    mask[:] = True
    flux[0] = 3.0
    flux[1, 100:140] = np.nan
    mask[1, 500:700] = False
    flux[1, 500:700] = 1e6                               # masked: must not show
    n = 4000
    flux[2, n:], mask[2, n:], wave[2, n:] = 0.0, False, -1.0
    keep = np.r_[0:1500, 1500 + 600:length]               # 600 padding pixels inserted at 1500
    row = np.full(length, np.nan, np.float32)
    wrow = np.full(length, -1.0, np.float32)
    mrow = np.zeros(length, bool)
    row[keep[:n]], wrow[keep[:n]], mrow[keep[:n]] = flux[2, :n], wave[2, :n], True
    flux[3], wave[3], mask[3] = row, wrow, mrow
    return flux, mask, wave


@pytest.mark.parametrize("rep", render.representations())
def test_bad_inputs_give_no_nan_and_padding_anywhere_is_ignored(short, desi, rep):
    # Line plots on the DESI shape and block maps on the short one reuse earlier compiles.
    flux, mask, wave = _bad_batch(desi if rep in ("simple", "overlap") else short)
    out = np.asarray(render.render(rep, flux, mask, wave))
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert np.array_equal(out[2], out[3])                # padding position does not matter
    if rep == "simple":
        # A constant line is drawn through the middle (matplotlib's nonsingular widening).
        rows = np.where(out[0, :, 112].min(axis=-1) < 0.9)[0]
        assert rows.size and abs(rows.mean() - 111.5) <= 1
        # Masked pixels are bridged: the 1e6 values do not set the y range (the line does not
        # collapse onto one row).
        assert np.ptp(np.where(out[1].min(axis=-1) < 0.9)[0]) > 100
    if rep in ("map2dnormal", "map2dnormaldev"):
        assert np.all(out[0, ..., 0] == 0)              # constant: (f − min) / 1 = 0
    if rep == "map2d":
        # Masked / NaN pixels are interpolated between their valid neighbours.
        good = mask[1] & np.isfinite(flux[1])
        filled = np.interp(wave[1], wave[1][good], flux[1][good]).astype(np.float32)
        ref = ref_map2d(filled)
        diff = np.abs(render.to_uint8(out[1]).astype(int) - render.to_uint8(ref).astype(int))
        # float32 vs float64 interpolation may move a few cells by one colour; the 200 masked
        # cells (1800 px, 3.6 %) showing their 1e6 would fail this.
        assert (diff.max(axis=-1) > 0).mean() < 0.005


def test_empty_rows_and_gap_cells(short):
    flux, mask, wave = (a.copy() for a in short)
    mask[0] = False                                       # nothing valid
    mask[1, 74:148] = False                               # block row 1 masked
    out = np.asarray(render.render("map2d", flux, mask, wave, masked="gap"))
    empty = ref_map2d(np.zeros(0))                        # every cell empty
    assert np.array_equal(out[0], empty)
    assert np.array_equal(out[1, 3:6], empty[3:6])
    assert np.isfinite(out).all()


def test_jit_and_batch_rows_are_independent(short):
    flux, mask, wave = short
    fn = jax.jit(functools.partial(render.render, "map2d", fill_order="boustrophedon",
                                   quantize=False))
    two = np.asarray(fn(flux[:2], mask[:2], wave[:2]))
    four = np.asarray(render.render("map2d", flux, mask, wave, fill_order="boustrophedon",
                                    quantize=False))
    assert two.shape == (2, SIZE, SIZE, 3) and two.dtype == np.float32
    assert np.array_equal(two, four[:2])
    batch = types.SimpleNamespace(flux=flux, mask=mask, wavelength=wave)   # a SpectrumBatch's
    assert np.array_equal(render.render_batch("map2d", batch, fill_order="boustrophedon",
                                              quantize=False), four)


def test_cli_contact_sheet(tmp_path, capsys):
    out = tmp_path / "sheet.png"
    assert render.main(["--representations", "simple,map2d", "--n", "4", "--out",
                        str(out)]) == 0
    img = plt.imread(out)
    assert img.shape[0] > 2 * SIZE and img.shape[1] > 4 * SIZE
    assert "2 representations × 4 spectra" in capsys.readouterr().out
