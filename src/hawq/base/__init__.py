"""Foundations: exception types, registries, atomic I/O, plots."""
