"""bench.chain_python: the chain's Python per put on the simulated network."""

from bench.chain_python import measure


def test_replication_costs_more_cpu_per_put_than_a_chain_of_one(tmp_path):
    alone, _ = measure(300, 1, 100, 32, tmp_path / "one")
    chained, batch = measure(300, 3, 100, 32, tmp_path / "three")
    # Every write is applied three times and crosses two Relay boxes, and its acknowledgement
    # two more.
    assert 0 < alone < chained
    # 32 in flight over three chains: several writes per batch, never more than in flight.
    assert 1 < batch <= 32
