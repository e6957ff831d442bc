"""Specialised compute kernels that layers pick instead of their general path."""
