"""The `adaptd` command: `adaptd serve` starts the service; `adaptd replay` streams samples
through running services and reports what they did."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from service.replay import STREAMS_HELP, add_arguments, replay_command


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adaptd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the configured model over HTTP")
    serve.add_argument("--config", type=Path, help="TOML config file (or ADAPTD_CONFIG)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8000)")
    serve.add_argument("--store", help="'memory' or a redis:// URL")
    serve.add_argument("--adapter",
                       help="auto (the default: bn for a convolutional model, else none), "
                       "none, bn, tent, eta, eata, psmt, rotta, sar, each optionally with +adanpc")
    serve.add_argument("--model-factory", help="package.module:function returning the nn.Module")
    serve.add_argument("--weights", type=Path, help="safetensors weights for the model")
    replay = commands.add_parser(
        "replay", help="stream samples through running services, labels back late, and "
        "report error, coverage, set size, drift alarms and learning rate",
        description="Replay a stream through running services and report what they did.",
        epilog=STREAMS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(replay)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve_command(args)
    elif args.command == "replay":
        replay_command(args)


def serve_command(args: argparse.Namespace) -> None:
    import uvicorn

    from service.app import create_app
    from service.settings import load_settings

    overrides: dict[str, object] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.store is not None:
        overrides["store"] = {"url": args.store}
    if args.adapter is not None:
        overrides["adapter"] = {"name": args.adapter}
    model: dict[str, object] = {}
    if args.model_factory is not None:
        model["factory"] = args.model_factory
    if args.weights is not None:
        model["weights"] = args.weights
    if model:
        overrides["model"] = model
    try:
        settings = load_settings(args.config, **overrides)
    except (ValidationError, FileNotFoundError) as exc:
        sys.exit(f"adaptd: invalid configuration:\n{exc}")
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        http, loop = server_parts(settings.http, settings.loop)
    except ImportError as exc:
        sys.exit(f"adaptd: invalid configuration:\n{exc}")
    logging.getLogger("adaptd").info("HTTP parser %s, event loop %s", http, loop)
    # a model or adapter that cannot start is reported by the app's lifespan, and uvicorn exits 3.
    # Idle keep-alive connections close after keep_alive_s; beyond max_connections open
    # connections (or requests being handled) uvicorn answers new requests 503 at once; a body
    # that is late is the app's (body_timeout_s, 408)
    # a request line and headers over MAX_HEAD_BYTES are refused by either parser (h11: 400,
    # httptools: 431); uvicorn bounds only h11's by itself
    from service.http_head import MAX_HEAD_BYTES, bounded_head

    protocol: type[asyncio.Protocol] | str = bounded_head() if http == "httptools" else http
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                http=protocol, loop=loop, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                log_level=settings.log_level, timeout_graceful_shutdown=10,
                timeout_keep_alive=settings.keep_alive_s,
                limit_concurrency=settings.max_connections)


def server_parts(http: str, loop: str) -> tuple[str, str]:
    """The HTTP parser and event loop uvicorn is to run, `auto` resolved as uvicorn resolves it
    (the C one where it imports); raises ImportError, saying which setting, where one named
    does not import."""
    chosen = []
    for key, value, fast, fallback in (("http", http, "httptools", "h11"),
                                       ("loop", loop, "uvloop", "asyncio")):
        if value in ("auto", fast):
            try:
                importlib.import_module(fast)
            except ImportError:
                if value == fast:
                    raise ImportError(f"{key} = {fast!r}, but {fast} does not import here; "
                                      f"install it, or set {key} = 'auto' or {fallback!r}"
                                      ) from None
                value = fallback
            else:
                value = fast
        chosen.append(value)
    return chosen[0], chosen[1]


if __name__ == "__main__":
    main()
