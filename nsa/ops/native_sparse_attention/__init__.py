"""NSA's output: the three branches gated and summed (reference: composed; cpu: fused)."""
