"""Small object-storage helpers: parse ``s3://`` URLs, read a small object, upload a file, test existence.

Packing writes through these; loaders read ``s3://…/dataset.json`` through them. Every failure a user
can fix (no such bucket, wrong credentials, endpoint unreachable) becomes one ``UserError`` line that
names the URL, in bounded time: boto3 clients get short connect/read timeouts and few retries.

Credentials and endpoint come from the standard AWS environment, read by boto3 and by DALI alike:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``), ``AWS_REGION`` or
``AWS_DEFAULT_REGION`` (the bucket's region on AWS; any value for a local server), and for an
S3-compatible server ``AWS_ENDPOINT_URL`` (e.g. ``http://10.0.0.5:9000``).

What DALI 2.4 itself needs to read ``s3://`` shards (its readers use the AWS C++ SDK linked into libdali,
checked against a local moto server):

- ``AWS_ENDPOINT_URL`` is read **once per process**, when DALI first opens an ``s3://`` path; changing it
  later in that process has no effect. No region is needed for a custom endpoint.
- Addressing: with an endpoint that is an IP address DALI uses path-style requests
  (``http://10.0.0.5:9000/bucket/key``); with a host name it uses virtual-hosted style
  (``http://bucket.host:9000/key``), so ``<bucket>.<host>`` must resolve (``*.localhost`` does; for
  MinIO set ``MINIO_DOMAIN`` and a wildcard DNS entry) — or give the endpoint as an IP address.
  DALI has no switch to force path style.
- ``index_paths`` may be ``s3://`` URLs too. ``DALI_S3_NO_VERIFY_SSL=1`` skips TLS verification.
- ``gs://`` is read by DALI through its own ``DALI_GCS_*`` settings; writing ``gs://`` is not supported here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dali_ba.errors import UserError

# Bounded time for every call: a dead endpoint fails after about attempts x connect timeout.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
MAX_ATTEMPTS = 3
MULTIPART_BYTES = 64 * 1024 * 1024

_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden",
                 "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed"}


@dataclass(frozen=True)
class S3Url:
    """``s3://bucket/key``; ``key`` has no leading slash and may be empty (the bucket's root)."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def join(self, name: str) -> "S3Url":
        return S3Url(self.bucket, f"{self.key.rstrip('/')}/{name}" if self.key.strip("/") else name)


def is_url(path: str | Path) -> bool:
    """True for ``scheme://…`` strings (object storage), False for local paths."""
    return "://" in str(path)


def parse_s3_url(url: str) -> S3Url:
    """``s3://bucket/prefix`` → S3Url; UserError for other schemes or a missing bucket name."""
    scheme, sep, rest = str(url).partition("://")
    if not sep:
        raise UserError(f"not a URL: {url} (expected s3://bucket/prefix)")
    if scheme == "gs":
        raise UserError(f"{url}: writing to gs:// is not supported (DALI reads gs:// itself; pack to a local "
                        f"folder or s3:// and copy, e.g. with gcloud storage cp)")
    if scheme != "s3":
        raise UserError(f"{url}: unsupported storage scheme {scheme}:// (supported: s3://)")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UserError(f"{url}: no bucket name (expected s3://bucket/prefix)")
    return S3Url(bucket, key.strip("/"))


def client() -> Any:
    """A boto3 S3 client from the standard AWS environment, with short timeouts and few retries."""
    try:
        import boto3.session
        from botocore.config import Config
    except ImportError as exc:
        raise UserError("s3:// needs boto3: pip install 'dali-ba[s3]' (or pip install boto3)") from exc
    config = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                    retries={"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"})
    # A new session each time: boto3's default session keeps the credentials it first found.
    return boto3.session.Session().client("s3", config=config)


