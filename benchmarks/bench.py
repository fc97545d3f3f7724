"""`make bench`: DvD against the colocated baseline, same workload, same machine, one run.

Hardware comparisons (CPU thread budgets; `--llm-threads L --vision-threads V`):
  (a) the paper's setup: the LLM gets L threads in both modes and DvD adds V vision threads
      -> colocated with L threads vs DvD with V + L;
  (b) equal totals -> colocated with V + L threads vs DvD with V + L.
With `--bind-cpus` each server process is bound to CPUs of its own: DvD's vision server to V
CPUs and its language server to L others; colocated (a) to those same L; colocated (b) to all
V + L. Vision-only and LLM-only run on DvD's servers, so each single stage is then measured on
exactly the CPUs it has inside DvD. Off by default (benchmarks/RESULTS.md has the A/B run).
Loads: closed-loop concurrency at three image sizes (about 1, 5 and 10 tiles; `--requests` per
run at the middle size, where the targets are, and `--other-size-requests` at the others) and
fixed Poisson arrival rates at the middle size (`--rate-fractions` of the measured capacity,
`--rate-requests` per run). The closed loop saturates every setup: its `--concurrency` (12) is
above the LLM's batch limit (`--max-num-seqs`, 8, the same in every setup), so a queue stands in
front of the LLM in DvD as in LLM-only and colocated (at a concurrency equal to the batch limit,
DvD's LLM would run only the requests not in the vision stage while the LLM alone runs all of
them, which understates the pipeline). A closed loop starts with all its workers' requests at
once; TTFT p99 is reported over every request and, separately, over those after that first wave.
Every request carries its own image (`Workload.image`: one of four photos with a corner block
painted in a colour no other request of the process gets), so no cache on either side (DvD's
feature cache, vLLM's processor, encoder and prefix caches) makes a request cheaper.
Pipeline efficiency = DvD req/s divided by min(vision-only req/s, LLM-only req/s): vision-only
sends the same images straight to the vision server; LLM-only sends text prompts of the same
token length to the same language server. Closed-loop runs go in rounds (`--rounds`): each round
runs, per size, vision-only, DvD, LLM-only, (b) and (a) back to back, and the report pools the
rounds. Throughputs and ratios are given over whole runs and in the closed loop's steady state
(`load.summarize`). At the middle size each setup also serves a few requests one at a time, and
the report gives the mean server-side spans (vision queue and compute, transfer, LLM
queue, prefill, decode) of every run there: where each setup's time to first token goes, with
and without queueing. Every run also records the CPU seconds each server process spent during it
(`benchmarks/server_cpu.py`): the report gives each stage's busy cores in DvD and its CPU
seconds per request in DvD and alone, which split an efficiency below 1 into pipeline bubbles
and stages slowed by running side by side. Writes JSON, Markdown and a PNG to
benchmarks/results/.

With vLLM (`--vllm`, on by default where `import vllm` works, CPU runs): at the middle size the
same closed loop (same images, prompt, output tokens, workers, batch limit) also runs against
  (c) plain vLLM in its ordinary serving mode (`benchmarks/vllm_server.py`: its OpenAI-compatible
      HTTP server on the HF-format checkpoint, driven through /v1/chat/completions by
      `benchmarks/http_load.py`), at two thread budgets: "vllm-b" bound to DvD's vision + LLM
      CPUs (equal totals) and "vllm-a" bound to DvD's LLM CPUs alone (the paper's setup, where DvD
      adds its vision threads on top);
  (d) "dvd-vllm": DvD with `language.engine: vllm`, its vision server on the vision CPUs with
      --vision-threads threads, vLLM on the LLM CPUs (one thread per CPU);
  (e) "dvd-vllm-vir": the same on the model's -Flash variant, ViR routing each tile to 256 or
      64 tokens (the report gives the share compressed, from the vision server's /metrics).
Each vLLM engine gets the same dtype, max model length, batch limit, tokens per step and KV
cache (`--vllm-kv-cache-gib`, by default the whole GiB that holds the builtin engine's KV pool).
This phase comes after every other run, with the other setups' servers stopped, and holds at
most two vLLM engines at a time (each holds its weights, KV cache and compiled graphs in processes
of its own): it runs in steps of two setups side by side, (dvd-vllm, vllm-b), (dvd-vllm,
vllm-a), (dvd-vllm-vir, vllm-a), (dvd-vllm-vir, vllm-b), each `--rounds` rounds of alternating
closed loops, swapping one server between steps (each start is followed by a warm-up). So each
ratio's runs lie side by side in time; a setup's runs from both of its steps are pooled. A failure
in this phase (a server that does not start, say) is reported, and the report keeps every other figure.

On GPUs (`--device cuda:0 --dtype bfloat16 --model internvl3_5-8b`) the LLM and the colocated
process use --device, and DvD's vision server --vision-device: a GPU of its own (the paper's
setup, comparison (a)) or the same one (equal hardware; (a) and (b) then differ only in CPU
threads). The colocated process runs on one device either way.

Both modes run with the same vision settings. On a CPU a ViT forward is already compute-bound
at one tile (benchmarks/RESULTS.md), so cross-request batching adds latency and stalls the
pipeline without adding throughput; the bench therefore defaults to `--vision-batch-tiles 1` on
a CPU. On a GPU it keeps the config default (64).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from typing import Any

from benchmarks import comparison, single_stage, vllm_phase
from benchmarks.load import LoadResult, summarize
from benchmarks.models import NAMES, bench_model
from benchmarks.report import RESULTS, write_json
from benchmarks.setups import BASE_CONFIG, PORT_BASE, PORTS_PER_SETUP, Setup, run_metered, setup_ports, warm
from benchmarks.workloads import workloads
from pipeline.config import LanguageConfig, VisionConfig
from pipeline.entrypoints.launch import Deployment

KV_TOKENS_PER_REQUEST = 4096  # above the longest prompt of any --sizes image (1344 px: about 3,000 tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small",
                        help=f"{' | '.join(NAMES)} (random weights) | a local checkpoint directory")
    parser.add_argument("--dtype", default="float32", help="bfloat16 on a GPU")
    parser.add_argument("--device", default="cpu",
                        help="device of the LLM in every setup and of the colocated process, e.g. cuda:0")
    parser.add_argument("--vision-device", default=None,
                        help="device of DvD's vision server (default: --device), e.g. cuda:1 for the paper's setup")
    parser.add_argument("--vision-batch-tiles", type=int, default=None,
                        help="vision.max_batch_tiles for both modes (default: 1 on a CPU, the config's default on a GPU)")
    parser.add_argument("--llm-threads", type=int, default=1)
    parser.add_argument("--vision-threads", type=int, default=1)
    parser.add_argument("--bind-cpus", action="store_true",
                        help="bind each server to CPUs of its own (needs vision + llm threads CPUs)")
    parser.add_argument("--concurrency", type=int, default=12,
                        help="closed-loop workers (above --max-num-seqs, so that the LLM has a queue in every setup)")
    parser.add_argument("--max-num-seqs", type=int, default=8,
                        help="language.max_num_seqs (the LLM's batch limit) of every setup")
    parser.add_argument("--requests", type=int, default=72,
                        help="closed-loop requests per run at --rate-size (its first wave and final drain weigh less "
                             "in longer runs; the steady state lies between the --concurrency-th completion and "
                             "the --concurrency-th before the last)")
    parser.add_argument("--rate-requests", type=int, default=36, help="requests per fixed-rate run")
    parser.add_argument("--other-size-requests", type=int, default=24,
                        help="requests per closed-loop run at the other sizes (default 24, which leaves them no "
                             "steady-state window at 12 workers: with 32 and 48 per fixed-rate run, a bench on a "
                             "slow spell of the 2-core machine took 18.6 minutes)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="closed-loop rounds, interleaved and pooled in the report (N rounds take N times longer)")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--sizes", default="448px,896px,1344px")
    parser.add_argument("--rate-size", default=None,
                        help="image size of the fixed-rate and one-at-a-time runs (default: the middle of --sizes)")
    parser.add_argument("--rate-fractions", default="1.0",
                        help="fixed-rate runs, as fractions of the mean of DvD's and colocated (b)'s closed-loop "
                             "req/s at --rate-size, e.g. 0.5,0.75,1.0 for TTFT against load")
    parser.add_argument("--unloaded-requests", type=int, default=6,
                        help="requests sent one at a time to each setup at --rate-size (latency without queueing)")
    parser.add_argument("--kv-blocks", type=int, default=None,
                        help="KV-cache blocks of the LLM in every setup (default: room for --max-num-seqs requests "
                             f"of {KV_TOKENS_PER_REQUEST} prompt tokens plus --output-tokens; the same pool for all, "
                             "whatever memory each process found free when it started)")
    parser.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=None,
                        help="also run plain vLLM (equal total threads and LLM threads only) and DvD with "
                             "language.engine: vllm, with and without ViR, at --rate-size (closed loop); "
                             "default: on when `import vllm` works and the run is on CPUs")
    parser.add_argument("--vllm-kv-cache-gib", type=int, default=None,
                        help="KV cache of every vLLM engine, GiB (default: the whole GiB that holds --kv-blocks)")
    parser.add_argument("--port-base", type=int, default=PORT_BASE,
                        help=f"first of {PORTS_PER_SETUP} ports per setup (default {PORT_BASE}: below Linux's "
                             "ephemeral ports, 32768-60999, any of which an outgoing connection may hold)")
    args = parser.parse_args(argv)
    sizes = args.sizes.split(",")
    args.rate_size = args.rate_size or sizes[len(sizes) // 2]
    if args.rate_size not in sizes:
        parser.error(f"--rate-size {args.rate_size} is not one of --sizes {args.sizes}")
    try:
        fractions = [float(f) for f in args.rate_fractions.split(",")]
    except ValueError:
        fractions = []
    if not fractions or not all(f > 0 for f in fractions):
        parser.error(f"--rate-fractions must be numbers > 0, got {args.rate_fractions!r}")
    if min(args.requests, args.other_size_requests, args.rate_requests) < 1:
        parser.error("--requests, --other-size-requests and --rate-requests must be >= 1")
    if min(args.concurrency, args.max_num_seqs) < 1:
        parser.error("--concurrency and --max-num-seqs must be >= 1")

    vision_cpus, llm_cpus = _cpus(args, parser)
    vllm_reason = vllm_phase.skip_reason(args)
    if vllm_reason is not None:
        if args.vllm:
            parser.error(f"--vllm: {vllm_reason}")
        print(f"vLLM setups skipped: {vllm_reason}")
    args.vllm = vllm_reason is None

    started = time.perf_counter()
    model_path = bench_model(args.model, args.device)
    loads = workloads(args.output_tokens, sizes)
    total_threads = args.llm_threads + args.vision_threads
    vision_device = args.vision_device or args.device
    if args.vision_batch_tiles is None:
        args.vision_batch_tiles = 1 if vision_device == "cpu" else VisionConfig.max_batch_tiles
    if args.kv_blocks is None:
        per_request = -(-(KV_TOKENS_PER_REQUEST + args.output_tokens) // LanguageConfig.block_size)
        one_longest = -(-LanguageConfig.max_model_len // LanguageConfig.block_size)
        args.kv_blocks = max(min(args.concurrency, args.max_num_seqs) * per_request, one_longest)
    setups = [
        Setup("dvd", "decoupled", args.vision_threads, args.llm_threads, vision_device, args.device,
              vision_cpus, llm_cpus),
        Setup("colocated-a", "colocated", 0, args.llm_threads, args.device, args.device, (), llm_cpus),
        Setup("colocated-b", "colocated", 0, total_threads, args.device, args.device, (), vision_cpus + llm_cpus),
    ]
    vllm_setups, vllm_servers, vllm_info = vllm_phase.plan(args, model_path) if args.vllm else ([], [], {})
    if args.vllm:
        print(vllm_info["setups"])
    log_dir = RESULTS / "logs"
    deployments: dict[str, Deployment] = {}
    runs: list[dict[str, Any]] = []
    rate_load = next(w for w in loads if w.name == args.rate_size)
    try:
        for index, setup in enumerate(setups):
            overrides = {
                **setup.overrides(str(model_path), args.dtype, args.vision_batch_tiles, args.kv_blocks,
                                  args.max_num_seqs),
                **setup_ports(index, args.port_base),
            }
            bound = f"; cpus {list(setup.vision_cpus)} + {list(setup.llm_cpus)}" if setup.llm_cpus else ""
            print(f"starting {setup.name} ({setup.mode}, vision {setup.vision_threads} + llm {setup.llm_threads} threads{bound}"
                  f"{'' if setup.llm_device == 'cpu' else f'; vision on {setup.vision_device}, llm on {setup.llm_device}'})")
            deployments[setup.name] = Deployment(BASE_CONFIG, overrides, log_dir=log_dir / setup.name).start(600)
            for workload in loads:  # every setup meets every image size before it is measured
                warm(deployments[setup.name], workload, 2)

        texts = {w.name: single_stage.text_twin(deployments["dvd"], w, model_path) for w in loads}
        closed_runs: dict[tuple[str, str], list[LoadResult]] = defaultdict(list)
        # Each round measures every setup and both single stages once per size, back to back, so
        # that a slow spell of this shared machine falls on all of them rather than on one.
        for round_index in range(args.rounds):
            suffix = f" ({round_index + 1}/{args.rounds})" if args.rounds > 1 else ""
            for workload in loads:
                requests = args.requests if workload.name == args.rate_size else args.other_size_requests
                closed_runs[("vision-only", workload.name)].append(
                    single_stage.vision_only(deployments["dvd"], workload, requests, args.concurrency,
                                 f"vision-only {workload.name}{suffix}"))
                for setup, load in (("dvd", workload), ("llm-only", texts[workload.name]),
                                    ("colocated-b", workload), ("colocated-a", workload)):
                    deployment = deployments["dvd" if setup == "llm-only" else setup]
                    closed_runs[(setup, workload.name)].append(
                        run_metered(deployment, load, requests, f"{setup} {workload.name}{suffix}",
                             concurrency=args.concurrency))

        closed = {key: summarize(results) for key, results in closed_runs.items()}
        for workload in loads:
            for setup in [*(s.name for s in setups), "vision-only", "llm-only"]:
                runs.append({"setup": setup, "workload": workload.name, "load": f"closed-{args.concurrency}",
                             **closed[(setup, workload.name)]})

        # One request at a time: each stage's cost with no queueing, at each setup's thread budget.
        for setup in setups:
            result = run_metered(deployments[setup.name], rate_load, args.unloaded_requests, f"{setup.name} one at a time",
                          concurrency=1)
            runs.append({"setup": setup.name, "workload": rate_load.name, "load": "closed-1", **result.summary()})

        colocated_rate = closed[("colocated-b", rate_load.name)]["request_throughput"]
        dvd_rate = closed[("dvd", rate_load.name)]["request_throughput"]
        capacity = (colocated_rate + dvd_rate) / 2
        if not capacity > 0:
            print("no fixed-rate runs: neither DvD nor colocated (b) completed a request in the closed loop")
        for fraction in fractions if capacity > 0 else []:
            rate = fraction * capacity
            for setup in setups:
                result = run_metered(deployments[setup.name], rate_load, args.rate_requests, f"{setup.name} @{rate:.2f} req/s",
                              rate=rate)
                runs.append({"setup": setup.name, "workload": rate_load.name, "load": f"rate-{rate:.2f}",
                             "rate_fraction": fraction, **result.summary()})

        efficiency = [comparison.efficiency(closed, workload.name) for workload in loads]
        if args.vllm:
            for deployment in deployments.values():  # their memory goes to the vLLM engines
                deployment.stop()
            vllm_runs, vllm_info["error"] = vllm_phase.run_phase(args, rate_load, model_path, vllm_setups,
                                                                 vllm_servers, vllm_info, log_dir)
            for setup in vllm_phase.VLLM_ORDER:
                if vllm_runs.get(setup):
                    closed[(setup, rate_load.name)] = summarize(vllm_runs[setup])
                    runs.append({"setup": setup, "workload": rate_load.name, "load": f"closed-{args.concurrency}",
                                 **closed[(setup, rate_load.name)]})
    finally:
        for deployment in deployments.values():
            deployment.stop()

    names = [w.name for w in loads]
    ratios = comparison.ratios(closed, names)
    report = {
        "args": vars(args),
        "model": str(model_path),
        "runs": runs,
        "ratios": ratios,
        "efficiency": efficiency,
        "vllm": {"enabled": args.vllm, "reason": vllm_reason, **vllm_info},
        "vllm_ratios": comparison.vllm_ratios(closed, args.rate_size) if args.vllm else [],
        "wall_s": time.perf_counter() - started,
    }
    path = write_json("bench", report)
    markdown = comparison.markdown(report)
    path.with_suffix(".md").write_text(markdown)
    comparison.plot(path.with_suffix(".png"), closed, names)
    print(markdown)
    print(f"\nwrote {path} (+ .md, .png) in {report['wall_s'] / 60:.1f} min")
    return 0


def _cpus(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(vision CPUs, LLM CPUs) of DvD, disjoint; both empty when not binding."""
    if not args.bind_cpus:
        return (), ()
    allowed = sorted(os.sched_getaffinity(0))
    needed = args.vision_threads + args.llm_threads
    if len(allowed) < needed:
        parser.error(f"--bind-cpus needs {needed} CPUs (vision + llm threads); this process may use {len(allowed)}")
    return tuple(allowed[: args.vision_threads]), tuple(allowed[args.vision_threads : needed])


if __name__ == "__main__":
    raise SystemExit(main())
