"""Benchmarks of the storage and of flash-backed generation."""
