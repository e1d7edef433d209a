"""Data: instrument wavelength grids, survey readers, shards and the input pipeline."""
