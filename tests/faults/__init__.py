"""Fault injection: SIGKILL at random instants, a full disk, no permission.

Run alone with ``pytest tests/faults``; ``APOLLO_CAS_FAULT_ITERATIONS`` raises
the number of kills per operation (default 12) and ``APOLLO_CAS_FAULT_MODEL_MB``
the size of the generated model (default 48 MiB, saved in 64 KiB blocks).
"""
