"""Pallas kernels. gru: one GRU layer over a whole sequence, forward and backward (TPU)."""
