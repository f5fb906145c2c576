"""S3 control plane: presigned URLs, multipart bookkeeping, heads and deletes — never the bytes.

The service hands clients presigned SigV4 URLs and lets them move the ciphertext to and from
storage themselves; here are the few calls it makes on its own behalf. boto3 is synchronous, so
every call that touches the network runs on a small thread pool, off the event loop. Presigning
is local computation and runs inline. A plain GET, presigned on every link redemption, is
signed by the minio SDK (region given, so it never asks the network), about three times cheaper
than boto3 for the same SigV4 query-string signature; PUTs that sign `Content-Length` and
`x-amz-checksum-sha256` as headers stay with boto3.

Two endpoints: `endpoint` is where the service reaches storage, `public_endpoint` is what goes
into presigned URLs (clients may reach storage by another name, e.g. through a proxy). A SigV4
signature covers the host, so URLs are signed by a client configured with the public endpoint.

botocore exceptions stop here: a missing object or upload becomes `NotFound`, a refused
multipart completion `Conflict`, anything else `StorageUnavailable`, whose message never holds
the endpoint or credentials.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from minio import Minio

from .errors import Conflict, NotFound, StorageUnavailable

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["ObjectInfo", "Part", "PresignedRequest", "Storage", "new_object_key"]

T = TypeVar("T")

#: S3 allows at most this many parts in one multipart upload.
MAX_PARTS = 10_000
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NoSuchUpload", "NoSuchBucket", "NotFound"}
_CONFLICT_CODES = {"InvalidPart", "InvalidPartOrder", "EntityTooSmall", "BadDigest", "InvalidRequest"}


def new_object_key(prefix: str) -> str:
    """A fresh storage key. Keys are always the server's: names live only in metadata."""
    return f"{prefix}/{secrets.token_hex(16)}"


@dataclass(frozen=True)
class PresignedRequest:
    """A request a client may make to storage: this URL, with exactly these headers."""

    method: str
    url: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Part:
    number: int
    size: int
    etag: str
    checksum_sha256: str | None  # base64, as S3 reports it


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    checksum_sha256: str | None = None  # base64, when asked for and storage keeps one


