"""GPU helpers (Triton). Import submodules explicitly; this package imports nothing heavy."""
