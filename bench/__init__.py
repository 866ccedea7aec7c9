"""chainstore's benchmark: ``python -m bench`` (or ``make bench``).

Separate ideas, separate modules: L{bench.systems} (chainstore as measured: a chain of three
under an ECS, one ``twistd kvserver``, and a bare AMP echo server), L{bench.peers} (Redis with
two replicas and etcd with three members, and redis-benchmark), L{bench.resp} and
L{bench.http11} (the load generator's Redis and HTTP/1.1 clients), L{bench.ycsb} (workloads,
key distributions, the record set), L{bench.loadgen} (a closed loop keeping N requests in
flight and timing each), L{bench.runner} (one session over every system),
L{bench.report} (medians, ratios chain / peer, the targets, the table), L{bench.plots} (PNGs).

``python -m bench.reconfig`` measures a join and a leave at several data sizes: L{bench.reconfig}
(one operation, one size, the command line), L{bench.cluster} (the ECS, its config and admin
commands, the ring), L{bench.dataset} (keys, the load, the read-back), L{bench.writer} (the
background writer), L{bench.memory} (the servers' RSS), L{bench.reconfig_report} (results and
verdict). Both entry points run on L{bench.driver} (the reactor, SIGTERM, the exit status).
"""
