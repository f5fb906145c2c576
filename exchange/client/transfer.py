"""Encrypted transfers: upload a file or a directory as an artifact, download one back.

Upload. The client collects the files (refusing symbolic links and special files), draws one
file key for the artifact and one payload nonce per file, wraps the key for every active
developer of its organisation and itself, and starts the upload. Then, with at most
`concurrency` parts in flight, it encrypts each part from the plaintext at its offset (see the
part layout in `exchange.format.manifest`), hashes it, asks for a URL bound to that size and
digest (URL requests are batched), and PUTs it to storage. A plaintext SHA-256 per file is
computed alongside by one sequential reader. Last, it signs the manifest with its Ed25519 key and
completes the upload.

Resume. Uploads need no local state and no local secret: run again, the client finds its own
unfinished upload of the same name, kind, paths and sizes, fetches its own header, unwraps the
file key, and re-derives the same ciphertext (the nonces come from the server). Parts storage
already holds are re-encrypted and checked against their recorded digests — a local file that
changed since is refused — and the rest are sent (first, so storage is busy from the start).

Download. The signed manifest is verified with the uploader's registered key; the per-part
digests the service serves are checked against it (their SHA-256 chain is the manifest's
ciphertext digest). Each part is fetched with a ranged GET and decrypted as it arrives, ~1 MiB
at a time, and written at its offset into `<DIR>/<name>.exchange-partial/`, with direct I/O
(around the page cache) where the filesystem allows it. Every chunk
authenticates under the file key (tampering, reordering, truncation); the object's size is
checked from the answer's Content-Range; one hasher reads each file back in order as its parts
land and checks its SHA-256 against the manifest, which proves the bytes are the uploader's
(a co-recipient, who also holds the file key, cannot substitute a file). Once every file checks
out, the files are fsynced and renamed into place (each part is on the disk, or handed to it as
soon as it is hashed, so the fsync has little left to write). Run again after a kill, the
download keeps the parts its journal (`<name>.exchange-partial.parts`) lists as written and
fetches only the rest; should a file then not hash right, every kept part is checked by
re-encrypting it against its digest and those that fail are fetched again. A mismatch, a wrong
key or a full disk removes the partial output and names the file that failed.

Threads. The bytes move on worker threads with blocking HTTP (`_storage_http`); the event
loop only schedules parts, asks the API for URLs and reports progress.

Memory. An upload encrypts each part once, into a buffer reused from part to part, hashes it as it
is sealed and sends it from there; its parts in flight hold at most as many bytes as `concurrency`
parts of the largest size plus half as many again, within `_upload.MEMORY_BUDGET_BYTES` (80 MiB: 9
parts at the default 8 MiB, fewer when parts are larger; small files' parts many at once, up to
`_upload.MOST_PARTS_IN_FLIGHT`, so their URLs come in few calls). A resumed upload reads each part
storage already holds once, to check it against its digest and for the file's SHA-256 in the same
pass. A part larger than `memory_part_bytes` (files over ~300 GiB) is never held: it is encrypted
twice, once to hash and once to send, which gives the same bytes since the key and nonce are fixed.
A download decrypts each part into a buffer that waits for the in-order hasher (at most
`_Download.window` of them, within `_download.HELD_PLAINTEXT_BYTES`; larger parts are read back
into one 8 MiB buffer instead). Peak RSS, measured: 125 MiB uploading and 130 MiB downloading at
1 GiB, 127-130 and 135-144 MiB at 32 GiB (`scripts/bench-transfer`; README).

What this module does not do: print, draw progress bars or exit. It reports progress through a
callback and raises `ExchangeError`s.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import (
    AgeError,
    IntegrityError,
    LocalFileError,
    ManifestError,
    ValidationError,
)
from ..files import write_atomic
from ..format import age
from ..format.manifest import (
    FileEntry,
    Manifest,
    check_path,
    check_paths,
    ciphertext_digest,
    part_ranges,
)
from ..format.receipt import receipt_message
from . import Client
from . import artifacts as api
from ._download import (
    JOURNAL_SUFFIX,
    SESSION_SUFFIX,
    _Download,
    _DownloadFile,
    _fsync_dir,
    _Journal,
    _TrustedPartsWrong,
    _URLRefresher,
    _verified_manifest,
)
from ._parts import Progress, SourceFile, _no_progress
from ._storage_http import StorageHTTP
from ._upload import Destination, _b64d, _find_resumable, _link_destination, _start, _Upload, _UploadFile

#: An artifact id is part of a file name here (the session marker): nothing a path gives a meaning to.
_ARTIFACT_ID = re.compile(r"[A-Za-z0-9_]{1,64}")

__all__ = [
    "DEFAULT_CONCURRENCY",
    "PARTIAL_SUFFIX",
    "Progress",
    "SourceFile",
    "collect",
    "download",
    "download_with_receipt",
    "upload",
]

#: Parts in flight at once. Measured on 2 cores: 4 to 8 do about equally well; more only costs memory.
DEFAULT_CONCURRENCY = 6
#: Parts up to this size are held in memory while in flight; larger ones are streamed.
IN_MEMORY_PART_BYTES = 32 * 1024 * 1024
#: Downloads are written under DIR/NAME<suffix>/ and moved into place once verified.
PARTIAL_SUFFIX = ".exchange-partial"


def collect(path: Path) -> tuple[str, list[SourceFile]]:
    """The files an upload of `path` sends, and the default artifact name.

    A file is sent as itself (its path in the artifact is its name); a directory as every regular
    file under it, with paths starting with the directory's name. Symbolic links anywhere, and
    anything that is neither a regular file nor a directory, are refused: an artifact holds
    exactly what is under `path`, nothing a link points to.
    """
    path = Path(os.path.abspath(path))
    root_name = path.name
    if not root_name:
        raise LocalFileError(f"cannot upload {path}: name a file or a directory below the root")
    files: list[SourceFile] = []

    def visit(p: Path, rel: str) -> None:
        try:
            st = p.lstat()
        except OSError as exc:
            raise LocalFileError(f"cannot read {p}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise LocalFileError(f"{p} is a symbolic link; exchange does not follow links", code="symlink")
        try:
            check_path(rel)
        except ValidationError as exc:
            raise LocalFileError(f"cannot upload {p}: {exc.message}", code="unsafe-path") from None
        if stat.S_ISREG(st.st_mode):
            files.append(SourceFile(rel, p, st.st_size, st.st_mtime_ns))
        elif stat.S_ISDIR(st.st_mode):
            try:
                names = sorted(os.listdir(p))
            except OSError as exc:
                raise LocalFileError(f"cannot list {p}: {exc.strerror}") from None
            for child in names:
                visit(p / child, f"{rel}/{child}")
        else:
            raise LocalFileError(f"{p} is not a regular file or directory", code="special-file")

    visit(path, root_name)
    if not files:
        raise LocalFileError(f"{path} holds no files to upload")
    check_paths(f.path for f in files)
    return root_name, files


def collect_files(paths: Sequence[Path]) -> tuple[str, list[SourceFile]]:
    """The files an upload of a list of regular files sends, each under its own name, and the
    default artifact name (the first file's). Two files of the same name are refused."""
    sources: list[SourceFile] = []
    for path in paths:
        name, found = collect(path)
        if len(found) != 1 or found[0].path != name:
            raise LocalFileError(f"{path} is not a regular file", code="special-file")
        sources.extend(found)
    names = [s.path for s in sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise LocalFileError(f"two files are named {twice[0]!r}: rename one", code="unsafe-path")
    if not sources:
        raise LocalFileError("no files to upload")
    check_paths(names)
    return names[0], sources


async def upload(
    client: Client,
    path: Path | Sequence[Path],
    *,
    name: str | None = None,
    kind: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    workers: int | None = None,
    memory_part_bytes: int = IN_MEMORY_PART_BYTES,
    progress: Progress | None = None,
    on_start: Callable[[str, int, bool], None] | None = None,
    upload_link: str | None = None,
    destination: Destination | None = None,
) -> str:
    """Upload `path` (a file, a directory, or a list of files) encrypted; return the artifact id.

    An unfinished upload of the same name, kind, paths and sizes by the same principal is resumed.
    With `upload_link` (a token), the upload goes to that link's organisation, of its kind
    (default "other" without one); run again, it resumes the upload the link started.
    `destination` sends it elsewhere than one's own organisation (a finding's body).
    A list of files is uploaded with each file's name as its path (names must differ).
    `on_start(artifact_id, total_bytes, resumed)` is called once the upload is known.
    `concurrency` parts travel at once; `workers` threads (default: every CPU this process may run
    on) encrypt and hash at once. With storage on the same machine, fewer workers leave it more.
    """
    identity = client.identity
    if identity is None:
        raise ValidationError("uploading needs an identity (--identity)")
    root_name, sources = collect(path) if isinstance(path, Path) else collect_files(path)
    name = name or root_name
    me = await client.whoami()
    if upload_link is not None:
        if destination is not None:
            raise ValidationError("an upload goes through an upload link or to a destination, not both")
        kind, destination, detail = await _link_destination(client, upload_link, kind, sources)
    else:
        kind = kind or "other"
        detail = await _find_resumable(client, me, name, kind, sources)
    resumed = detail is not None
    if detail is None:
        file_key = age.generate_file_key()
        detail = await _start(client, me, name, kind, sources, file_key, destination)
    else:
        file_key = age.unwrap_file_key(await api.header(client, detail["id"]), [identity.age_identity])
    artifact_id = detail["id"]
    total = sum(f.size for f in sources)
    if on_start is not None:
        on_start(artifact_id, total, resumed)
    # What is recorded and stored: nothing yet for an upload just started (asking would cost the
    # service a storage call for each file of one part).
    fresh: dict[str, Any] = {"recorded": [], "stored": []}
    states = (
        (await api.upload_status(client, artifact_id))["files"] if resumed else [fresh] * len(detail["files"])
    )
    by_path = {f.path: f for f in sources}
    part_size = int(detail["part_size"])
    files: list[_UploadFile] = []
    try:
        for entry, st in zip(detail["files"], states, strict=True):
            source = by_path[entry["path"]]
            nonce = _b64d(entry["nonce"])
            try:
                fd = os.open(source.source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError as exc:
                raise LocalFileError(f"cannot read {source.source}: {exc.strerror}") from None
            files.append(
                _UploadFile(
                    index=entry["index"],
                    source=source,
                    nonce=nonce,
                    key=age.payload_key(file_key, nonce),
                    fd=fd,
                    ranges=part_ranges(source.size, part_size),
                    recorded={p["number"]: _b64d(p["sha256"]) for p in st["recorded"]},
                    stored={p["number"]: p["size"] for p in st["stored"]},
                )
            )
        storage = StorageHTTP()
        try:
            engine = _Upload(
                client,
                storage,
                artifact_id,
                concurrency,
                memory_part_bytes,
                progress or _no_progress,
                workers=workers,
            )
            await engine.run(files)
        finally:
            storage.close()
        for f in files:
            # Encryption and the plaintext hash read the file separately: both must have seen
            # the same bytes, or the manifest would promise what the ciphertext does not hold.
            st = os.fstat(f.fd)
            if (st.st_size, st.st_mtime_ns) != (f.source.size, f.source.mtime_ns):
                raise LocalFileError(
                    f"{f.source.source} changed while it was being uploaded; upload it again",
                    code="file-changed",
                )
        manifest = Manifest(
            artifact=artifact_id,
            org=detail["org"],
            name=detail["name"],
            kind=detail["kind"],
            uploader=identity.key_id,
            part_size=part_size,
            files=tuple(
                FileEntry(
                    path=f.source.path,
                    size=f.source.size,
                    sha256=f.sha256,
                    nonce=f.nonce,
                    ciphertext_size=age.ciphertext_size(f.source.size),
                    ciphertext_digest=ciphertext_digest([f.digests[r.number] for r in f.ranges]),
                    object=next(e["object"] for e in detail["files"] if e["index"] == f.index),
                )
                for f in files
            ),
        )
        await api.complete(client, artifact_id, manifest.to_json(), manifest.sign(identity.signing_key))
    finally:
        for f in files:
            os.close(f.fd)
    return str(artifact_id)


async def download(
    client: Client,
    artifact_id: str,
    out_dir: Path,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    workers: int | None = None,
    progress: Progress | None = None,
    on_start: Callable[[dict[str, Any], int], None] | None = None,
) -> list[Path]:
    """Download, decrypt and verify an artifact into `out_dir`; return the top-level paths written.

    Files land at `out_dir/<path>` (a directory artifact's paths start with its directory name).
    `on_start(info, bytes_already_done)` is called once the work is known. The download is one
    session, ended by a signed receipt (`download_with_receipt` returns it too).
    `concurrency` parts travel at once; `workers` threads (default: every CPU this process may run
    on) decrypt and hash at once. Files are written with direct I/O where the filesystem allows it
    (`EXCHANGE_DIRECT_IO=0`: through the page cache).
    """
    written, _ = await download_with_receipt(
        client,
        artifact_id,
        out_dir,
        concurrency=concurrency,
        workers=workers,
        progress=progress,
        on_start=on_start,
    )
    return written


async def download_with_receipt(
    client: Client,
    artifact_id: str,
    out_dir: Path,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    workers: int | None = None,
    progress: Progress | None = None,
    on_start: Callable[[dict[str, Any], int], None] | None = None,
) -> tuple[list[Path], dict[str, Any]]:
    """`download`, returning the paths written and the receipt the service recorded.

    The download opens a session (counted against the grant, if it bounds its downloads); one
    interrupted and run again continues the same session, not counted again: its id waits in
    `out_dir/.exchange-artifact-ID.exchange-session` until the receipt is recorded."""
    identity = client.identity
    if identity is None:
        raise ValidationError("downloading needs an identity (--identity)")
    if not _ARTIFACT_ID.fullmatch(artifact_id):
        raise ValidationError(f"{artifact_id!r} is not an artifact id (art_…) or a link URL")
    # Everything that would refuse the download is checked before its session opens (and counts):
    # the uploader's signature, the file key (one's own header), the names and the destination.
    detail = await api.get(client, artifact_id)
    if detail["status"] != "complete":
        await api.download_info(client, artifact_id)  # the service's refusal, and its event
        raise IntegrityError(f"the service offers a download of a {detail['status']} artifact")
    uploader = await client.get_principal(detail["created_by"])
    manifest = _verified_manifest(detail, uploader)
    file_key = age.unwrap_file_key(await api.header(client, artifact_id), [identity.age_identity])
    out_dir = Path(os.path.abspath(out_dir))
    _check_destination(manifest, out_dir)
    marker = out_dir / f".exchange-artifact-{artifact_id}{SESSION_SUFFIX}"
    saved = marker.read_text().strip() if marker.is_file() else None
    info = await api.download_info(client, artifact_id, session=saved)
    if (info["manifest"], info["manifest_signature"]) != (detail["manifest"], detail["manifest_signature"]):
        raise IntegrityError("the service answered with another manifest than a moment ago")
    session = str(info["session"])
    if saved is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, (session + "\n").encode("utf-8"), overwrite=True)
    try:
        written = await download_verified(
            info,
            manifest,
            file_key,
            out_dir,
            lambda files: _URLRefresher(client, info, files),
            concurrency=concurrency,
            workers=workers,
            progress=progress,
            on_start=on_start,
        )
    except BaseException:
        # Interrupted with parts kept: the session waits for the resume. Refused with nothing
        # kept (storage's bytes did not verify, the disk filled): nothing is left behind.
        staging = out_dir / (manifest.name + PARTIAL_SUFFIX)
        if staging.is_symlink() or not staging.is_dir():
            marker.unlink(missing_ok=True)
        raise
    message = receipt_message(
        artifact=artifact_id, link=None, session=session, manifest_sha256=manifest.digest()
    )
    receipt = await api.send_receipt(
        client, artifact_id, session, identity.signing_key.sign(message).signature
    )
    marker.unlink(missing_ok=True)
    return written, receipt


def _check_destination(manifest: Manifest, out_dir: Path) -> list[str]:
    """The top-level names the artifact writes into `out_dir`: refused if the artifact's name is
    not a safe file name (ManifestError) or one of them exists already (LocalFileError)."""
    try:
        check_path(manifest.name)
        if "/" in manifest.name:
            raise ValidationError("a '/' in the artifact name")
    except ValidationError as exc:
        raise ManifestError(f"the artifact name is not a safe file name: {exc.message}") from None
    tops = sorted({e.path.split("/", 1)[0] for e in manifest.files})
    for top in tops:
        if os.path.lexists(out_dir / top):
            raise LocalFileError(f"{out_dir / top} exists; not overwriting it", code="exists")
    return tops


async def download_verified(
    info: dict[str, Any],
    manifest: Manifest,
    file_key: bytes,
    out_dir: Path,
    refresher: Callable[[list[_DownloadFile]], _URLRefresher],
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    workers: int | None = None,
    progress: Progress | None = None,
    on_start: Callable[[dict[str, Any], int], None] | None = None,
) -> list[Path]:
    """The download proper, once the manifest is verified and the file key unwrapped: shared by
    downloads of one's own artifacts and downloads through a link (`exchange.client.links`).

    `info` carries the presigned URL and the part digests of every file."""
    by_path = {f["path"]: f for f in info["files"]}
    if sorted(by_path) != sorted(e.path for e in manifest.files):
        raise IntegrityError("the service lists other files than the signed manifest")
    out_dir = Path(os.path.abspath(out_dir))
    tops = _check_destination(manifest, out_dir)
    staging = out_dir / (info["name"] + PARTIAL_SUFFIX)
    files = []
    for entry in manifest.files:
        served = by_path[entry.path]
        digests = [base64.b64decode(d) for d in served["part_sha256"]]
        if ciphertext_digest(digests) != entry.ciphertext_digest:
            raise IntegrityError(
                f"{entry.path}: the part digests do not match the signed manifest", path=entry.path
            )
        files.append(
            _DownloadFile(
                entry=entry,
                url=served["url"],
                part_digests=digests,
                ranges=part_ranges(entry.size, manifest.part_size),
                target=staging / entry.path,
                key=age.payload_key(file_key, entry.nonce),
            )
        )
    journal = _Journal(staging.with_name(staging.name + JOURNAL_SUFFIX), manifest.digest().hex())

    def engine_for(files: list[_DownloadFile]) -> _Download:
        return _Download(concurrency, progress or _no_progress, refresher(files), journal, workers=workers)

    engine = engine_for(files)
    try:
        already = await engine.prepare(staging, files)
        if on_start is not None:
            on_start(info, already)
        try:
            await engine.run(files)
            await engine.finish(files)
        except _TrustedPartsWrong:
            # A part the journal vouched for is not what was written (changed on disk since, or
            # the journal is wrong): check every kept part the thorough way, fetch the others.
            engine.close(files)
            engine = engine_for(files)
            await engine.prepare(staging, files, trust_journal=False)
            await engine.run(files)
            await engine.finish(files)
    except BaseException as exc:
        engine.close(files)
        # A mismatch, a wrong key or a full disk does not get better by running again: nothing
        # half-verified stays behind. Anything else (network, storage, a kill) keeps the partial
        # directory and its journal, and the next run resumes from them.
        if isinstance(exc, IntegrityError | LocalFileError | AgeError):
            shutil.rmtree(staging, ignore_errors=True)
            journal.remove()
        raise
    engine.close(files)
    # Every file verified: move the top-level entries into place, then drop the staging directory.
    for top in tops:
        os.rename(staging / top, out_dir / top)
    with contextlib.suppress(OSError):
        os.rmdir(staging)
    journal.remove()
    _fsync_dir(out_dir)
    return [out_dir / t for t in tops]
