"""Keeping capabilities out of the logs: link tokens, `/l/…` and `/u/…` paths, referrers.

A download or upload link is a bearer capability carried in a URL (`/l/exl1_…`, `/u/exu1_…`),
and URLs travel into logs: aiohttp logs a request it cannot parse at ERROR with the offending
request line or header line (a `Referer` that names a link, say), an access log writes the path
and the referrer, and a traceback may hold either. Whoever reads the logs must not be able to
redeem the links.

`redact(text)` replaces every exchange secret by its prefix (`exl1_…` becomes `exl1_[redacted]`;
invite codes and link proofs too), every path segment after `/l/` or `/u/` whatever it holds
(a mistyped or truncated token is still most of a secret), and every `Referer` value, which
may come from any page. `RedactingFilter` applies it to a log record's message, arguments,
traceback and stack, and to string fields given in `extra`; `install_redaction()` puts it on
the handlers that write the process's logs, so that every logger (aiohttp's included, since its
records propagate to them) is covered.

What this module does not do: keep secrets out of what a handler writes outside `logging`
(stdout, a crash's last traceback from the interpreter), out of response bodies (aiohttp
answers an unparseable request with the offending line, to the client that sent it), or
recognise secrets of other shapes. Over-redaction is deliberate: a log line losing a harmless
path segment is cheaper than one holding a live link.
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["REDACTED", "RedactingFilter", "install_redaction", "redact"]

REDACTED = "[redacted]"

#: Download and upload link tokens, invite codes, link proofs: a prefix, then base64url.
_SECRET = re.compile(r"(exl1_|exu1_|exinv1_|exp1_)[A-Za-z0-9_-]+")
#: A link path's token segment, however malformed, up to the next delimiter or escape.
_LINK_PATH = re.compile(r"(/[lu]/)(?:[^\s/?#\"'\\<>]|\\x[0-9a-fA-F]{2})+")
#: A Referer header's value (also as it appears in `repr` of raw bytes, ended by a quote or escape).
_REFERER = re.compile(r"(?i)(\breferr?er[\"']?\s*[:=]\s*[\"']?)[^\r\n\"'\\]+")

#: LogRecord's own attributes; any other is an `extra` field.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def redact(text: str) -> str:
    """`text` with link tokens, invite codes, link paths and referrers replaced by `[redacted]`."""
    text = _SECRET.sub(lambda m: m.group(1) + REDACTED, text)
    text = _LINK_PATH.sub(lambda m: m.group(1) + REDACTED, text)
    return _REFERER.sub(lambda m: m.group(1) + REDACTED, text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes | bytearray):
        return redact(bytes(value).decode("latin-1")).encode("latin-1")
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(v) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """Rewrites each record it sees so that no link token, link path or referrer is left in it.

    The message is formatted here, once, and the arguments dropped: an argument's own `str()`
    (a URL, a request) is where a token hides. A traceback is formatted here too and kept as text
    only, so no formatter formats it again from the live exception.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_exchange_redacted", False):
            return True  # already done by another handler's filter
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: log what there is rather than nothing
            message = f"{record.msg!s} {record.args!r}"
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _RECORD_FIELDS:
                setattr(record, key, _redact_value(value))
        record._exchange_redacted = True
        return True


def install_redaction(*handlers: logging.Handler) -> None:
    """Put one `RedactingFilter` on `handlers` (default: the root logger's, and the handler
    `logging` falls back to when there are none). Installing twice adds nothing."""
    targets = list(handlers) or [*logging.getLogger().handlers]
    if not handlers and logging.lastResort is not None:
        targets.append(logging.lastResort)
    for handler in targets:
        for existing in handler.filters:
            if isinstance(existing, RedactingFilter):
                break
        else:
            handler.addFilter(RedactingFilter())
