# The two quick-start commands: `make quickstart` (install + main job) and `make test`.
PYTHON ?= python3

.PHONY: install quickstart test

install:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[test]"

# Main job on the embedded simulated DESI BGS-like data: the SpecPT autoencoder, then the
# redshift model (ZScan, trained from scratch: it does not use the autoencoder's encoder)
# (metrics + figures in runs/specpt_bgs-tokens and runs/specpt_redshift_bgs-zscan).
quickstart: install
	$(PYTHON) -m spectrax.train --config=configs/specpt_bgs.py
	$(PYTHON) -m spectrax.train --config=configs/specpt_redshift_bgs.py

test: install
	$(PYTHON) -m pytest tests -q -n 2 --dist=loadfile
