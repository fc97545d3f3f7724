"""How far DvD on vLLM's engine can beat plain vLLM on two CPUs: the bound, measured in one run.

DvD splits two CPUs one and one (vision server, vLLM's engine); plain vLLM runs everything on both.
Four closed loops, the bench's (`--concurrency` workers against a batch limit of `--max-num-seqs`,
`--output-tokens` greedy tokens, every image unique), one server at a time:
  dvd-vllm    DvD with `language.engine: vllm`, vision server on the first CPU, vLLM on the second;
  vllm-b      plain vLLM on both CPUs, the same image requests;
  vllm-a      plain vLLM on the second CPU alone, the same image requests;
  text-a      that same server, text prompts as long as an image request's prompt (its LLM half).
From their CPU seconds per request (every server is saturated, so a busy CPU is a used CPU):
  V  DvD's vision server per request;
  L  text-a per request: the LLM half of a request on one CPU;
  E  vllm-a's per request minus L: plain vLLM's own encoder path (preprocessing and ViT);
  s  vllm-b ÷ (2 × vllm-a): how much of its second CPU plain vLLM turns into throughput.
A one-plus-one split serves at most 1 / max(V, L) requests/s, so DvD ÷ vllm-b is at most that
over vllm-b's rate ("as sized"); with the halves perfectly balanced, 2 / (V + L) over it
("balanced"). Unless DvD's vision server is cheaper than vLLM's encoder (V < E), the balanced
bound is about 1 / s. Writes benchmarks/results/vllm-bound-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

from benchmarks.http_load import chat_body
from benchmarks.load import LoadResult, summarize
from benchmarks.models import NAMES, bench_model, small_variant
from benchmarks.report import RESULTS, markdown_table, write_json
from benchmarks.setups import BASE_CONFIG, Setup, run_metered, setup_ports, warm
from benchmarks.single_stage import filler_text, prompt_tokens
from benchmarks.vllm_phase import VLLM_START_S, plain_server, run_vllm, warm_vllm
from benchmarks.vllm_server import vllm_import_error
from benchmarks.workloads import PROMPT, SIZES, workloads
from pipeline.entrypoints.launch import Deployment


def bound(rates: dict[str, float], cpu_per_request: dict[str, float]) -> dict[str, float]:
    """The figures of the module docstring from each run's req/s and CPU seconds per request."""
    vision, llm = cpu_per_request["dvd-vllm vision"], cpu_per_request["text-a"]
    plain = rates["vllm-b"]
    return {
        "V": vision,
        "L": llm,
        "E": cpu_per_request["vllm-a"] - llm,
        "s": plain / (2 * rates["vllm-a"]),
        "measured": rates["dvd-vllm"] / plain,
        "as_sized": 1 / max(vision, llm) / plain,
        "balanced": 2 / (vision + llm) / plain,
    }


