"""Workarounds for the SDKs' missing public APIs and bugs: one module per SDK.

Each private attribute or patch the package relies on lives here, in one small
function whose comment names the locked version (``uv.lock``) and the bug or missing
API; callers import these functions. ``tests/test_quirks.py`` checks each one against
the installed versions, so an upgrade that removes or changes one fails a test. Every
module imports its SDK inside the functions (nothing happens at import time).
"""
