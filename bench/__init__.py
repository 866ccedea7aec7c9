"""chainstore's benchmark: ``python -m bench`` (or ``make bench``).

Separate ideas, separate modules: L{bench.systems} (chainstore as measured: a chain of three
under an ECS, one ``twistd kvserver``, and a bare AMP echo server), L{bench.peers} (Redis with
two replicas and etcd with three members, and redis-benchmark), L{bench.resp} and
L{bench.http11} (the load generator's Redis and HTTP/1.1 clients), L{bench.ycsb} (workloads,
key distributions, the record set), L{bench.loadgen} (a closed loop keeping N requests in
flight and timing each), L{bench.runner} (one session over every system),
L{bench.report} (medians, ratios chain / peer, the targets, the table), L{bench.plots} (PNGs).
"""
