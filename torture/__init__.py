"""The fault-injection harness: concurrent clients record a history, checkers judge it.

This package's core is free of sockets and reactors: L{torture.history} records what clients
asked and what they were told, L{torture.checker} decides whether those answers could have come
from one correct key-value store (linearizability per key, no acknowledged write lost, replicas
in agreement).
"""
