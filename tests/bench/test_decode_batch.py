"""`benchmarks.decode_batch` on the tiny model: the steps and decode batch it reports follow from
the requests in flight, exactly, and the JSON holds one row per setting."""

from __future__ import annotations

import json

import torch

from benchmarks import decode_batch, report


def test_fewer_requests_in_flight_take_more_steps_at_a_smaller_batch(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    threads = torch.get_num_threads()
    argv = ["--model", "tiny", "--in-flight", "3", "1", "--requests", "3", "--rounds", "1",
            "--prompt-tokens", "40", "--new-tokens", "4"]
    assert decode_batch.main(argv) == 0
    assert torch.get_num_threads() == threads  # the process's own setting is restored

    (path,) = tmp_path.glob("decode-batch-*.json")
    rows = {row["in_flight"]: row for row in json.loads(path.read_text())["rows"]}
    # 3 in flight: one step prefills all three prompts (120 tokens) and samples each, then three
    # decode steps of three; 1 in flight: four steps per request, one sequence each
    assert (rows[3]["steps"], rows[3]["decode_batch"]) == (4, 3.0)
    assert (rows[1]["steps"], rows[1]["decode_batch"]) == (12, 1.0)
    assert all(row["cpu_s_min"] <= row["cpu_s_per_request"] <= row["cpu_s_max"] for row in rows.values())
    assert all(row["cpu_s_per_request"] > 0 and row["requests_per_s"] > 0 for row in rows.values())
