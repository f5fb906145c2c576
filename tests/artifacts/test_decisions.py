"""The artifact decisions over plain records, one scenario a row: who may see an artifact
(`may_see`), does a signed manifest describe exactly the upload the service recorded
(`check_manifest`), and does storage hold exactly the parts the layout needs (`check_stored_parts`).
Rows with two faults pin the order of the checks."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from exchange.errors import Conflict
from exchange.format.manifest import FileEntry, Manifest, ciphertext_digest, part_ranges
from exchange.services.principals import Principal
from exchange.services.records import Artifact, ArtifactFile, may_see
from exchange.services.uploads import check_manifest, check_stored_parts
from exchange.storage import Part

#: One encrypted STREAM chunk (64 KiB and its 16-byte tag): the smallest part size there is.
PART_SIZE = 64 * 1024 + 16


def principal(name: str, *, org: str = "org_dev", role: str = "developer") -> Principal:
    return Principal(
        id=f"prn_{name}",
        name=name,
        org_id=org,
        org_name=org.removeprefix("org_"),
        role=role,
        key_id=f"key_{name}",
        signing_public_key=bytes(32),
        age_recipient="age1" + "q" * 58,
        status="active",
        created_at_ms=0,
    )


UPLOADER = principal("uploader")

ARTIFACT = Artifact(
    id="art_1",
    org_id="org_dev",
    org_name="dev",
    name="model-v1",
    kind="model-weights",
    status="uploading",
    created_by=UPLOADER.id,
    created_by_name=UPLOADER.name,
    created_at_ms=0,
    finished_at_ms=None,
    part_size=PART_SIZE,
    file_count=2,
    plaintext_bytes=100 + 150_000,
    manifest=None,
    manifest_signature=None,
)

# -- who may see ----------------------------------------------------------------------------------

SEE = [
    pytest.param(principal("dev"), False, True, id="a developer of the owning organisation"),
    pytest.param(principal("t", role="tester"), False, True, id="a tester of the owning organisation"),
    pytest.param(principal("root", org="org_ops", role="admin"), False, True, id="an admin of another"),
    pytest.param(principal("aud", org="org_ops", role="auditor"), False, True, id="an auditor of another"),
    pytest.param(
        replace(principal("up", org="org_lab", role="tester"), id=ARTIFACT.created_by),
        False,
        True,
        id="its uploader, of another organisation (an upload link)",
    ),
    pytest.param(principal("t", org="org_lab", role="tester"), True, True, id="a tester of another, granted"),
    pytest.param(principal("t", org="org_lab", role="tester"), False, False, id="a tester of another"),
    pytest.param(principal("d", org="org_lab"), False, False, id="a developer of another"),
]


@pytest.mark.parametrize(("who", "granted", "sees"), SEE)
def test_may_see(who: Principal, granted: bool, sees: bool) -> None:
    assert may_see(who, ARTIFACT, granted=granted) is sees


# -- the manifest against the records -------------------------------------------------------------


def digest(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def artifact_file(idx: int, path: str, size: int) -> ArtifactFile:
    ranges = part_ranges(size, PART_SIZE)
    return ArtifactFile(
        idx=idx,
        path=path,
        plaintext_size=size,
        ciphertext_size=ranges[-1].end,
        part_count=len(ranges),
        nonce=bytes([idx + 1]) * 16,
        object_key=f"obj/{idx}",
        upload_id=f"upload-{idx}",
    )


#: Two files: one of one part, one of three.
FILES = (artifact_file(0, "README.md", 100), artifact_file(1, "weights/model.bin", 150_000))
DIGESTS = {f.idx: {n: digest(f"{f.idx}/{n}") for n in range(1, f.part_count + 1)} for f in FILES}


def entry(f: ArtifactFile, digests: dict[int, bytes]) -> FileEntry:
    return FileEntry(
        path=f.path,
        size=f.plaintext_size,
        sha256=digest("plaintext " + f.path),
        nonce=f.nonce,
        ciphertext_size=f.ciphertext_size,
        ciphertext_digest=ciphertext_digest([digests[n] for n in sorted(digests)]),
        object=f.object_key,
    )


MANIFEST = Manifest(
    artifact=ARTIFACT.id,
    org=ARTIFACT.org_name,
    name=ARTIFACT.name,
    kind=ARTIFACT.kind,
    uploader=UPLOADER.key_id,
    part_size=PART_SIZE,
    files=tuple(entry(f, DIGESTS[f.idx]) for f in FILES),
)
README, WEIGHTS = MANIFEST.file("README.md"), MANIFEST.file("weights/model.bin")


def manifest(*entries: FileEntry, **changes: Any) -> Manifest:
    return replace(MANIFEST, **({"files": entries} if entries else {}), **changes)


def digests(**changes: dict[int, bytes]) -> dict[int, dict[int, bytes]]:
    """The recorded digests, with file 1's replaced by `file1` (and so on)."""
    out = dict(DIGESTS)
    for key, value in changes.items():
        out[int(key.removeprefix("file"))] = value
    return out


