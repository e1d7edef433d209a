"""Classical baselines the learned models are measured against.

- :mod:`spectrax.baselines.template_fit`: Redrock-style redshifts by χ² fitting of a rest-frame
  PCA template basis over a redshift grid, vectorised and jitted in jax.
"""
__all__ = ["Templates", "chi2_grid", "fit_redshifts", "fit_templates"]


def __getattr__(name: str):
    # Lazy, so `python -m spectrax.baselines.template_fit` does not import the module twice.
    if name in __all__:
        from spectrax.baselines import template_fit

        return getattr(template_fit, name)
    raise AttributeError(f"module 'spectrax.baselines' has no attribute {name!r}")
