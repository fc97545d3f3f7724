"""python -m language_server --config configs/tiny.yaml [--set key=value ...]"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from pipeline.config import ConfigError, load_config, parse_override
from pipeline.logs import setup_logging
from pipeline.process import configure_torch, start_metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m language_server", description="Run the DvD language server.")
    parser.add_argument("--config", required=True, help="deployment YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, dict(parse_override(s) for s in args.set))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging("language", config.log_level)
    configure_torch(config.language.threads)
    start_metrics(config.language.host, config.language.metrics_port)

    from language_server.server import serve

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
