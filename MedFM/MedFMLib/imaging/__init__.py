"""Volumes, geometry, intensity and file I/O: arrays and matrices, no models, no MRML."""
