"""An S3-compatible server on loopback (moto) for the demo and the tests: the real wire protocol, no cloud.

The standard AWS variables point at it while it runs (and are restored after), so every reader and writer — fsspec,
boto3, Ray workers started afterwards — reaches it exactly as they would reach S3.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager

AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def loopback_s3(access_key: str, secret_key: str):
    """Start moto's S3 server on a free 127.0.0.1 port; yields its endpoint URL; stops it and restores the env."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per S3 request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {key: os.environ.get(key) for key in AWS_VARIABLES}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": access_key,
                       "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
