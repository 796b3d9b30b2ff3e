"""Sessions, propagation, the embedding cache and worker threads: no MRML, no Qt."""
