"""Sliding-window attention: each query attends to its last ``window`` tokens."""
