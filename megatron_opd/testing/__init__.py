"""Helpers shared by tests, benchmarks and the demo: spawned gloo ranks, tiny local models."""
