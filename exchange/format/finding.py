"""The vocabulary of findings, shared by the service and the clients: severities, statuses, the
lifecycle's moves, suggested categories, and the body's file name. Pure data."""

from __future__ import annotations

__all__ = ["BODY_NAME", "CATEGORIES", "MOVES", "SEVERITIES", "STATUSES"]

SEVERITIES = ("critical", "high", "medium", "low", "info")
STATUSES = ("submitted", "acknowledged", "validated", "remediated", "wont-fix", "closed")
#: Suggested categories (free text is allowed).
CATEGORIES = ("cyber-offense capability", "safeguard bypass", "data exposure", "reliability", "other")
#: The one file of a finding's body upload.
BODY_NAME = "body.md"

#: (from, to) -> who may make the move: "owner" (a developer of the owning organisation) or
#: "reporter". Anything not here skips the lifecycle.
MOVES: dict[tuple[str, str], str] = {
    ("submitted", "acknowledged"): "owner",
    ("acknowledged", "validated"): "owner",
    ("validated", "remediated"): "owner",
    ("validated", "wont-fix"): "owner",
    ("remediated", "closed"): "reporter",
    ("wont-fix", "closed"): "reporter",
    ("closed", "submitted"): "reporter",  # reopen
}
