"""Request throughput of the batching engine against one-request-at-a-time transformers `generate`.

    python -m benchmarks.engine_throughput [--configs tiny small] [--requests 32] [--concurrency 8]
        [--repeats 1] [--threads 0]

The same requests run twice in one process: one at a time through the LLM's own `generate` on
`inputs_embeds`, and through the Engine with `--concurrency` requests in flight (a new one is
added as soon as one finishes). Requests are chat-like: 16-80 text tokens, every other one with
an image of 64 feature rows (one ViR-compressed tile) in <IMG_CONTEXT> positions, and 48-96
greedy new tokens. Both paths must produce the same tokens, which is checked and reported.

Configs: `tiny` is the embedded tiny model (real Qwen vocabulary); `small` is a random Qwen3 LLM
(hidden 1024, 6 layers, 32k vocabulary) whose decode step costs tens of milliseconds on a CPU.
On a CPU, prefill is compute-bound on both sides, so the gain comes from decode steps.

The engine runs float32 CPU linear layers through a transposed matmul that MKL handles far better
at a few rows (language_server/engine/cpu_linear.py). To show how much of the gain is that kernel
rather than batching, `generate` also runs a second time with the same kernel; both ratios are
reported ("speedup" against stock `generate`, "vs same kernel" against the second run).
Prints a table and writes JSON to benchmarks/results/. The machine may be shared: compare the
ratio measured within one run, not the times.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from benchmarks.report import write_json
from language_server.engine import cpu_linear
from language_server.engine.engine import Engine
from language_server.engine.sampling import SamplingParams
from language_server.engine.sequence import EngineOutput, EngineRequest
from language_server.model import LanguageModel
from pipeline.model.checkpoint import open_model
from pipeline.config import LanguageConfig
from pipeline.model.tiny_model import tiny_model_dir
from pipeline.model.tiny_processors import IMG_END_ID, IMG_START_ID

SMALL_LLM = dict(
    vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
    num_attention_heads=16, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
    tie_word_embeddings=False, initializer_range=0.02,
)


@dataclass
class Request:
    prompt_ids: list[int]
    image_rows: torch.Tensor | None
    max_new_tokens: int


@dataclass
class Subject:
    """A model under test and the token ids its prompts use."""

    model: LanguageModel
    text_vocab: int  # prompt text ids are drawn from [0, text_vocab)
    image_open: int
    image_close: int


def load_subject(name: str) -> Subject:
    if name == "tiny":
        model, _ = LanguageModel.from_checkpoint(open_model(str(tiny_model_dir("hf"))), "cpu", torch.float32)
        return Subject(model, IMG_START_ID - 22, IMG_START_ID, IMG_END_ID)
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3", **SMALL_LLM)
    config._attn_implementation = "sdpa"
    vocab = SMALL_LLM["vocab_size"]
    model = LanguageModel(AutoModelForCausalLM.from_config(config).eval(), image_token_id=vocab - 1)
    return Subject(model, vocab - 3, vocab - 3, vocab - 2)


def workload(subject: Subject, count: int, seed: int = 0) -> list[Request]:
    """16-80 text tokens, every other request with a 64-row image; 48-96 new tokens each."""
    generator = torch.Generator().manual_seed(seed)
    model = subject.model
    requests = []
    for i in range(count):
        text = torch.randint(0, subject.text_vocab, (16 + (37 * i) % 65,), generator=generator).tolist()
        rows = None
        if i % 2:
            rows = torch.randn(64, model.hidden_size, generator=generator) * 0.02
            image = [subject.image_open] + [model.image_token_id] * 64 + [subject.image_close]
            text = text[:8] + image + text[8:]
        requests.append(Request(text, rows, 48 + (13 * i) % 49))
    return requests


@torch.inference_mode()
def run_generate(model: LanguageModel, requests: list[Request]) -> tuple[float, list[list[int]]]:
    """One request at a time through transformers' `generate`."""
    outputs = []
    start = time.perf_counter()
    for request in requests:
        ids = torch.tensor(request.prompt_ids)
        embeds = _embeds(model, ids, request.image_rows).unsqueeze(0)
        out = model.causal_lm.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=request.max_new_tokens, min_new_tokens=request.max_new_tokens,
            do_sample=False, pad_token_id=0,
        )
        outputs.append(out[0].tolist())
    return time.perf_counter() - start, outputs