def _minio_presigner(endpoint: str, region: str, access_key_id: str, secret_access_key: str) -> Minio | None:
    """The minio SDK for presigned GETs at `endpoint`; None for an endpoint it cannot name (a
    path prefix, or no host), which boto3 then signs. With the region given it never calls out."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/") or parts.query:
        return None
    return Minio(
        parts.netloc,
        access_key=access_key_id,
        secret_key=secret_access_key,
        secure=parts.scheme == "https",
        region=region,
    )


def _bound_put(url: str, content_length: int, checksum_sha256: str) -> PresignedRequest:
    return PresignedRequest(
        method="PUT",
        url=url,
        headers={"Content-Length": str(content_length), "x-amz-checksum-sha256": checksum_sha256},
    )


class Storage:
    def __init__(
        self,
        *,
        endpoint: str,
        public_endpoint: str | None = None,
        region: str,
        bucket: str,
        access_key_id: str,
        secret_access_key: str,
        timeout_s: float = 10.0,
        max_workers: int = 8,
        on_call: Callable[[str, float], None] | None = None,
    ) -> None:
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"max_attempts": 2, "mode": "standard"},
            # Only the checksums we ask for: part URLs sign the client's SHA-256 explicitly.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=max_workers,
        )

        def client(url: str) -> S3Client:
            return boto3.client(
                "s3",
                endpoint_url=url,
                region_name=region,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                config=config,
            )

        self.bucket = bucket
        #: Told each call's S3 operation name (a fixed set) and its duration in seconds: metrics.
        self._on_call = on_call
        self._client = client(endpoint)
        self._presigner = client(public_endpoint or endpoint)
        self._get_presigner = _minio_presigner(
            public_endpoint or endpoint, region, access_key_id, secret_access_key
        )
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="s3")

    async def _run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            return await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _NOT_FOUND_CODES:
                raise NotFound(f"storage has no such object or upload ({code})") from exc
            if code in _CONFLICT_CODES:
                raise Conflict(f"storage refused the request ({code})") from exc
            raise StorageUnavailable(f"storage answered with an error ({code or 'unknown'})") from exc
        except (BotoCoreError, OSError) as exc:
            raise StorageUnavailable(f"storage unreachable ({exc.__class__.__name__})") from exc
        finally:
            if self._on_call is not None:
                self._on_call(getattr(fn, "__name__", "other"), time.perf_counter() - started)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- health -------------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raise StorageUnavailable unless the bucket answers now."""
        try:
            await self._run(self._client.head_bucket, Bucket=self.bucket)
        except NotFound as exc:
            raise StorageUnavailable(f"bucket {self.bucket!r} does not exist") from exc

    async def ensure_bucket(self) -> None:
        try:
            await self._run(self._client.head_bucket, Bucket=self.bucket)
        except NotFound:
            await self._run(self._client.create_bucket, Bucket=self.bucket)

    # -- presigned URLs (local computation) -----------------------------------------------------

    def presign_get(self, key: str, *, ttl_s: int) -> str:
        if self._get_presigner is not None:
            return str(
                self._get_presigner.presigned_get_object(self.bucket, key, expires=timedelta(seconds=ttl_s))
            )
        return self._presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=ttl_s
        )

    def presign_put(
        self, key: str, *, ttl_s: int, content_length: int, checksum_sha256: str
    ) -> PresignedRequest:
        """A PUT that storage honours only for exactly this many bytes with this SHA-256 (base64).

        Both values are signed headers: the client must send them as given, and storage refuses
        a body of another length or digest.
        """
        url = self._presigner.generate_presigned_url(
            "put_object",
            Params={
                "Bucket": self.bucket,
                "Key": key,
                "ContentLength": content_length,
                "ChecksumSHA256": checksum_sha256,
            },
            ExpiresIn=ttl_s,
        )
        return _bound_put(url, content_length, checksum_sha256)

    def presign_upload_part(
        self,
        key: str,
        upload_id: str,
        part_number: int,
        *,
        ttl_s: int,
        content_length: int,
        checksum_sha256: str,
    ) -> PresignedRequest:
        """A part upload bound to the part's exact size and SHA-256 (base64), as presign_put."""
        url = self._presigner.generate_presigned_url(
            "upload_part",
            Params={
                "Bucket": self.bucket,
                "Key": key,
                "UploadId": upload_id,
                "PartNumber": part_number,
                "ContentLength": content_length,
                "ChecksumSHA256": checksum_sha256,
            },
            ExpiresIn=ttl_s,
        )
        return _bound_put(url, content_length, checksum_sha256)

    # -- multipart ------------------------------------------------------------------------------

    async def create_multipart(self, key: str) -> str:
        answer = await self._run(
            self._client.create_multipart_upload, Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256"
        )
        return answer["UploadId"]

    async def list_parts(self, key: str, upload_id: str) -> list[Part]:
        parts: list[Part] = []
        marker = 0
        while True:
            answer = await self._run(
                self._client.list_parts,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumberMarker=marker,
                MaxParts=1000,
            )
            for p in answer.get("Parts", []):
                parts.append(
                    Part(
                        number=p["PartNumber"],
                        size=p["Size"],
                        etag=p["ETag"],
                        checksum_sha256=p.get("ChecksumSHA256"),
                    )
                )
            if not answer.get("IsTruncated"):
                return parts
            marker = answer["NextPartNumberMarker"]

    async def complete_multipart(self, key: str, upload_id: str, parts: list[Part]) -> None:
        """Assemble the parts. Each part's SHA-256 must be given: the upload was created with
        SHA-256 checksums, and some stores (SeaweedFS) do not report them in ListParts, so the
        caller passes the digests it bound the part URLs to."""
        await self._run(
            self._client.complete_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={
                "Parts": [
                    {"PartNumber": p.number, "ETag": p.etag}
                    | ({"ChecksumSHA256": p.checksum_sha256} if p.checksum_sha256 else {})
                    for p in sorted(parts, key=lambda p: p.number)
                ]
            },
        )

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await self._run(self._client.abort_multipart_upload, Bucket=self.bucket, Key=key, UploadId=upload_id)

    # -- objects --------------------------------------------------------------------------------

    async def head(self, key: str, *, checksum: bool = False) -> ObjectInfo | None:
        """The object's size and ETag (and, with `checksum`, the SHA-256 it was stored with, if
        any: an object sent by one PUT bound to a checksum keeps it); None if there is none."""
        extra = {"ChecksumMode": "ENABLED"} if checksum else {}
        try:
            answer = await self._run(self._client.head_object, Bucket=self.bucket, Key=key, **extra)
        except NotFound:
            return None
        return ObjectInfo(
            key=key,
            size=answer["ContentLength"],
            etag=answer["ETag"],
            checksum_sha256=answer.get("ChecksumSHA256"),
        )

    async def delete(self, key: str) -> None:
        await self._run(self._client.delete_object, Bucket=self.bucket, Key=key)