def text_bodies(model: str, text: str, output_tokens: int) -> Callable[[int], dict[str, Any]]:
    """Text-only chat bodies; each starts with its index, so no two share a cached prefix."""
    return lambda index: chat_body(model, None, output_tokens, f"{index} {text} {PROMPT}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vllm_bound", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", help=f"{' | '.join(NAMES)} | a local checkpoint directory")
    parser.add_argument("--vision-layers", type=int, default=None,
                        help="run `small` with this many ViT layers instead of 4, to move the balance of the halves")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--size", default="896px", choices=list(SIZES))
    parser.add_argument("--requests", type=int, default=48, help="requests per closed loop")
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    parser.add_argument("--port-base", type=int, default=26000)
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    if args.vision_layers is not None and (args.model != "small" or args.vision_layers < 1):
        parser.error("--vision-layers needs --model small and at least 1 layer")
    if len(cpus) < 2:
        parser.error(f"needs 2 CPUs; this process may use {len(cpus)}")
    if (reason := vllm_import_error()) is not None:
        parser.error(f"vLLM cannot run here: {reason}")
    both, second = (cpus[0], cpus[1]), (cpus[1],)

    started = time.perf_counter()
    model_path = bench_model(args.model) if args.vision_layers is None else small_variant(args.vision_layers)
    (workload,) = workloads(args.output_tokens, [args.size])
    logs = RESULTS / "logs" / "vllm-bound"
    runs: dict[str, LoadResult] = {}

    setup = Setup("dvd-vllm", "decoupled", 1, 1, vision_cpus=both[:1], llm_cpus=second, engine="vllm",
                  kv_cache_gib=args.kv_cache_gib)
    overrides = {**setup.overrides(str(model_path), args.dtype, 1, 1, args.max_num_seqs), **setup_ports(0, args.port_base)}
    overrides.pop("language.num_kv_blocks")  # the builtin engine's pool; vLLM sizes its own from kv_cache_gib
    deployment = Deployment(BASE_CONFIG, overrides, log_dir=logs / "dvd-vllm").start(VLLM_START_S)
    try:
        warm(deployment, workload, 2)
        tokens = prompt_tokens(deployment, workload)
        runs["dvd-vllm"] = run_metered(deployment, workload, args.requests, "dvd-vllm", concurrency=args.concurrency)
    finally:
        deployment.stop()
    text = filler_text(model_path, tokens)

    for index, (name, cpu_set) in enumerate((("vllm-b", both), ("vllm-a", second)), start=1):
        server = plain_server(name, cpu_set, setup_ports(index, args.port_base)["vision.job_port"], model_path,
                              args.dtype, args.max_num_seqs, args.kv_cache_gib, logs / name)
        with server.start(VLLM_START_S):
            warm_vllm(server, workload, 2)
            runs[name] = run_vllm(server, workload, args.requests, name, args.concurrency)
            if name == "vllm-a":
                runs["text-a"] = run_vllm(server, workload, args.requests, "text-a", args.concurrency,
                                          bodies=text_bodies(name, text, args.output_tokens))

    summaries = {name: summarize([run]) for name, run in runs.items()}
    failed = {name: summary["errors"] for name, summary in summaries.items() if summary["errors"]}
    if failed:  # a failed request is cheap, and would flatter its run's figures
        raise SystemExit(f"requests failed, no bound computed: {failed} (logs in {logs})")
    rates = {name: summary["request_throughput"] for name, summary in summaries.items()}
    steady = {name: summary["steady_request_throughput"] for name, summary in summaries.items()}
    per_request = {name: sum(run.server_cpu_s.values()) / len(run.records) for name, run in runs.items()}
    per_request["dvd-vllm vision"] = runs["dvd-vllm"].server_cpu_s["vision-0"] / len(runs["dvd-vllm"].records)
    figures = bound(rates, per_request)
    report = {
        "args": vars(args), "model": str(model_path), "prompt_tokens": tokens, "figures": figures,
        "runs": {name: {"req_s": rates[name], "steady_req_s": steady[name], "cpu_s": run.server_cpu_s,
                        "cpu_s_per_request": per_request[name], "summary": summaries[name]}
                 for name, run in runs.items()},
        "wall_s": time.perf_counter() - started,
    }  # fmt: skip
    path = write_json("vllm-bound", report)
    rows = [{"run": name, "req_s": f"{rates[name]:.2f}", "steady": f"{steady[name]:.2f}",
             "cpu": f"{per_request[name]:.3f}"} for name in runs]
    print(markdown_table(rows, [("run", "run"), ("req_s", "req/s"), ("steady", "steady req/s"),
                                ("cpu", "CPU s / request")]))
    print(f"\nprompt {tokens} tokens; V {figures['V']:.3f} s, L {figures['L']:.3f} s, E {figures['E']:.3f} s, "
          f"s {figures['s']:.3f}; DvD(vLLM) ÷ plain vLLM on 2 CPUs: measured {figures['measured']:.2f}x, "
          f"bound as sized {figures['as_sized']:.2f}x, balanced {figures['balanced']:.2f}x")
    print(f"wrote {path} in {report['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
