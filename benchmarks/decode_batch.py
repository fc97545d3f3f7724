"""The LLM's CPU seconds per request against the number of requests in flight.

    python -m benchmarks.decode_batch [--in-flight 8 7 6] [--requests 32] [--rounds 2] [--model small]

The engine alone, on one thread, with `make bench`'s "small" LLM and prompts the length of its
896 px image requests (1,300 text tokens, 32 new tokens, `ignore_eos`): a closed loop keeps
`--in-flight` requests in the engine, the settings measured in alternation over `--rounds`. A
decode step pays for the whole LM head (151,675 x hidden) whatever its batch, so fewer
sequences per step cost more per request. A closed loop with no queue before the LLM (`make
bench` before it saturated every setup: 8 workers, no batch limit below 8) leaves DvD's LLM
fewer sequences than LLM-only (the requests at the vision stage); this measures that cost on
its own. Prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from benchmarks.models import bench_model
from benchmarks.report import markdown_table, write_json
from language_server.engine.engine import Engine
from language_server.engine.sampling import SamplingParams
from language_server.engine.sequence import EngineOutput, EngineRequest
from language_server.model import LanguageModel
from language_server.server import load_tokenizer
from pipeline.model.checkpoint import open_model
from pipeline.config import LanguageConfig

PROMPT_TOKENS = 1300  # an 896 px image request: 5 tiles of 256 rows plus the chat template
NEW_TOKENS = 32


def run(engine: Engine, requests: int, in_flight: int, seed: int, prompt_tokens: int = PROMPT_TOKENS,
        new_tokens: int = NEW_TOKENS) -> dict[str, float]:
    """`requests` text prompts through the engine, `in_flight` at a time; CPU and step counts."""
    generator = torch.Generator().manual_seed(seed)
    finished = [False] * requests
    sent = 0

    def sink_for(index: int):
        def sink(output: EngineOutput) -> None:
            if output.error is not None:
                raise RuntimeError(f"request {index} failed") from output.error
            finished[index] = output.finished

        return sink

    before = replace(engine.step_counts)
    cpu, wall = time.process_time(), time.perf_counter()
    while not all(finished):
        while sent < requests and sent - sum(finished) < in_flight:
            prompt = torch.randint(0, 30000, (prompt_tokens,), generator=generator).tolist()
            params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
            engine.add_request(EngineRequest(f"r{sent}", prompt, params), sink_for(sent))
            sent += 1
        engine.step()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    after = engine.step_counts
    return {
        "cpu_s_per_request": cpu / requests,
        "requests_per_s": requests / wall,
        "steps": after.steps - before.steps,
        "decode_batch": (after.sampled_tokens - before.sampled_tokens) / (after.sampling_steps - before.sampling_steps),
    }


def measure(args: argparse.Namespace) -> list[dict[str, float]]:
    """Every --in-flight setting --rounds times, alternating their order; one row per setting."""
    checkpoint = open_model(str(bench_model(args.model)))
    model, _ = LanguageModel.from_checkpoint(checkpoint, "cpu", torch.float32)
    blocks = -(-(args.prompt_tokens + args.new_tokens) // LanguageConfig.block_size)
    config = LanguageConfig(num_kv_blocks=max(args.in_flight) * blocks, max_num_seqs=max(args.in_flight),
                            dtype="float32")
    engine = Engine(model, load_tokenizer(checkpoint), config)
    run(engine, 2, 2, 1000, args.prompt_tokens, 4)  # warm-up
    measured: dict[int, list[dict[str, float]]] = {n: [] for n in args.in_flight}
    for round_index in range(args.rounds):
        order = args.in_flight if round_index % 2 == 0 else list(reversed(args.in_flight))
        for n in order:
            measured[n].append(run(engine, args.requests, n, round_index, args.prompt_tokens, args.new_tokens))
            print(f"round {round_index + 1}/{args.rounds}, {n} in flight: {measured[n][-1]}", flush=True)
    return [{"in_flight": n, **{key: statistics.median(r[key] for r in runs) for key in runs[0]},
              "cpu_s_min": min(r["cpu_s_per_request"] for r in runs),
              "cpu_s_max": max(r["cpu_s_per_request"] for r in runs)}
            for n, runs in measured.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[8, 7, 6])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="small", choices=["tiny", "small"])
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    args = parser.parse_args(argv)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = measure(args)
    finally:
        torch.set_num_threads(threads)
    out = write_json("decode-batch", {"args": vars(args), "rows": rows})
    print(markdown_table(rows, [("in_flight", "in flight"), ("decode_batch", "decode batch"), ("steps", "steps"),
                                ("cpu_s_per_request", "CPU s/request (median)"), ("cpu_s_min", "min"), ("cpu_s_max", "max"),
                                ("requests_per_s", "req/s")]))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
