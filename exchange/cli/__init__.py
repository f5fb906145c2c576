"""`exchange`: the command line. The only package that prints, exits or draws progress.

Commands live in modules by subject; importing them registers them on the `main` group.
"""

from . import admin, artifacts, audit, auditproof, console, findings, links, logkey, principals, server  # noqa: F401  (registers the commands)
from ._base import EXIT_CODES_HELP, exit_code_for, main

__all__ = ["EXIT_CODES_HELP", "exit_code_for", "main"]
