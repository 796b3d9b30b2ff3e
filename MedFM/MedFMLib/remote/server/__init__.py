"""`medfm serve`: a department's GPU server for MedFM clients (Slicer, the CLI).

FastAPI and uvicorn are needed only here (``pip install 'medfm[server]'``);
the client side uses the standard library.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import sys
from pathlib import Path

from ...errors import MedFMError

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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    app = create_app(config)
    scheme = "https" if tls_cert else "http"
    print(f"MedFM server on {scheme}://{host}:{port} offering {', '.join(config.models)}", file=sys.stderr, flush=True)
    uvicorn.run(
        app,
        host=host,
        port=port,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        log_level="info",
        # Request lines hold session ids and routes only: no image data, names or prompts.
        access_log=True,
        timeout_graceful_shutdown=5,
    )