def _embeds(model: LanguageModel, ids: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings with the image rows in the <IMG_CONTEXT> positions: what the engine feeds the model."""
    embeds = model.causal_lm.get_input_embeddings()(ids.to(model.device))
    if rows is not None:
        embeds[ids.to(model.device) == model.image_token_id] = rows.to(model.device, embeds.dtype)
    return embeds


def run_engine(engine: Engine, requests: list[Request], concurrency: int) -> tuple[float, list[list[int]], int]:
    """Closed loop: `concurrency` requests in flight, the next one added when one finishes."""
    tokens: list[list[int]] = [[] for _ in requests]
    finished = [False] * len(requests)
    next_index = 0

    def sink_for(index: int):
        def sink(output: EngineOutput) -> None:
            if output.error is not None:
                raise RuntimeError(f"request {index} failed") from output.error
            tokens[index] += output.token_ids
            finished[index] = output.finished

        return sink

    def add(index: int) -> None:
        r = requests[index]
        params = SamplingParams(max_new_tokens=r.max_new_tokens, ignore_eos=True)
        engine.add_request(EngineRequest(f"r{index}", r.prompt_ids, params, r.image_rows), sink_for(index))

    steps = 0
    start = time.perf_counter()
    while not all(finished):
        while next_index < len(requests) and next_index - sum(finished) < concurrency:
            add(next_index)
            next_index += 1
        engine.step()
        steps += 1
    return time.perf_counter() - start, tokens, steps


def bench(name: str, count: int, concurrency: int, repeats: int, tokenizer) -> dict:
    """`repeats` rounds of (generate, engine) on the same requests; the two alternate which goes
    first so that drift in the machine's load hits both."""
    subject = load_subject(name)
    model = subject.model
    requests = workload(subject, count)
    warmup = workload(subject, 2, seed=1)
    for r in warmup:
        r.max_new_tokens = 4
    config = LanguageConfig(num_kv_blocks=64 * concurrency, max_num_seqs=concurrency, dtype="float32")

    def generate_round(same_kernel: bool = False) -> tuple[float, list[list[int]]]:
        model.causal_lm.set_attn_implementation("sdpa")  # the engine switched it to paged attention
        with cpu_linear.enabled() if same_kernel else contextlib.nullcontext():
            run_generate(model, warmup)
            return run_generate(model, requests)

    def engine_round() -> tuple[float, list[list[int]], int]:
        engine = Engine(model, tokenizer, config)
        run_engine(engine, warmup, concurrency)
        return run_engine(engine, requests, concurrency)

    rounds = []
    for index in range(repeats):
        if index % 2 == 0:
            generate_s, expected = generate_round()
            engine_s, got, steps = engine_round()
            same_kernel_s, _ = generate_round(same_kernel=True)
        else:
            same_kernel_s, _ = generate_round(same_kernel=True)
            engine_s, got, steps = engine_round()
            generate_s, expected = generate_round()
        rounds.append(
            {
                "generate_s": generate_s,
                "generate_same_kernel_s": same_kernel_s,
                "engine_s": engine_s,
                "engine_steps": steps,
                "speedup": generate_s / engine_s,
                "speedup_vs_same_kernel": same_kernel_s / engine_s,
                "identical_tokens": sum(a == b for a, b in zip(expected, got)),
            }
        )
    speedups = sorted(r["speedup"] for r in rounds)
    median = rounds[[r["speedup"] for r in rounds].index(speedups[len(speedups) // 2])]
    return {
        "config": name,
        "requests": count,
        "concurrency": concurrency,
        "prompt_tokens": sum(len(r.prompt_ids) for r in requests),
        "output_tokens": sum(r.max_new_tokens for r in requests),
        "generate_req_per_s": count / median["generate_s"],
        "engine_req_per_s": count / median["engine_s"],
        "speedup": median["speedup"],
        "speedup_vs_same_kernel": median["speedup_vs_same_kernel"],
        "speedup_range": [speedups[0], speedups[-1]],
        "identical_tokens": min(r["identical_tokens"] for r in rounds),
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="rounds per config; the median round is reported")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="torch CPU threads for both sides (0 = torch's default, every core). On a machine busy with "
        "other work use 1: threads beyond the free cores turn into spin-waits that swamp the comparison",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("hf"))
    rows = [bench(name, args.requests, args.concurrency, args.repeats, tokenizer) for name in args.configs]

    print(f"\n{'config':<8}{'requests':>9}{'conc.':>6}{'generate req/s':>16}{'engine req/s':>14}"
          f"{'speedup':>9}{'range':>14}{'vs same kernel':>16}{'same tokens':>13}")
    for r in rows:
        low, high = r["speedup_range"]
        print(f"{r['config']:<8}{r['requests']:>9}{r['concurrency']:>6}{r['generate_req_per_s']:>16.3f}"
              f"{r['engine_req_per_s']:>14.3f}{r['speedup']:>8.2f}x{low:>7.2f}-{high:.2f}x"
              f"{r['speedup_vs_same_kernel']:>15.2f}x{r['identical_tokens']:>8}/{r['requests']}")
    path = write_json("engine_throughput", {"results": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