def describe_error(exc: BaseException, url: S3Url, endpoint: str | None = None) -> str:
    """One line for a boto3/botocore failure on ``url``, saying what to check."""
    from botocore import exceptions as bx

    cause = exc
    while not isinstance(cause, (bx.ClientError, bx.BotoCoreError)) and (cause.__cause__ or cause.__context__):
        cause = cause.__cause__ or cause.__context__  # boto3's S3UploadFailedError hides the ClientError
    where = f" at {endpoint}" if endpoint else ""
    if isinstance(cause, bx.NoCredentialsError):
        return f"{url}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    if isinstance(cause, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                          bx.ConnectionClosedError)):
        return f"{url}: cannot reach the S3 endpoint{where} ({type(cause).__name__}; check AWS_ENDPOINT_URL and " \
               f"the network)"
    if isinstance(cause, bx.ClientError):
        error = cause.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = " ".join(str(error.get("Message", "")).split())
        if code == "NoSuchBucket" or (code in ("404", "NotFound") and not url.key):
            return f"{url}: bucket does not exist{where}"
        if code in ("NoSuchKey", "404", "NotFound"):
            return f"{url}: no such object{where}"
        if code in _ACCESS_CODES:
            return f"{url}: access denied{where} ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY " \
                   f"and the bucket's policy"
        return f"{url}: S3 error{where}: {code} {message}".rstrip()
    return f"{url}: {' '.join(str(cause).split()) or type(cause).__name__}"


class Bucket:
    """One bucket through one client: every method turns storage errors into a UserError naming the URL."""

    def __init__(self, bucket: str):
        self.name = bucket
        self._client = client()
        self.endpoint = self._client.meta.endpoint_url

    def _fail(self, exc: BaseException, url: S3Url) -> UserError:
        return UserError(describe_error(exc, url, self.endpoint))

    def check(self) -> None:
        """UserError unless the bucket exists and these credentials may use it."""
        url = S3Url(self.name, "")
        try:
            self._client.head_bucket(Bucket=self.name)
        except Exception as exc:  # noqa: BLE001 - botocore raises many types; all are described
            raise self._fail(exc, url) from None

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is no such key (meant for small objects)."""
        url = S3Url(self.name, key)
        try:
            return self._client.get_object(Bucket=self.name, Key=key)["Body"].read()
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._fail(exc, url) from None

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.name, Key=key)
            return True
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise self._fail(exc, S3Url(self.name, key)) from None

    def upload(self, local: str | Path, key: str, threads: int = 4) -> None:
        """Upload a local file (multipart above 64 MiB, ``threads`` parts at once); the object appears
        only when complete."""
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES,
                                max_concurrency=max(1, threads))
        try:
            self._client.upload_file(str(local), self.name, key, Config=config)
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, S3Url(self.name, key)) from None

    def put(self, key: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.name, Key=key, Body=data)
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, S3Url(self.name, key)) from None

    def list(self, prefix: str) -> list[str]:
        """Keys that start with ``prefix``."""
        keys: list[str] = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
                keys.extend(item["Key"] for item in page.get("Contents", []))
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, S3Url(self.name, prefix)) from None
        return keys

    def delete(self, keys: list[str]) -> None:
        try:
            for i in range(0, len(keys), 1000):
                batch = [{"Key": k} for k in keys[i:i + 1000]]
                self._client.delete_objects(Bucket=self.name, Delete={"Objects": batch, "Quiet": True})
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, S3Url(self.name, keys[0] if keys else "")) from None

    def abort_uploads(self, prefix: str) -> int:
        """Abort unfinished multipart uploads under ``prefix`` (left by a killed run); their number."""
        try:
            uploads = self._client.list_multipart_uploads(Bucket=self.name, Prefix=prefix).get("Uploads", [])
            for upload in uploads:
                self._client.abort_multipart_upload(Bucket=self.name, Key=upload["Key"], UploadId=upload["UploadId"])
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, S3Url(self.name, prefix)) from None
        return len(uploads)


def read_bytes(path: str | Path) -> bytes | None:
    """A small file or ``s3://`` object (e.g. ``dataset.json``), or None when it does not exist."""
    if not is_url(path):
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    url = parse_s3_url(str(path))
    return Bucket(url.bucket).read(url.key)


def exists(path: str | Path) -> bool:
    """Whether a local path or an ``s3://`` object exists."""
    if not is_url(path):
        return Path(path).exists()
    url = parse_s3_url(str(path))
    return Bucket(url.bucket).exists(url.key)


def upload_file(local: str | Path, url: str, threads: int = 4) -> None:
    """Upload ``local`` to the ``s3://`` URL ``url``."""
    target = parse_s3_url(url)
    Bucket(target.bucket).upload(local, target.key, threads)
