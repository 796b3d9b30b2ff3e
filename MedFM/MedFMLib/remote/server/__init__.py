"""`medfm serve`: a department's GPU server for MedFM clients (Slicer, the CLI).

FastAPI and uvicorn are needed only here (``pip install 'medfm[server]'``);
the client side uses the standard library.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from ...errors import MedFMError
from ..protocol import is_loopback

TOKEN_FILE = "server_token"
MIN_TOKEN_LENGTH = 16


def load_or_create_token(home: Path) -> tuple[str, bool]:
    """The server's saved token, or a new one saved for next time (readable by its owner only); True if new."""
    path = home / TOKEN_FILE
    if path.is_file():
        token = path.read_text(encoding="utf-8").strip()
        if len(token) >= MIN_TOKEN_LENGTH:
            return token, False
    home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    return token, True


def check_token(token: str) -> str:
    token = token.strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise MedFMError(f"A server token needs at least {MIN_TOKEN_LENGTH} characters; leave it out for a random one.")
    return token


def serve(config, host: str = "127.0.0.1", port: int = 8000, tls_cert: str | None = None, tls_key: str | None = None):
    """Run the server until interrupted (uvicorn, one process: the models and the queue are shared)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise MedFMError(f"`medfm serve` needs {exc.name}; install it with: pip install 'medfm[server]'") from None
    from .app import create_app

    if bool(tls_cert) != bool(tls_key):
        raise MedFMError("TLS needs both --tls-cert and --tls-key.")
    for path in (tls_cert, tls_key):
        if path and not Path(path).is_file():
            raise MedFMError(f"TLS file {path} does not exist.")
    if not tls_cert and not is_loopback(host):
        print(
            f"medfm serve: warning: serving on {host} without TLS: the token and the images cross the network "
            "unencrypted; give --tls-cert and --tls-key.",
            file=sys.stderr,
        )
    from .guard import KEEP_ALIVE_SECONDS, GuardedH11Protocol, log_config, raise_file_limit

    app = create_app(config)
    # Connections beyond what the process can keep open are closed at once, never left to fail in accept().
    GuardedH11Protocol.max_connections = raise_file_limit()
    scheme = "https" if tls_cert else "http"
    print(f"MedFM server on {scheme}://{host}:{port} offering {', '.join(config.models)}", file=sys.stderr, flush=True)
    uvicorn.run(
        app,
        host=host,
        port=port,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        http=GuardedH11Protocol,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        log_config=log_config(),
        log_level="info",
        # The app logs each request itself, with session ids shortened (a whole id grants access).
        access_log=False,
        timeout_graceful_shutdown=5,
    )
