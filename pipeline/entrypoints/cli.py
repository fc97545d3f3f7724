"""The `dvd` command (also `python -m pipeline`): serve, chat, info, tiny."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from pipeline.config import ConfigError, parse_override
from pipeline.config.fields import wildcard
from pipeline.runtime.secrets import API_KEY_ENV


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dvd", description="Decoupled vision-language serving for InternVL.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start both servers from a YAML deployment file")
    serve.add_argument("--config", default="configs/tiny.yaml")
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    serve.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the servers to be healthy")

    chat = commands.add_parser("chat", help="ask a running server; the answer streams to stdout")
    chat.add_argument("prompt", help="the question")
    chat.add_argument("--address", default="127.0.0.1:50051")
    chat.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    chat.add_argument("--video", action="append", default=[], help="video file (repeatable)")
    chat.add_argument("--system", default="", help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=None)
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--top-p", type=float, default=None)
    chat.add_argument("--top-k", type=int, default=None)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--stop", action="append", default=[])
    chat.add_argument("--api-key", default=os.environ.get(API_KEY_ENV, ""), help=f"default: ${API_KEY_ENV}")
    _tls_arguments(chat)
    chat.add_argument("--timings", action="store_true", help="print usage and stage timings to stderr")

    info = commands.add_parser("info", help="describe the model a server is serving")
    info.add_argument("--address", default="127.0.0.1:50051")
    info.add_argument("--api-key", default=os.environ.get(API_KEY_ENV, ""), help=f"default: ${API_KEY_ENV}")
    _tls_arguments(info)

    tiny = commands.add_parser("tiny", help="generate the tiny default model (both formats) and print its location")
    tiny.add_argument("--family", help="instead, a random checkpoint of this published family (docs/checkpoints.md)")
    keys = commands.add_parser("keys", help="make a CurveZMQ key pair for transport.auth: curve; prints the key file")
    keys.add_argument("directory", help="where to write it (made private)")

    args = parser.parse_args(argv)
    try:
        return {"serve": _serve, "chat": _chat, "info": _info, "tiny": _tiny, "keys": _keys}[args.command](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls", action="store_true",
                        help="TLS, trusting the system's root certificates (a server with a public certificate)")
    parser.add_argument("--tls-ca", default=None, help="PEM CA the server's certificate must chain to (turns TLS on)")
    parser.add_argument("--tls-cert", default=None, help="PEM client certificate, for servers that require mutual TLS")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")


def _connect(args: argparse.Namespace):
    from pipeline.client import DvDClient

    return DvDClient(
        args.address, api_key=args.api_key, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls=args.tls,
    )


def _serve(args: argparse.Namespace) -> int:
    from pipeline.entrypoints.launch import Deployment, LaunchError, StartInterrupted
    from pipeline.entrypoints.supervisor import Supervisor

    deployment = Deployment(args.config, dict(parse_override(s) for s in args.set))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"dvd: starting {', '.join(s.name for s in deployment.servers)} from {args.config} ...", flush=True)
    try:
        deployment.start(timeout_s=args.timeout, cancel=stop)
    except StartInterrupted:
        print("dvd: start-up interrupted; servers stopped", file=sys.stderr)
        return 130
    except LaunchError as exc:
        print(f"dvd: start-up failed: {exc}", file=sys.stderr)
        return 1
    print(_ready_message(deployment), flush=True)
    supervisor = Supervisor(deployment, stop, lambda line: print(line, file=sys.stderr, flush=True))
    try:
        while not stop.wait(0.5):
            reason = supervisor.check()
            if reason is not None:
                print(f"dvd: {reason}; stopping", file=sys.stderr)
                return 1
    finally:
        print("dvd: stopping servers ...", flush=True)
        deployment.stop()
        print("dvd: stopped", flush=True)
    return 0


def _ready_message(deployment) -> str:
    config = deployment.config
    sample = _sample_image()
    python = Path(sys.executable)
    try:
        python = python.relative_to(Path.cwd())
    except ValueError:
        pass
    flags = _tls_flags(config.language)  # the API key is never printed: the commands read it from $DVD_API_KEY
    address = deployment.address
    if config.language.tls_cert and wildcard(config.language.host):  # a certificate names no wildcard address
        address = f"localhost:{config.language.grpc_port}"
    lines = [
        f"dvd: ready - model {config.model.name or config.model.path} ({config.mode})",
        f"  gRPC API      {deployment.address}  (dvd.v1.Generation{_tls_note(config.language)}; health and reflection on)",
    ]
    if config.mode == "decoupled" and config.language.vision_servers:
        lines.append(f"  vision        external: {', '.join(config.language.vision_servers)}")
    elif config.mode == "decoupled":
        lines.append(f"  vision server {', '.join(config.vision_endpoints)}")
    if config.language.metrics_port:
        lines.append(f"  metrics       http://{config.language.host}:{config.language.metrics_port}/metrics")
    if deployment.http_url:
        lines.append(f"  HTTP API      {deployment.http_url}/v1  (OpenAI-compatible{_tls_note(config.language)}; "
                     "/v1/chat/completions, /v1/models, /health, /metrics)")
    lines += [
        "",
        "Try, in another terminal:",
        f"  {python} -m pipeline chat --address {address}{flags} --image {sample} "
        '"What is in this image?"',
    ]
    if deployment.http_url:
        lines += ["or, over HTTP:", f"  {curl_command(deployment)}"]
    if config.language.api_key:
        lines.append(f"(with {API_KEY_ENV} set to language.api_key: the commands read the key from it)")
    lines += [
        "",
        "Ctrl-C stops both servers.",
    ]
    return "\n".join(lines)


def curl_command(deployment) -> str:
    """A shell command that asks the HTTP API about a small generated PNG, sent as a base64 data: URL."""
    lc = deployment.config.language
    png = _sample_png()
    flags = ["-sS", f"{deployment.http_url}/v1/chat/completions", "-H", "Content-Type: application/json"]
    if lc.api_key:
        flags += ["-H", f"Authorization: Bearer ${API_KEY_ENV}"]  # expanded by the shell, never printed
    if lc.tls_cert:
        flags += ["--cacert", lc.tls_cert] + (["--cert", "CLIENT.pem", "--key", "CLIENT.key"] if lc.tls_client_ca else [])
    model = deployment.config.model.name or ("tiny" if deployment.config.model.path == "tiny" else Path(deployment.config.model.path).name)
    marker = "@@IMAGE@@"
    body = json.dumps({
        "model": model,
        "max_tokens": 32,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{marker}"}},
            {"type": "text", "text": "What is in this image?"},
        ]}],
    })
    before, after = body.split(marker)
    image = '"$(base64 < ' + shlex.quote(str(png)) + " | tr -d '\\n')\""
    quoted = [f'"{flag}"' if API_KEY_ENV in flag else shlex.quote(flag) for flag in flags]
    return " ".join(["curl", *quoted, "-d", shlex.quote(before) + image + shlex.quote(after)])


def _sample_png() -> Path:
    """A small generated PNG (a few kB: its base64 fits in one command-line argument)."""
    from pipeline.model.tiny_model import cache_root

    path = cache_root() / "samples" / "gradient.png"
    if not path.exists():
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        red = Image.linear_gradient("L").resize((96, 96))
        Image.merge("RGB", (red, red.rotate(90), red.rotate(180))).save(path)
    return path


def _tls_note(lc) -> str:
    from pipeline.runtime.tls import tls_mode

    return {"off": "", "on": " over TLS", "mutual": " over mutual TLS"}[tls_mode(lc)]


def _tls_flags(lc) -> str:
    """The client flags that reach a TLS API: its own certificate as the root of trust and, with
    mutual TLS, a client certificate signed by tls_client_ca (placeholders: only its owner has one)."""
    if not lc.tls_cert:
        return ""
    flags = f" --tls-ca {shlex.quote(lc.tls_cert)}"
    if lc.tls_client_ca:
        flags += " --tls-cert CLIENT.pem --tls-key CLIENT.key"
    return flags


def _sample_image() -> Path:
    """A photo to try the servers with, written once into the cache."""
    from pipeline.model.tiny_model import cache_root

    path = cache_root() / "samples" / "astronaut.jpg"
    if not path.exists():
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from skimage import data

            picture = Image.fromarray(data.astronaut())
        except ImportError:
            picture = Image.linear_gradient("L").convert("RGB").resize((640, 480))
        picture.save(path, quality=90)
    return path


def _chat(args: argparse.Namespace) -> int:
    import grpc

    from pipeline.client import image, message, sampling, video

    parts = [image(p) for p in args.image] + [video(p) for p in args.video] + [args.prompt]
    messages = ([message("system", args.system)] if args.system else []) + [message("user", *parts)]
    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
    }
    params = sampling(**{k: v for k, v in options.items() if v is not None}, stop=args.stop)
    try:
        with _connect(args) as client:
            for event in client.stream(messages, params):
                if event.HasField("delta"):
                    sys.stdout.write(event.delta.text)
                    sys.stdout.flush()
                else:
                    result = event.result
                    print()
                    if args.timings:
                        print(f"[{result.usage}]\n[{result.timings}]", file=sys.stderr)
    except grpc.RpcError as exc:
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


def _info(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        print(client.model_info())
    return 0


def _keys(args: argparse.Namespace) -> int:
    from pipeline.wire.curve import generate_keys

    print(generate_keys(args.directory))
    return 0


def _tiny(args: argparse.Namespace) -> int:
    from pipeline.model.families import FAMILIES, TINY_FAMILY, family_dir

    family = args.family or TINY_FAMILY
    if family not in FAMILIES:
        print(f"unknown family {family!r}; families: {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    for fmt in FAMILIES[family].formats:
        print(family_dir(family) / fmt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
