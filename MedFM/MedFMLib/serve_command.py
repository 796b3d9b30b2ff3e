"""`medfm serve`: its options and how they become a server (plain uvicorn, or Ray with --ray)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import MedFMError


def add_parser(commands) -> None:
    from .cli_options import add_runtime_options

    serve = commands.add_parser("serve", help="run a MedFM server for Slicer and the CLI (needs medfm[server])")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token-file", help="a file holding the clients' token (default: $MEDFM_TOKEN, else one "
                       "made at first start and saved)")  # fmt: skip
    serve.add_argument("--token", help="the token itself: other users see it in `ps`; prefer --token-file")
    serve.add_argument("--tls-cert", help="TLS certificate (PEM); with --tls-key the server speaks HTTPS")
    serve.add_argument("--tls-key", help="TLS private key (PEM)")
    serve.add_argument("--models", help="comma-separated models to offer (default: classic and every downloaded one)")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 or mps")
    add_runtime_options(serve)
    serve.add_argument("--random-weights", action="store_true", help="full-size random-weight models (benchmarks)")
    serve.add_argument("--session-ttl", type=float, default=1800.0, help="seconds an idle session lives (default 1800)")
    serve.add_argument("--max-session-mb", type=int, default=4096, help="memory limit of one session (default 4096)")
    serve.add_argument("--max-total-mb", type=int, default=16384, help="memory limit of all sessions (default 16384)")
    serve.add_argument("--cache-mb", type=int, default=1024, help="embedding cache of each session (default 1024)")
    serve.add_argument("--max-upload-mb", type=int, default=1024, help="largest compressed upload (default 1024)")
    serve.add_argument("--max-batch", type=int, default=4, help="encodes batched together on the GPU (default 4)")
    serve.add_argument("--max-objects", type=int, default=64, help="objects per session (default 64)")
    serve.add_argument("--max-prompts", type=int, default=2000, help="points and boxes per session (default 2000)")
    serve.add_argument("--max-undo", type=int, default=50, help="undo steps kept per session (default 50)")
    serve.add_argument("--max-jobs", type=int, default=2, help="propagations running at once, in all (default 2)")
    serve.add_argument("--publish-finetunes", action="store_true", help="offer the models that fine-tuning "
                       "jobs make here to every user at once (default: kept in the store, not served)")  # fmt: skip
    cluster = serve.add_argument_group("Ray (needs medfm[ray]): many GPUs and machines behind one address")
    cluster.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", help="run sessions on a Ray cluster: "
                         "join the one at ADDRESS, or alone, start one here for the life of the server")  # fmt: skip
    cluster.add_argument("--gpus-per-session", type=float, help="share of a GPU each session's actor takes "
                         "(default 0.25 when the cluster has GPUs, else 0)")  # fmt: skip
    cluster.add_argument("--replicas", type=int, default=1, help="front-end replicas (stateless; default 1)")
    cluster.add_argument("--session-start-timeout", type=float, default=60.0, help="seconds a new session may wait "
                         "for a GPU share and its model before the server answers 503 (default 60)")  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    from .home import default_home
    from .models.store import ModelStore
    from .remote.server import check_token, load_or_create_token, serve
    from .remote.server.app import ServerConfig

    if args.token:
        print("medfm serve: warning: --token shows the token to every user of this computer (`ps`); "
              "use --token-file or $MEDFM_TOKEN.", file=sys.stderr)  # fmt: skip
    token = args.token or read_token_file(args.token_file) or os.environ.get("MEDFM_TOKEN")
    if token:
        token = check_token(token)
    else:
        token, created = load_or_create_token(default_home())
        path = default_home() / "server_token"
        if created:
            print(f"MedFM server token (shown this once; saved in {path}, readable by you only):\n  {token}")
            print("Give it to this server's users: Slicer's MedFM module (Remote server) or --token / $MEDFM_TOKEN.")
        else:
            print(f"Using the token saved in {path} at first start.", flush=True)
    store = ModelStore()
    if args.models:
        models = [name.strip() for name in args.models.split(",") if name.strip()]
    else:
        models = [n for n, info in store.models().items() if not info.needs_weights or store.is_ready(n)]
    if not (1 <= args.port <= 65535):
        raise MedFMError(f"--port {args.port} is not a port number (1 to 65535).")
    limits = (args.session_ttl, args.max_session_mb, args.max_total_mb, args.cache_mb, args.max_upload_mb)
    counts = (args.max_batch, args.max_objects, args.max_prompts, args.max_jobs)
    if min(limits) <= 0 or min(counts) < 1 or args.max_undo < 0:
        raise MedFMError("--session-ttl, the memory limits, --max-upload-mb and the --max-* counts must be positive.")
    if not args.cache_mb < args.max_session_mb <= args.max_total_mb:
        raise MedFMError("Give --cache-mb < --max-session-mb <= --max-total-mb: each session's cache counts in both.")
    config = ServerConfig(
        token=token,
        models=models,
        device=args.device,
        runtime=args.runtime,
        fast=args.fast,
        zoom=args.zoom,
        random_weights=args.random_weights,
        session_ttl_seconds=args.session_ttl,
        max_session_mb=args.max_session_mb,
        max_total_mb=args.max_total_mb,
        cache_mb=args.cache_mb,
        max_upload_mb=args.max_upload_mb,
        max_batch=args.max_batch,
        max_objects=args.max_objects,
        max_prompts=args.max_prompts,
        max_undo=args.max_undo,
        max_jobs=args.max_jobs,
        publish_finetunes=args.publish_finetunes,
    )
    if args.ray:
        from .scale.serving import RayOptions, serve_on_ray

        options = RayOptions(
            address=None if args.ray == "local" else args.ray, gpus_per_session=args.gpus_per_session,
            replicas=args.replicas, start_timeout_seconds=args.session_start_timeout,
        )  # fmt: skip
        serve_on_ray(config, options, host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key)
        return 0
    serve(config, host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key)
    return 0


def read_token_file(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise MedFMError(f"Cannot read the token file {path}: {exc.strerror}.") from None