def mismatch(what: str) -> tuple[str, str]:
    return "manifest-mismatch", what


OTHER = FILES[1]
# (manifest, recorded files, recorded digests, (code, words the message must hold))
MANIFEST_REFUSED = [
    pytest.param(manifest(artifact="art_2"), FILES, DIGESTS, mismatch("its artifact"), id="another artifact"),
    pytest.param(manifest(org="lab"), FILES, DIGESTS, mismatch("its org"), id="another organisation"),
    pytest.param(manifest(name="model-v2"), FILES, DIGESTS, mismatch("its name"), id="another name"),
    pytest.param(manifest(kind="dataset"), FILES, DIGESTS, mismatch("its kind"), id="another kind"),
    pytest.param(
        manifest(uploader="key_other"), FILES, DIGESTS, mismatch("its uploader"), id="signed by another key"
    ),
    pytest.param(
        manifest(part_size=2 * PART_SIZE), FILES, DIGESTS, mismatch("its part_size"), id="another part size"
    ),
    pytest.param(
        manifest(replace(README, size=101), artifact="art_2"),
        FILES,
        DIGESTS,
        mismatch("its artifact"),
        id="another artifact and other sizes: the artifact first",
    ),
    pytest.param(manifest(WEIGHTS), FILES, DIGESTS, mismatch("other files"), id="a declared file left out"),
    pytest.param(
        manifest(README, WEIGHTS, replace(README, path="extra.txt")),
        FILES,
        DIGESTS,
        mismatch("other files"),
        id="a file never declared",
    ),
    pytest.param(
        manifest(replace(README, path="README.txt"), WEIGHTS),
        FILES,
        DIGESTS,
        mismatch("other files"),
        id="as many files, one renamed",
    ),
    pytest.param(
        manifest(replace(README, size=101), WEIGHTS),
        FILES,
        DIGESTS,
        mismatch("sizes of 'README.md'"),
        id="plaintext size differs",
    ),
    pytest.param(
        manifest(README, replace(WEIGHTS, ciphertext_size=WEIGHTS.ciphertext_size + 16)),
        FILES,
        DIGESTS,
        mismatch("sizes of 'weights/model.bin'"),
        id="ciphertext size differs",
    ),
    pytest.param(
        manifest(README, replace(WEIGHTS, nonce=bytes(16))),
        FILES,
        DIGESTS,
        mismatch("nonce or object of 'weights/model.bin'"),
        id="nonce differs",
    ),
    pytest.param(
        manifest(README, replace(WEIGHTS, object="obj/elsewhere")),
        FILES,
        DIGESTS,
        mismatch("nonce or object of 'weights/model.bin'"),
        id="object differs",
    ),
    pytest.param(
        manifest(README, replace(WEIGHTS, nonce=bytes(16))),
        FILES,
        digests(file1={1: DIGESTS[1][1]}),
        mismatch("nonce or object"),
        id="nonce differs and parts missing: the nonce first",
    ),
    pytest.param(
        MANIFEST,
        FILES,
        digests(file1={1: DIGESTS[1][1], 3: DIGESTS[1][3]}),
        ("parts-missing", "part(s) 2"),
        id="no part URL issued for a middle part",
    ),
    pytest.param(
        MANIFEST,
        FILES,
        {0: DIGESTS[0]},
        ("parts-missing", "part(s) 1, 2, 3"),
        id="no part URL issued for a file",
    ),
    pytest.param(
        MANIFEST,
        FILES,
        digests(file1={**DIGESTS[1], 2: digest("other bytes")}),
        mismatch("ciphertext digest of 'weights/model.bin'"),
        id="a part re-recorded with other bytes",
    ),
    pytest.param(
        MANIFEST,
        FILES,
        digests(file1={1: DIGESTS[1][2], 2: DIGESTS[1][1], 3: DIGESTS[1][3]}),
        mismatch("ciphertext digest of 'weights/model.bin'"),
        id="the same parts in another order",
    ),
    pytest.param(
        manifest(README, replace(WEIGHTS, ciphertext_digest=digest("anything"))),
        FILES,
        DIGESTS,
        mismatch("ciphertext digest of 'weights/model.bin'"),
        id="the manifest names another digest",
    ),
]


