"""Typed keys for the objects an application shares with its handlers."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from ..db import Database
from ..services.audit import AuditLog
from ..settings import Settings
from ..storage import Storage
from .validation import BodyValidator

__all__ = ["AUDIT", "CLOCK", "DB", "OPENAPI", "SETTINGS", "STORAGE", "VALIDATORS"]

SETTINGS = web.AppKey("settings", Settings)
DB = web.AppKey("db", Database)
STORAGE = web.AppKey("storage", Storage)
AUDIT = web.AppKey("audit", AuditLog)
#: Milliseconds since the epoch, UTC. Tests may pass a fake clock to create_app.
Clock = Callable[[], int]
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
VALIDATORS = web.AppKey("validators", dict[str, BodyValidator])
OPENAPI = web.AppKey("openapi", dict)
