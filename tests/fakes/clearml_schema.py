"""The ClearML SDK's own API schemas, to hold the fake server's traffic to them.

The SDK ships every service's request and response classes, each with its JSON schema
(``clearml.backend_api.services.v2_<n>.<service>``), and talks to a server with the newest
of those versions not above the ``api_version`` in the server's login token
(``ApiServiceProxy``). :func:`schema_version` picks the same one for the fake's token;
:func:`request_problems` and :func:`response_problems` list what does not fit, each
naming the endpoint and field.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from collections.abc import Mapping
from typing import Any

_VERSION_MODULE = re.compile(r"^v(\d+)_(\d+)$")

# Endpoints the server has and the SDK ships no class for (the project calls them over
# plain HTTP): request and response schema from clearml-server 2.0.0 schema/services/*.conf.
SERVER_ONLY: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "debug.ping": (
        {"type": "object", "additionalProperties": True},
        {"type": "object", "properties": {}},
    ),
}


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@functools.cache
def available_versions() -> tuple[str, ...]:
    """Every services version the installed SDK ships (``2.9``, ..., ``2.23``), ascending."""
    services = importlib.import_module("clearml.backend_api.services")
    found = []
    for module in pkgutil.iter_modules(services.__path__):
        match = _VERSION_MODULE.match(module.name)
        if match:
            found.append(f"{match[1]}.{match[2]}")
    return tuple(sorted(found, key=_version_tuple))


def schema_version(api_version: str) -> str:
    """The services version the SDK uses with a server announcing ``api_version``."""
    usable = [v for v in available_versions() if _version_tuple(v) <= _version_tuple(api_version)]
    if not usable:
        raise ValueError(f"the SDK has no services version <= {api_version}")
    return usable[-1]


@functools.cache
def endpoint_classes(version: str, service: str) -> Mapping[str, tuple[type, type]]:
    """``action -> (request class, response class)`` of one service at one version."""
    name = f"clearml.backend_api.services.v{version.replace('.', '_')}.{service}"
    try:
        module = importlib.import_module(name)
    except ImportError:
        return {}
    mapping: Mapping[type, type] = getattr(module, "response_mapping", {})
    return {str(getattr(req, "_action", "")): (req, resp) for req, resp in mapping.items()}


def classes(endpoint: str, version: str) -> tuple[type, type] | None:
    """The SDK's (request, response) classes of ``service.action``, or None if unknown."""
    service, _, action = endpoint.partition(".")
    return endpoint_classes(version, service).get(action)


def _errors(schema: Mapping[str, Any], instance: Any, where: str) -> list[str]:
    # the validator the SDK validates its own requests with (tuples count as arrays)
    from clearml.backend_api.session.datamodel import _CustomValidator

    assert _CustomValidator is not None, "jsonschema >= 3 is locked"
    validator = _CustomValidator(dict(schema))
    out = []
    for error in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in error.absolute_path) or "(body)"
        out.append(f"{where} field {path}: {error.message[:200]}")
    return out


def request_problems(endpoint: str, body: Any, version: str) -> list[str]:
    """What in a request ``body`` breaks the SDK's request schema of ``endpoint``."""
    if endpoint in SERVER_ONLY:
        return _errors(SERVER_ONLY[endpoint][0], body, f"{endpoint}: request")
    found = classes(endpoint, version)
    if found is None:
        return [f"{endpoint}: unknown endpoint in the SDK's API {version} schema"]
    request_cls = found[0]
    batched = getattr(request_cls, "_batched_request_cls", None)
    if isinstance(batched, type) and isinstance(body, list):  # events.add_batch: one per line
        problems = []
        for index, item in enumerate(body):
            schema = getattr(batched, "_schema", None) or {}
            problems += _errors(schema, item, f"{endpoint}: request item #{index}")
        return problems
    schema = getattr(request_cls, "_schema", None) or {}
    return _errors(schema, body, f"{endpoint}: request")


def response_problems(endpoint: str, data: Any, version: str) -> list[str]:
    """What in response ``data`` breaks the SDK's response schema, or its response class."""
    if endpoint in SERVER_ONLY:
        return _errors(SERVER_ONLY[endpoint][1], data, f"{endpoint}: response")
    found = classes(endpoint, version)
    if found is None:
        return []  # the request was already reported
    response_cls = found[1]
    problems = _errors(getattr(response_cls, "_schema", None) or {}, data, f"{endpoint}: response")
    try:
        response_cls(**data)  # what CallResult.from_result does with it
    except Exception as exc:  # the SDK only logs this and goes on with no response
        problems.append(f"{endpoint}: response does not parse: {type(exc).__name__}: {exc}")
    return problems
