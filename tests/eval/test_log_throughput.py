"""eval/log_throughput.py on hand-written SGLang decode log lines."""

from __future__ import annotations

from eval.log_throughput import throughputs

LOG = """\
[2026-11-29 17:40:19] Decode batch, #running-req: 16, #token: 65824, token usage: 0.03, cuda graph: True, gen throughput (token/s): 208.25, #queue-req: 0
[2026-11-29 17:40:20] Decode batch, #running-req: 16, #token: 66464, token usage: 0.03, cuda graph: True, gen throughput (token/s): 2120.28, #queue-req: 0
[2026-11-29 17:40:20] Decode batch, #running-req: 1, #token: 33000, token usage: 0.01, cuda graph: True, gen throughput (token/s): 148.00, #queue-req: 0
[2026-11-29 17:40:21] Decode batch, #running-req: 16, #token: 67104, token usage: 0.03, cuda graph: True, gen throughput (token/s): 2122.86, #queue-req: 0
"""


def test_reads_the_lines_of_one_batch_size_and_drops_the_round_start():
    result = throughputs(LOG, running=16)
    assert result["values"] == [208.25, 2120.28, 2122.86]
    assert result["steady"] == [2120.28, 2122.86] and result["median"] == 2121.57
    assert throughputs(LOG, running=1)["median"] == 148.0
    assert throughputs(LOG, running=8) == {"values": [], "steady": [], "median": None}
