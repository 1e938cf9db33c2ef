"""`bitfold serve`: the OpenAI-compatible HTTP server.

The server listens at once and loads the model in its engine thread (requests get 503 until
it is ready); the status line with the KV capacity follows when it is. A model that fails to
load stops the server with the usual one-line error and exit status 2. SIGTERM (or Ctrl-C)
stops accepting connections, lets in-flight requests finish for up to --shutdown-timeout
seconds, cancels the rest (freeing their KV blocks) and stops the engine thread; after SIGTERM
the exit status is 0.

fastapi and uvicorn are imported inside the command, so `bitfold generate` never needs them.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from typing import Callable

from bitfold.config import EngineConfig, add_dataclass_args, dataclass_from_args
from bitfold.errors import BitfoldError

# Defaults shared with `create_app` (server/app.py imports fastapi; this module must not).
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # a 128K-token prompt is ~0.5-1.5 MB of JSON
DEFAULT_KEEPALIVE_S = 5.0



def extras_hint() -> str:
    """The command that installs the serve extras into the environment bitfold runs from: that
    Python's own pip (a bare `pip` may be another environment's), and the source checkout when
    bitfold is installed from one (`pip install -e`)."""
    import os

    pip = os.path.join(os.path.dirname(sys.executable), "pip")
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))  # src/bitfold/server/../../..
    if os.path.isfile(os.path.join(root, "pyproject.toml")):
        where = "." if os.path.abspath(os.getcwd()) == root else root
        target = f"-e '{where}[serve]'"
    else:
        target = "'bitfold[serve]'"
    return f"bitfold serve needs its extras (fastapi, uvicorn): {pip} install {target}"


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (0 picks a free one)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    g.add_argument("--served-model-name", default=None,
                   help="the name clients pass as `model` (default: the model file or folder's name)")
    g.add_argument("--max-queue", type=int, default=1024,
                   help="most requests waiting for a slot in the running batch (--max-num-seqs); one more is "
                        "refused with 429")
    g.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="largest request body; a larger one is refused with 413 before it is read")
    g.add_argument("--sse-keepalive", type=float, default=DEFAULT_KEEPALIVE_S, metavar="SECONDS",
                   help="a stream that has nothing to send for this long (e.g. queued behind a full batch) "
                        "gets an SSE comment with its place in the queue")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may take to finish after SIGTERM before they are cancelled")
    add_dataclass_args(p, EngineConfig)
    p.set_defaults(func=cmd_serve)


def _status_line(engine, name: str) -> str:
    kv_tokens = engine.pool.num_blocks * engine.config.block_size
    return (f"[bitfold] serving '{name}' ({engine.model_path}) on {engine.device} ({str(engine.dtype)[6:]}): "
            f"KV cache {kv_tokens} tokens ({engine.pool.num_blocks} blocks x {engine.config.block_size}), "
            f"max_model_len {engine.max_model_len}")


def cmd_serve(args: argparse.Namespace, build_engine: Callable[[EngineConfig], object] | None = None) -> None:
    """Serve until SIGTERM. `build_engine(config)` makes the LLMEngine in the engine thread
    (default: `LLMEngine(config)`, the model at --model); benchmarks/serve_random.py passes one
    that builds a random-weight model of a real shape."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise BitfoldError(extras_hint()) from e
    from bitfold.engine import LLMEngine
    from bitfold.server.app import ServerState, create_app
    from bitfold.server.async_engine import AsyncEngine

    if args.max_queue < 1:
        raise BitfoldError(f"invalid --max-queue {args.max_queue}: expected an integer >= 1")
    if args.max_request_bytes < 1024:
        raise BitfoldError(f"invalid --max-request-bytes {args.max_request_bytes}: expected at least 1024")
    if not args.sse_keepalive > 0:
        raise BitfoldError(f"invalid --sse-keepalive {args.sse_keepalive}: expected a number of seconds > 0")
    if not 0 <= args.port < 65536:
        raise BitfoldError(f"invalid --port {args.port}: expected 0..65535")
    config = dataclass_from_args(EngineConfig, args)
    config.validate()
    build_engine = build_engine or LLMEngine
    engine = AsyncEngine(lambda: build_engine(config), max_queue=args.max_queue)
    app = create_app(engine, model_name=args.served_model_name, api_key=args.api_key,
                     max_request_bytes=args.max_request_bytes, keepalive_s=args.sse_keepalive)
    # uvicorn cancels what still runs after its grace period, mid-response; we end those
    # requests ourselves at --shutdown-timeout so every response closes properly, and keep
    # uvicorn's cancel as a backstop a little later.
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                               access_log=args.verbose, timeout_graceful_shutdown=args.shutdown_timeout + 5,
                               lifespan="on")
    server = _server_class(uvicorn)(uv_config, on_shutdown=lambda: asyncio.get_running_loop().call_later(
        args.shutdown_timeout, engine.cancel_all, "the server is shutting down"))

    def announce() -> None:
        """Print where it listens once the socket is bound, and the model once it is loaded."""
        while not server.started_event.wait(0.1) and not server.should_exit:
            pass
        if server.started:
            host, port = server.servers[0].sockets[0].getsockname()[:2]
            print(f"[bitfold] listening on http://{host}:{port} (OpenAI API under /v1; /health, /metrics); "
                  "loading the model...", file=sys.stderr, flush=True)
        engine.loaded.wait()
        if engine.load_error is not None:
            server.should_exit = True  # cmd_serve raises it once uvicorn is down
            return
        state: ServerState = app.state.server
        print(_status_line(engine.engine, state.model_name), file=sys.stderr, flush=True)

    threading.Thread(target=announce, name="bitfold-announce", daemon=True).start()
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind (the port is taken...), after logging why
        server.started = False
    if isinstance(engine.load_error, BitfoldError):
        raise engine.load_error
    if engine.load_error is not None:
        raise BitfoldError(f"loading the model failed: {engine.load_error!r}") from engine.load_error
    if not server.started:
        raise BitfoldError(f"could not listen on {args.host}:{args.port} (see the message above)")
    print("[bitfold] server stopped", file=sys.stderr, flush=True)


def _server_class(uvicorn):
    class Server(uvicorn.Server):
        """uvicorn's Server, plus a `started_event` and an `on_shutdown` hook; after a graceful shutdown on SIGTERM it
        returns instead of re-raising the signal (uvicorn does, which would kill the process
        with status 143 after the clean shutdown)."""

        def __init__(self, config, on_shutdown):
            super().__init__(config)
            self.started_event = threading.Event()
            self.on_shutdown = on_shutdown

        async def shutdown(self, sockets=None):
            self.on_shutdown()
            await super().shutdown(sockets)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            self.started_event.set()

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                captured.pop()

    return Server
