"""The model catalog, the store, downloads and per-engine dependencies."""
