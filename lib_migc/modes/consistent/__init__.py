"""Consistent-MIG: change, remove or add one instance and keep the rest of the previous image."""
