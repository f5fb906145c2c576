"""The error tree: every exception class in the package is in it and drawn, and maps to its exit code.

`exchange.errors` draws the tree in its docstring; this walks every module of the package (the
`dev` and `server` extras included), collects every exception class defined there, and holds
the drawing to it. The exit-code table is the mapping the CLI had before the tree grew its
`IntegrityFailure` branch, plus the classes that joined the root since: a change to it is a
change to what scripts see, and has to be made here on purpose.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import exchange
from exchange import errors
from exchange.cli._base import exit_code_for
from exchange.errors import ExchangeError

#: Exception classes deliberately outside `ExchangeError`, and why (also said in the docstring).
OUTSIDE_THE_TREE = {
    # Always translated into LinkRefused; were it an ExchangeError, an escape would tell a
    # guesser which proof check failed. As a ValueError an escape is a bare 500.
    "exchange.format.linkproof.LinkProofError",
    # Private control flow: SeaweedFS.start() re-raises it as SeaweedStartError.
    "exchange.dev.seaweed._PortOpen",
    # Private control flow: the Publisher rolls back, steps down and logs it.
    "exchange.services.auditlog._Fenced",
    # Private control flow: download_verified checks every kept part and goes on.
    "exchange.client._download._TrustedPartsWrong",
}

#: What `exit_code_for` answered for each class before the IntegrityFailure branch (computed by
#: running the old list-of-pairs mapping over every class), and must still answer.
EXIT_CODES_BEFORE = {
    "AgeError": 8,
    "AgeHeaderError": 8,
    "AgeHeaderMacError": 8,
    "AgeNoIdentityMatch": 8,
    "AgePayloadError": 8,
    "AuditEventUnverified": 8,
    "AuditLogDamaged": 7,
    "AuthError": 3,
    "BadSignature": 3,
    "BodyTimeout": 2,
    "ClockSkew": 3,
    "Conflict": 6,
    "DatabaseUnavailable": 7,
    "DependencyError": 7,
    "DigestMismatch": 3,
    "ExchangeError": 1,
    "FormatError": 8,
    "InputError": 2,
    "IntegrityError": 8,
    "LinkRefused": 5,
    "LocalFileError": 2,
    "ManifestError": 8,
    "MissingSignature": 3,
    "NotFound": 5,
    "NoteError": 8,
    "PayloadTooLarge": 2,
    "PermissionDenied": 4,
    "ProofError": 8,
    "KeyRotationError": 8,  # new with key rotation (issue 18): a FormatError like its siblings
    "RangeNotSatisfiable": 2,
    "RateLimited": 2,
    "ReplayedNonce": 3,
    "ServiceUnreachable": 7,
    "StorageUnavailable": 7,
    "UnknownKey": 3,
    "UnsupportedMediaType": 2,
    "ValidationError": 2,
}

#: Classes that joined the root with the IntegrityFailure branch, and what their branch answers.
EXIT_CODES_JOINED = {
    "IntegrityFailure": 8,
    "VerifyFailure": 8,  # `exchange audit verify` exits with the verdict's own code (10-16)
    "AddCheckpointError": 2,
    "CheckpointUntrusted": 2,
    "UnknownLogOrigin": 2,
    "CheckpointConflict": 2,
    "CheckpointInconsistent": 2,
    "InternalAddressRefused": 7,
    "SeaweedStartError": 7,
}


def _modules() -> list[str]:
    names = ["exchange"]
    for info in pkgutil.walk_packages(exchange.__path__, "exchange."):
        if info.name.rsplit(".", 1)[-1] == "__main__":  # runs the CLI when imported
            continue
        names.append(info.name)
    return names


def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of the package, by qualified name."""
    found: dict[str, type[BaseException]] = {}
    for name in _modules():
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == name:
                found[f"{name}.{obj.__qualname__}"] = obj
    return found


CLASSES = _exception_classes()
DOC = errors.__doc__ or ""
DRAWING = DOC.split("```")[1]
#: A node of the drawing: the root alone on its line, or `├── Name` / `└── Name` after the rails.
_NODE = re.compile(r"^(?P<rails>[│ ]*)[├└]── (?P<name>\w+)|^(?P<root>\w+)\s*$")


def _nodes() -> list[tuple[int, str, str]]:
    """(depth, name, line) for every class drawn, in order; the root is at depth 0."""
    nodes = []
    for line in DRAWING.splitlines():
        match = _NODE.match(line)
        if match and match["root"]:
            nodes.append((0, match["root"], line))
        elif match:
            nodes.append((len(match["rails"]) // 4 + 1, match["name"], line))
    return nodes


def test_the_walk_finds_the_classes_of_every_floor() -> None:
    modules = {cls.__module__ for cls in CLASSES.values()}
    assert {
        "exchange.errors",
        "exchange.witness",
        "exchange.dev.seaweed",
        "exchange.services.tokens",
    } <= modules


@pytest.mark.parametrize("qualname", sorted(CLASSES))
def test_every_exception_class_joins_the_root(qualname: str) -> None:
    if qualname in OUTSIDE_THE_TREE:
        assert not issubclass(CLASSES[qualname], ExchangeError), f"{qualname} joined the tree: unlist it"
        return
    assert issubclass(CLASSES[qualname], ExchangeError), (
        f"{qualname} is outside the error tree: derive it from the branch of exchange.errors that says"
        " who is at fault, or list it in OUTSIDE_THE_TREE with the reason"
    )


@pytest.mark.parametrize("qualname", sorted(CLASSES))
def test_every_exception_class_is_drawn_once_with_its_module(qualname: str) -> None:
    cls = CLASSES[qualname]
    if qualname in OUTSIDE_THE_TREE:
        assert f"`{cls.__qualname__}`" in DOC, f"say in exchange.errors why {qualname} is outside the tree"
        return
    lines = [line for _, name, line in _nodes() if name == cls.__qualname__]
    assert len(lines) == 1, f"{cls.__qualname__} is drawn {len(lines)} times in exchange.errors, not once"
    if cls.__module__ != "exchange.errors":
        where = Path(inspect.getfile(cls)).relative_to(Path(exchange.__file__).parent).as_posix()
        assert f"({where})" in lines[0], f"the drawing of {cls.__qualname__} does not say it is in {where}"


def test_the_drawing_names_only_classes_and_nests_as_they_do() -> None:
    by_name = {cls.__qualname__: cls for cls in CLASSES.values()}
    parents: list[tuple[int, str]] = []
    for depth, name, _ in _nodes():
        assert name in by_name, f"the drawing names {name}, which no module defines"
        while parents and parents[-1][0] >= depth:
            parents.pop()
        if parents:
            assert by_name[name].__bases__[0] is by_name[parents[-1][1]], (
                f"{name} is drawn under {parents[-1][1]}"
            )
        else:
            assert by_name[name] is ExchangeError
        parents.append((depth, name))


@pytest.mark.parametrize("qualname", sorted(q for q in CLASSES if q not in OUTSIDE_THE_TREE))
def test_exit_codes(qualname: str) -> None:
    cls = CLASSES[qualname]
    expected = {**EXIT_CODES_BEFORE, **EXIT_CODES_JOINED}
    assert cls.__qualname__ in expected, f"{qualname} is new: add its exit code to this table"
    error = cls.__new__(cls)
    ExchangeError.__init__(error, "x")
    assert exit_code_for(error) == expected[cls.__qualname__]


def test_the_tables_name_no_class_that_is_gone() -> None:
    defined = {cls.__qualname__ for cls in CLASSES.values()}
    assert set(EXIT_CODES_BEFORE) | set(EXIT_CODES_JOINED) <= defined
