"""chainstore's benchmark: ``python -m bench`` (or ``make bench``).

Separate ideas, separate modules: L{bench.systems} (what is measured: a real ``twistd kvserver``,
and a bare AMP echo server as the baseline), L{bench.workload} (which keys and values),
L{bench.loadgen} (a closed loop keeping N requests in flight and timing each), L{bench.runner}
(one session over every system), L{bench.report} (medians, ratios, the table).
"""
