"""A local S3 server for tests: moto's server mode, in its own process, on 127.0.0.1 and a free port.

Its own process, not moto's ``ThreadedMotoServer`` in the test process: DALI's ``s3://`` reads (the AWS
C++ SDK inside libdali) block the calling Python thread without releasing the GIL, so a server thread
in the same process cannot answer and DALI fails with "curlCode: 28, Timeout was reached".

DALI reads ``AWS_ENDPOINT_URL`` once per process, on its first ``s3://`` access: tests that read through
DALI must all use one endpoint, hence one server per pytest session (the ``s3_server`` fixture in
conftest.py) and a fresh bucket per test (the ``s3`` fixture).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

ACCESS_KEY, SECRET_KEY, REGION = "testing", "testing", "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """``python -m moto.server`` on 127.0.0.1; ``env`` adds variables to its environment (e.g.
    ``INITIAL_NO_AUTH_ACTION_COUNT=0`` makes it check credentials, so every key is refused)."""

    def __init__(self, env: dict[str, str] | None = None):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._env = env or {}
        self._proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()

    def start(self, timeout_s: float = 60.0) -> "S3Server":
        env = {**os.environ, **self._env}
        for name in [k for k in env if k.startswith("AWS_")]:
            env.pop(name)  # the server needs none; keep the caller's credentials out of it
        self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                      stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"moto server exited with {self._proc.returncode}: "
                                   f"{self._log.read()[-2000:].decode(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not listen on {self.endpoint} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None

    def env(self) -> dict[str, str]:
        """The environment a client (boto3, DALI) needs to use this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)


@dataclass
class S3Bucket:
    """A fresh bucket on the session's server; ``url(prefix)`` is ``s3://<bucket>/<prefix>``."""

    server: S3Server
    name: str
    client: Any

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.name}/{prefix}".rstrip("/")

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()


def new_bucket(server: S3Server) -> S3Bucket:
    client = server.client()
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return S3Bucket(server, name, client)