@pytest.mark.parametrize(("signed", "files", "recorded", "expected"), MANIFEST_REFUSED)
def test_manifests_refused(
    signed: Manifest,
    files: Sequence[ArtifactFile],
    recorded: dict[int, dict[int, bytes]],
    expected: tuple[str, str],
) -> None:
    code, words = expected
    with pytest.raises(Conflict) as refused:
        check_manifest(signed, ARTIFACT, UPLOADER, files, recorded)
    assert type(refused.value) is Conflict
    assert refused.value.code == code and refused.value.status == 409
    assert words in refused.value.message


MANIFEST_ALLOWED = [
    pytest.param(MANIFEST, FILES, DIGESTS, id="exactly as recorded"),
    pytest.param(MANIFEST, tuple(reversed(FILES)), DIGESTS, id="files recorded in another order"),
    pytest.param(
        manifest(replace(README, sha256=digest("anything")), WEIGHTS),
        FILES,
        DIGESTS,
        id="plaintext digests are the uploader's word, not checked here",
    ),
]


@pytest.mark.parametrize(("signed", "files", "recorded"), MANIFEST_ALLOWED)
def test_manifests_allowed(
    signed: Manifest, files: Sequence[ArtifactFile], recorded: dict[int, dict[int, bytes]]
) -> None:
    check_manifest(signed, ARTIFACT, UPLOADER, files, recorded)


# -- what storage holds ---------------------------------------------------------------------------

RANGES = part_ranges(OTHER.plaintext_size, PART_SIZE)
SIZES = [r.size for r in RANGES]


def part(number: int, *, size: int | None = None, etag: str | None = None) -> Part:
    return Part(
        number=number,
        size=SIZES[number - 1] if size is None else size,
        etag=etag or f'"etag-{number}"',
        checksum_sha256=None,
    )


P1, P2, P3 = part(1), part(2), part(3)

# (what storage lists, (code, words the message must hold))
STORED_REFUSED = [
    pytest.param(
        [P1, P2, part(2, etag='"other"'), P3], ("part-conflict", "part 2"), id="a part twice, other bytes"
    ),
    pytest.param(
        [P1, P2, P3, part(3, size=SIZES[2] - 1)], ("part-conflict", "part 3"), id="a part twice, other size"
    ),
    pytest.param([P1, P3], ("parts-missing", "part(s) 2 "), id="a part missing"),
    pytest.param([], ("parts-missing", "part(s) 1, 2, 3 "), id="nothing stored"),
    pytest.param([P1, P2, P3, part(4, size=1)], ("part-unexpected", "part(s) 4"), id="a part past the last"),
    pytest.param(
        [P1, P2, part(3, size=SIZES[2] + 1)], ("part-size-mismatch", "part 3 is"), id="the last part longer"
    ),
    pytest.param(
        [part(1, size=SIZES[0] - 16), P2, P3],
        ("part-size-mismatch", "part 1 is"),
        id="the first part shorter",
    ),
    pytest.param(
        [P1, part(1, etag='"other"'), part(4, size=1)],
        ("part-conflict", "part 1"),
        id="conflicting, missing and unexpected parts: the conflict first",
    ),
    pytest.param(
        [P1, P3, part(4, size=1)], ("parts-missing", "part(s) 2 "), id="missing and unexpected: missing first"
    ),
    pytest.param(
        [part(1, size=1), P2, P3, part(4, size=1)],
        ("part-unexpected", "part(s) 4"),
        id="unexpected part and a wrong size: unexpected first",
    ),
]


@pytest.mark.parametrize(("stored", "expected"), STORED_REFUSED)
def test_stored_parts_refused(stored: list[Part], expected: tuple[str, str]) -> None:
    code, words = expected
    with pytest.raises(Conflict) as refused:
        check_stored_parts(OTHER, stored, RANGES)
    assert type(refused.value) is Conflict
    assert refused.value.code == code and refused.value.status == 409
    assert words in refused.value.message


STORED_ALLOWED = [
    pytest.param([P1, P2, P3], id="each part once"),
    pytest.param([P3, P1, P2], id="listed out of order"),
    pytest.param([P1, P2, P2, P3, P1], id="parts listed twice with the same bytes (SeaweedFS does)"),
]


@pytest.mark.parametrize("stored", STORED_ALLOWED)
def test_stored_parts_allowed(stored: list[Part]) -> None:
    assert check_stored_parts(OTHER, stored, RANGES) == [P1, P2, P3]


def test_the_layout_has_three_parts() -> None:
    """The rows above assume the second file spans three parts, the last a short one."""
    assert OTHER.part_count == len(RANGES) == 3 and SIZES[0] == SIZES[1] + 16 > SIZES[2]  # + nonce
    assert FILES[0].part_count == 1
