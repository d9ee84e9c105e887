"""Backend tests: one contract suite (contract.py) run on every backend, plus each backend's own."""
