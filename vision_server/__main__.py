"""python -m vision_server --config configs/tiny.yaml [--replica N] [--set key=value ...]"""

from __future__ import annotations

import argparse
import signal
import sys

from pipeline.config import ConfigError, load_config, parse_override
from pipeline.logs import setup_logging
from pipeline.process import configure_torch, start_metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vision_server", description="Run one DvD vision server.")
    parser.add_argument("--config", required=True, help="deployment YAML file")
    parser.add_argument("--replica", type=int, default=0, help="replica index (port offset)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, dict(parse_override(s) for s in args.set))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(f"vision-{args.replica}", config.log_level)
    configure_torch(config.vision.threads)

    from vision_server.server import VisionServer

    server = VisionServer(config, replica=args.replica)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    start_metrics(config.vision.host, config.vision.metrics_port, args.replica)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
