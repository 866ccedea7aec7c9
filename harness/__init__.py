"""Helpers for the tests, the benchmarks and the fault harness: real processes tracked by PID, and
fault-injecting stores. Not part of the product: the wheel ships chainstore, client and ecs only."""
