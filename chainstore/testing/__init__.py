"""Helpers for tests and benchmarks of chainstore (not used by the daemons themselves)."""
