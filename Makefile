# Two entry points on a fresh machine: `make run` and `make test`.
# Both create .venv on first use and reinstall when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run run-ha run-standalone test bench flood torture venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The ECS launches three KVServers from its pool (etc/ecs.yaml) and stops them on exit.
run: $(STAMP)
	$(BIN)/twistd --pidfile= -n ecs

# Several ECS, one leader, state in etcd: a three-member etcd on loopback (data/etcd1-3; installed
# from Debian's etcd-server when missing, as root), three ECS on 127.0.0.1:49999, 49998 and
# 49997 (etc/ecs-ha.yaml) and three servers (data/ha/); Ctrl-C stops everything.
run-ha: $(STAMP)
	$(BIN)/python -m harness.run_ha

run-standalone: $(STAMP)
	$(BIN)/twistd --pidfile= -n kvserver

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The bench extra (matplotlib, for the plots) on top of the test install; its own stamp, so
# make test never needs it and a changed pyproject.toml reinstalls both.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

# Installs Redis and etcd from Debian's packages when missing (as root); BENCH_ARGS adds
# options (python -m bench --help).
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# A client that pipelines gets of a 120,000-byte value and never reads, on the console and over
# AMP with TLS: the server's RSS growth and another client's worst latency (about 30 s);
# FLOOD_ARGS adds options (python -m bench.flood --help).
flood: $(STAMP)
	$(BIN)/python -m bench.flood $(FLOOD_ARGS)

# Every fault scenario for about a minute each against a real cluster (see README,
# "Fault-injection tests"); TORTURE_ARGS adds options (--seed N, --scenario NAME).
torture: $(STAMP)
	$(BIN)/python -m torture --long $(TORTURE_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache .hypothesis
