"""The auditors' console: a local web page over the verified audit log (`exchange audit console`).

`console.data` verifies (through `exchange.client.audit` and `exchange.auditverify`) and shapes
what the page shows; `console.server` serves it on 127.0.0.1 behind a one-time key and a session
cookie; `static/` is the page itself (plain files: all data comes from the JSON API). The
auditor's private key stays in the console's process; the browser never sees it.
"""

from .data import Console
from .server import Access, create_console_app

__all__ = ["Access", "Console", "create_console_app"]
