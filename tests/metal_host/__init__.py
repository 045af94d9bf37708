"""Linux compile check of the Metal host code (see check.py)."""
