"""Attention backends: one interface (base.py), a PyTorch reference (torch_ref.py), fast kernels beside it."""
