"""HTTP for ``housing doctor`` and the webhook notifier: requests with bounded urllib3 retries.

requests is imported on first use, so importing a module built on this one stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import requests


def session(*, trust_env: bool = True, **retry: Any) -> requests.Session:
    """A Session whose adapters retry as ``urllib3.util.Retry(**retry)`` says."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util import Retry

    result = requests.Session()
    result.trust_env = trust_env
    adapter = HTTPAdapter(max_retries=Retry(**retry))
    result.mount("http://", adapter)
    result.mount("https://", adapter)
    return result


def root_cause(exc: BaseException) -> BaseException:
    """The innermost error behind a requests/urllib3 one (e.g. ``ConnectionRefusedError``)."""
    seen = {id(exc)}
    while True:
        inner = getattr(exc, "reason", None)  # urllib3's MaxRetryError
        if not isinstance(inner, BaseException):
            inner = exc.__cause__ or next(
                (arg for arg in exc.args if isinstance(arg, BaseException)), None
            )
        if inner is None or id(inner) in seen:
            return exc
        seen.add(id(inner))
        exc = inner
