"""Synthetic tasks generated locally (the demo's arithmetic)."""
