"""The exchange SDK: a signed HTTP client for the service's API.

Returns values and raises `ExchangeError` subclasses; never prints or exits (the CLI does).
A problem detail from the service becomes the exception class of its status, carrying the
service's problem `code` and `detail`; a service that cannot be reached becomes
`ServiceUnreachable`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from ..errors import (
    AgeError,
    AuthError,
    BodyTimeout,
    Conflict,
    DependencyError,
    ExchangeError,
    InputError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RangeNotSatisfiable,
    RateLimited,
    ServiceUnreachable,
    UnsupportedMediaType,
    ValidationError,
)
from ..format import age
from ..format.keyrotation import sign_rotation
from ..identity import Identity
from .signing import sign_headers


def segment(value: str) -> str:
    """`value` as one URL path segment: every reserved character percent-encoded, `/` too."""
    return quote(value, safe="")


__all__ = ["Client", "Rewrapped", "ServiceUnreachable", "segment"]


@dataclass
class Rewrapped:
    """What re-wrapping one's own headers did: the artifacts re-wrapped now, how many headers
    the current age identity already opened, and those no identity given opens."""

    rewrapped: list[str] = field(default_factory=list)
    current: int = 0
    unopenable: list[str] = field(default_factory=list)


_BY_STATUS: dict[int, type[ExchangeError]] = {
    400: ValidationError,
    401: AuthError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    408: BodyTimeout,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    416: RangeNotSatisfiable,
    429: RateLimited,
    503: DependencyError,
}


def _error_from_problem(status: int, body: Any) -> ExchangeError:
    cls = _BY_STATUS.get(status) or (InputError if status < 500 else DependencyError)
    if isinstance(body, dict):
        detail = str(body.get("detail") or body.get("title") or f"HTTP {status}")
        code = body.get("code")
        return cls(detail, code=str(code) if code else None, status=status, request_id=body.get("request_id"))
    return cls(f"the service answered HTTP {status}", status=status)


#: Methods whose request may be sent again (freshly signed) when its answer was lost.
_IDEMPOTENT = frozenset({"GET", "HEAD"})


def _problem_code(body: bytes) -> str | None:
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return None
    return str(data.get("code")) if isinstance(data, dict) and data.get("code") else None


class Client:
    """`async with Client(server, identity) as c: await c.whoami()`."""

    def __init__(
        self,
        server: str,
        identity: Identity | None = None,
        *,
        timeout_s: float = 30.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.identity = identity
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> Client:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, str] | None = None,
        signer: Identity | None = None,
        signed: bool = True,
        raw: bool = False,
    ) -> Any:
        """Send one request (signed with `signer` or the client's identity); return parsed JSON.

        With `raw`, a successful answer's body is returned as bytes, unparsed.
        """
        if self._session is None:
            raise RuntimeError("use the client as `async with Client(...)`")
        url = URL(self.server + path)
        if params:
            url = url.with_query({k: v for k, v in params.items() if v is not None})
        body = b"" if json_body is None else json.dumps(json_body).encode()
        identity = signer or self.identity
        if signed and identity is None:
            raise ValidationError("this request must be signed: give an identity (--identity)")
        # A read is sent again once, signed anew, when its answer was lost: a replica behind a
        # proxy died, or aiohttp re-sent it on a new connection after a kept-alive one closed,
        # with the same signature, which the service rightly refuses as a replayed nonce. Our
        # nonce is fresh and random, so that refusal means the first copy was only ever ours.
        attempts = 2 if method in _IDEMPOTENT else 1
        for attempt in range(attempts):
            headers = {"Content-Type": "application/json"} if json_body is not None else {}
            if signed:
                assert identity is not None
                headers = sign_headers(identity, method=method, url=str(url), body=body, headers=headers)
            last = attempt == attempts - 1
            try:
                async with self._session.request(
                    method, url, data=body, headers=headers, allow_redirects=False
                ) as resp:
                    body_bytes = await resp.read()
                    status = resp.status
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if not last:
                    continue
                raise ServiceUnreachable(
                    f"cannot reach the service at {self.server}: {exc.__class__.__name__}"
                ) from exc
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise ServiceUnreachable(
                    f"cannot reach the service at {self.server}: {exc.__class__.__name__}"
                ) from exc
            if status == 401 and signed and not last and _problem_code(body_bytes) == "replayed-nonce":
                continue
            break
        if raw and status < 400:
            return body_bytes
        try:
            data = json.loads(body_bytes) if body_bytes else None
        except ValueError:
            data = None
        if status >= 400:
            raise _error_from_problem(status, data)
        return data

    # -- identity -------------------------------------------------------------------------------

    async def whoami(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/whoami")  # type: ignore[no-any-return]

    async def create_org(self, name: str) -> dict[str, Any]:
        return await self.request("POST", "/v1/orgs", json_body={"name": name})  # type: ignore[no-any-return]

    async def list_orgs(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/v1/orgs"))["items"]  # type: ignore[no-any-return]

    async def create_invite(self, *, role: str, org: str, expires_in_s: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"role": role, "org": org}
        if expires_in_s is not None:
            body["expires_in_s"] = expires_in_s
        return await self.request("POST", "/v1/invites", json_body=body)  # type: ignore[no-any-return]

    async def create_reenroll_invite(self, name: str, *, expires_in_s: int | None = None) -> dict[str, Any]:
        """An invite that replaces the lost keys of principal `name` (admin)."""
        body: dict[str, Any] = {} if expires_in_s is None else {"expires_in_s": expires_in_s}
        return await self.request(  # type: ignore[no-any-return]
            "POST", f"/v1/principals/{segment(name)}/reenroll-invite", json_body=body
        )

    async def enroll(self, code: str, name: str, identity: Identity) -> dict[str, Any]:
        public = identity.public.to_json()
        body = {
            "code": code,
            "name": name,
            "signing_public_key": public["signing_public_key"],
            "age_recipient": public["age_recipient"],
        }
        return await self.request("POST", "/v1/enroll", json_body=body, signer=identity)  # type: ignore[no-any-return]

    async def list_principals(
        self, *, org: str | None = None, role: str | None = None
    ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            page = await self.request(
                "GET",
                "/v1/principals",
                params={"org": org, "role": role, "cursor": cursor},  # type: ignore[dict-item]
            )
            items.extend(page["items"])
            cursor = page["next_cursor"]
            if not cursor:
                return items

    async def get_principal(self, name: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/principals/{segment(name)}")  # type: ignore[no-any-return]

    async def disable_principal(self, name: str, *, reason: str | None = None) -> dict[str, Any]:
        """Offboard `name` (admin): its signatures are refused from now on; nothing it did is lost."""
        body = {"reason": reason} if reason else {}
        return await self.request("POST", f"/v1/principals/{segment(name)}/disable", json_body=body)  # type: ignore[no-any-return]

    async def enable_principal(self, name: str, *, reason: str | None = None) -> dict[str, Any]:
        """Re-enable a disabled principal (admin)."""
        body = {"reason": reason} if reason else {}
        return await self.request("POST", f"/v1/principals/{segment(name)}/enable", json_body=body)  # type: ignore[no-any-return]

    async def rotate_keys(self, new: Identity) -> dict[str, Any]:
        """Replace the client's (current) keys with `new`'s: the request is signed by the current
        key, the body carries `new`'s proof that it holds the new signing key."""
        if self.identity is None:
            raise ValidationError("rotating keys needs the current identity")
        me = await self.whoami()
        public = new.public
        proof = sign_rotation(
            new.signing_key,
            principal_id=me["id"],
            old_key_id=self.identity.key_id,
            new_key_id=public.key_id,
            age_recipient=public.age_recipient,
        )
        body = {
            "signing_public_key": public.to_json()["signing_public_key"],
            "age_recipient": public.age_recipient,
            "proof": base64.b64encode(proof).decode("ascii"),
        }
        return await self.request("POST", "/v1/principals/me/keys", json_body=body)  # type: ignore[no-any-return]

    async def own_headers(self) -> list[dict[str, Any]]:
        """Every age header stored for the caller (of artifacts neither aborted nor deleted)."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            page = await self.request(
                "GET",
                "/v1/principals/me/headers",
                params={"cursor": cursor},  # type: ignore[dict-item]
            )
            items.extend(page["items"])
            cursor = page["next_cursor"]
            if not cursor:
                return items

    async def put_header(self, artifact_id: str, header: bytes) -> dict[str, Any]:
        """Store `header` over the caller's own header of the artifact."""
        body = {"header": base64.b64encode(header).decode("ascii")}
        return await self.request("PUT", f"/v1/artifacts/{segment(artifact_id)}/header", json_body=body)  # type: ignore[no-any-return]

    async def rewrap_own_headers(self, retired: Sequence[Identity]) -> Rewrapped:
        """Re-wrap for the client's current age recipient every own header that only one of the
        `retired` identities opens. Safe to run again: a header the current identity opens is
        left alone, so an interrupted run resumes where it stopped."""
        if self.identity is None:
            raise ValidationError("re-wrapping needs the current identity")
        current, old = [self.identity.age_identity], [i.age_identity for i in retired]
        recipient = self.identity.public.age_recipient
        done = Rewrapped()
        for item in await self.own_headers():
            raw = base64.b64decode(item["header"], validate=True)
            try:
                age.unwrap_file_key(raw, current)
                done.current += 1
                continue
            except AgeError:
                pass
            try:
                file_key = age.unwrap_file_key(raw, old) if old else None
            except AgeError:
                file_key = None
            if file_key is None:
                done.unopenable.append(item["artifact"])
                continue
            await self.put_header(item["artifact"], age.wrap_file_key(file_key, [recipient]).to_bytes())
            done.rewrapped.append(item["artifact"])
        return done

    async def health(self) -> dict[str, Any]:
        return await self.request("GET", "/readyz", signed=False)  # type: ignore[no-any-return]
