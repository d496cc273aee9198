"""bench/report.py's peers_run_goals: the goals of one peers run (e.g. the Mamba2 shape), met or missed by how much.
(Apart from tests/test_report.py, which another change has in progress.)"""

from __future__ import annotations

import os
import sys

REPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "report.py")


def test_peers_run_goals_says_met_or_by_how_much_missed():
    """peers_run_goals (one peers run, e.g. the Mamba2 shape): each goal per case, met or missed by how much."""
    sys.path.insert(0, os.path.dirname(REPORT))
    import report as rep

    tps = {("mq-deploy ONNX W8A8, ORT + native ops", "prefill-256"): 300.0, ("transformers fp32", "prefill-256"): 100.0,
           ("mq-deploy ONNX W8A8, ORT + native ops", "prefill-1024"): 200.0, ("transformers fp32", "prefill-1024"): 100.0,
           ("llama.cpp Q8_0", "prefill-256"): 250.0, ("llama.cpp Q8_0", "prefill-1024"): 250.0}
    rows = []
    for system in ("mq-deploy ONNX W8A8, ORT + native ops", "transformers fp32", "llama.cpp Q8_0"):
        for case, batch in rep.PEER_CASES:
            q8 = system == "llama.cpp Q8_0"
            rows.append(dict(system=system, case=case, batch=batch,
                             tokens_per_s=tps.get((system, case), 50.0 if q8 else 40.0),
                             peak_rss_mib=100.0 if q8 else (250.0 if batch == 8 else 150.0), load_before=[1.0, 1, 1],
                             load_after=[1.0, 1, 1]))
    text = rep.RENDERERS["peers_run_goals"]([{"rows": rows}])
    print(text)
    lines = text.splitlines()
    assert lines[0].startswith("- Prefill ≥ 3x transformers fp32: prefill-256 b1 **met**, 3.00x (300 vs 100 tok/s); "
                               "prefill-1024 b1 **missed** by 33 %, 2.00x"), lines[0]
    assert "prefill-256 b1 **met**, 1.20x" in lines[1] and "prefill-1024 b1 **missed** by 20 %, 0.80x" in lines[1]
    assert "decode-128 b1 **missed** by 20 %, 0.80x (40.0 vs 50.0 tok/s)" in lines[2]
    assert lines[3].startswith("- Peak RSS ≤ 2x llama.cpp Q8_0: **not met in every case**")
    assert "decode-128 b8 2.50x (250 vs 100 MiB, **missed** by 25 %)" in lines[3]
    assert "decode-128 b1 1.50x (150 vs 100 MiB, met)" in lines[3]
