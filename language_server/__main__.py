"""python -m language_server --config configs/tiny.yaml [--set key=value ...]"""

from __future__ import annotations

import asyncio
import signal
import sys

from pipeline.logs import setup_logging
from pipeline.process import configure_torch, server_args, start_metrics


def main(argv: list[str] | None = None) -> int:
    _, config = server_args("python -m language_server", "Run the DvD language server.", argv)
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
