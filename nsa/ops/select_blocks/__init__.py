"""Top-n selection-block indices from the compressed branch's probabilities."""
