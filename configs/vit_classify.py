r"""A ViT fine-tuned on spectra rendered as images inside the model (SPECS.md section 2):
galaxy / QSO / star classification, on simulated SDSS-like and LAMOST-like spectra.

    python -m spectrax.train --config=configs/vit_classify.py:variant=tiny,representation=overlap

Arguments: ``variant`` b16 (default; DINO ViT-B/16, 85,798,656 backbone parameters) | b16_timm |
tiny (CPU); ``representation`` simple | overlap | map2d (default) | map2dnormal |
map2dnormaldev; ``fill_order`` standard | boustrophedon; ``steps``. Pretrained weights:
``--config.model.init_from=<timm / Hugging Face ViT-B/16 file>`` (spectrax.convert_weights).
The 1D transformer baseline on the same data: configs/transformer1d_redshift.py.
"""
from spectrax.config_lib import base_config, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, variant="b16", representation="map2d", fill_order="standard",
                  label="teff", steps=0)
    b16 = a.variant.startswith("b16")
    c = base_config()
    c.name = "vit_classify"

    # Data: SDSS (≤ 4611 px) and LAMOST (~3909 px) spectra in one length bucket.
    c.data.simulator = "slomost"
    c.task = "classification"
    c.model.num_outputs = 3
    c.data.buckets = (4640,)
    c.data.n_train, c.data.n_val, c.data.n_test = 3000, 200, 1000

    c.model.name = "vit"
    c.model.variant = a.variant
    c.model.representation = a.representation
    c.model.init_from = ""
    c.model.freeze_backbone = False
    # Inputs are median-normalised, so the per-spectrum min–max colour scale replaces the
    # paper's fixed vmin/vmax (which assume SDSS flux units); longer spectra are cut.
    c.model.render = {"map_scale": "minmax", "fit": "truncate", "fill_order": a.fill_order}

    # The reference fine-tunes with AdamW at a small learning rate; a random-init tiny ViT
    # needs a larger one.
    c.optim.lr = 1e-4 if b16 else 1e-3
    c.optim.schedule, c.optim.warmup_steps, c.optim.weight_decay = "cosine", 50, 0.05
    c.batch_size = 32 if b16 else 16
    c.num_steps = a.steps or (2000 if b16 else 300)
    c.eval_batch_size = 32
    return c.lock()
