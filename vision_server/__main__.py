"""python -m vision_server --config configs/tiny.yaml [--replica N] [--set key=value ...]"""

from __future__ import annotations

import signal
import sys

from pipeline.runtime.logs import setup_logging
from pipeline.runtime.process import configure_torch, server_args, start_metrics


def main(argv: list[str] | None = None) -> int:
    args, config = server_args("python -m vision_server", "Run one DvD vision server.", argv, replica=True)
    setup_logging(f"vision-{args.replica}", config.log_level)
    configure_torch(config.vision.threads, config.vision.cpus_of(args.replica))

    from pipeline.transport import TransportError
    from vision_server.server import VisionServer

    try:
        server = VisionServer(config, replica=args.replica)
    except TransportError as exc:
        print(f"error: {config.source}: transport: {exc}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    start_metrics(config.vision.host, config.vision.metrics_port, args.replica)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
