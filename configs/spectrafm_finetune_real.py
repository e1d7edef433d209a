r"""SpectraFM stage 2: fine-tuning on REAL-LIKE spectra of the same stars (noise, sky and telluric
residuals, continuum errors, persistence: the synthetic gap), first half of the wavelength
range only (pixels 0–3756, 1.515–1.603 µm), all labels, nothing frozen.

    python -m spectrax.train --config=configs/spectrafm_finetune_real.py[:variant=small|paper|tiny,steps=N]

Starts from stage 1 (configs/spectrafm_pretrain.py, ``runs/spectrafm_pretrain-<variant>``) and
reuses its pixel and label statistics. Next stage: configs/spectrafm_fe_100.py.
"""
from spectrax.config_lib import base_config, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, variant="small", steps=0)
    paper = a.variant == "paper"
    c = base_config()
    c.name = "spectrafm_finetune_real"

    c.data.simulator = "apogee_real"
    c.data.n_train, c.data.n_val, c.data.n_test = 4000, 200, 500

    c.model.name = "spectrafm"
    c.model.variant = a.variant
    c.task = "spectrafm"
    c.task_kwargs.pixel_range = (0, 3757)  # the first half of the APOGEE grid

    c.init.from_workdir = f"runs/spectrafm_pretrain-{a.variant}"  # the stage it starts from

    c.optim.lr = 1e-4 if paper else 3e-4
    c.optim.weight_decay = 0.01
    c.optim.schedule, c.optim.warmup_steps = "cosine", 20
    c.batch_size, c.num_steps = (64, a.steps or 20000) if paper else (32, a.steps or 200)
    c.eval_batch_size = 64
    return c.lock()
