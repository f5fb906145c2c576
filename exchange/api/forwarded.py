"""The client's address behind a trusted reverse proxy, from `X-Forwarded-For`.

Behind a proxy every connection comes from the proxy, so the per-source limits (`api.ratelimit`,
the refusal budget of `api.refusals`, the redemption buckets of `api.links`) and the audit
events' `ip` would all name the proxy. With `trusted_proxies` set, a middleware that runs before
everything else in the app (before the refusal gate, the body and the signature) replaces
`request.remote` with the client's address, so that everything downstream sees the client:

- from a peer *outside* `trusted_proxies`, the header is ignored, whatever it says: anyone can
  send one, and trusting it would let a client choose the address it is limited and logged as;
- from a peer *inside* them, the header is required. Its addresses are read right to left (each
  proxy appends the address it received the request from) and the first that is not itself a
  trusted proxy is the client; when every one is (a proxy's own health check), the leftmost is.
  Every element must be a bare IPv4 or IPv6 address (no port, brackets, zone or `unknown`);
  a header that is missing or has one element that is not is refused, 400 `bad-forwarded-for`
  (a problem detail and its audit event, through the pipeline like any refusal), rather than
  falling back to the proxy's address: a proxy that forwards garbage is misconfigured, and
  falling back would put every such client under the proxy's one budget.

IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`, from dual-stack sockets) are compared as the IPv4
address they map, for the peer and for the header's elements alike.

What this module does not do: read `Forwarded` (RFC 7239), `X-Real-IP` or the forwarded host,
port or scheme (request signatures cover the configured `public_url` instead); rewrite or remove
the header (nothing downstream reads it); or see through the HTTP parser's own refusals, which
happen before any header is read and are accounted to the peer (`api.connections`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from aiohttp import web

from ..errors import ValidationError
from ..settings import Settings
from .routing import Handler

__all__ = ["FORWARDED_REFUSAL", "TRUSTED_PROXIES", "TrustedProxies", "client_address", "middleware"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HEADER = "X-Forwarded-For"


def _plain(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it maps; any other as it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """The networks whose peers' forwarding headers are believed (`trusted_proxies`)."""

    __slots__ = ("networks",)

    def __init__(self, networks: Iterable[str]) -> None:
        # Settings checked the form already (strict CIDR); parsed once here, not per request.
        self.networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n, strict=True) for n in networks)

    @classmethod
    def from_settings(cls, settings: Settings) -> TrustedProxies:
        return cls(settings.trusted_proxies)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def holds(self, address: IPAddress) -> bool:
        address = _plain(address)
        return any(address.version == n.version and address in n for n in self.networks)

    def __contains__(self, peer: object) -> bool:
        """Is `peer` (a transport's address text, as `request.remote` gives it) a trusted proxy?"""
        if not self.networks or not isinstance(peer, str):
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:  # a Unix socket's path, or an IPv6 address with a zone
            return False
        return self.holds(address)


def _invalid(detail: str) -> ValidationError:
    return ValidationError(
        f"{detail}; the proxy in front of the service must set {HEADER} to the client's address",
        code="bad-forwarded-for",
    )


def client_address(values: Sequence[str], trusted: TrustedProxies) -> str:
    """The client's address from the `X-Forwarded-For` fields a trusted proxy sent (all of them,
    in the order received): the rightmost address that is not a trusted proxy, or the leftmost
    if all are. Raise ValidationError (`bad-forwarded-for`) when there is none, or when any
    element is not a bare IP address."""
    if not values:
        raise _invalid(f"the request came through a trusted proxy without an {HEADER} header")
    addresses: list[IPAddress] = []
    for element in ",".join(values).split(","):
        text = element.strip(" \t")
        try:
            if "%" in text:  # a zone names an interface of the proxy's host, not a client
                raise ValueError(text)
            addresses.append(ipaddress.ip_address(text))
        except ValueError:
            raise _invalid(f"the {HEADER} header holds an element that is not an IP address") from None
    for address in reversed(addresses):
        if not trusted.holds(address):
            return str(_plain(address))
    return str(_plain(addresses[0]))


#: The parsed `trusted_proxies` of an app.
TRUSTED_PROXIES = web.AppKey("trusted_proxies", TrustedProxies)
#: A trusted proxy's header that could not be used: the pipeline answers it (a problem detail,
#: accounted for like every refusal) before anything else is done.
FORWARDED_REFUSAL = web.RequestKey("exchange.forwarded_refusal", ValidationError)


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Before every other middleware of the app: the client's address as `request.remote`."""
    trusted = request.app[TRUSTED_PROXIES]
    if not trusted or request.remote not in trusted:
        return await handler(request)
    try:
        client = client_address(request.headers.getall(HEADER, []), trusted)
    except ValidationError as exc:
        request[FORWARDED_REFUSAL] = exc
        return await handler(request)
    return await handler(request.clone(remote=client))
