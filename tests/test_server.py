"""app/server.py subclasses uvicorn's httptools protocol and calls and overrides its private methods
(pyproject pins uvicorn to the release tested). A new uvicorn that changes any of them must fail here,
loudly, before the head limits stop working silently: upgrade uvicorn, re-read the methods, adapt
app/server.py, then update the fingerprints below."""

from __future__ import annotations

import hashlib
import inspect

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.server import GuardedHttpToolsProtocol

# sha256 (first 16 hex digits) of the source of each method app/server.py overrides or copies, in uvicorn 0.55
OVERRIDDEN = {
    "data_received": "010a7ae59a5d3b1a",  # copied, with the head's size counted
    "connection_made": "6efb565ff3d36b91",
    "on_message_begin": "96d377fdc7c2baef",
    "on_headers_complete": "1ea8589acfad92d8",
}
# what app/server.py calls or reads that uvicorn does not document
USED = ["_unset_keepalive_if_required", "_should_upgrade", "_unsupported_upgrade_warning", "handle_websocket_upgrade",
        "send_400_response", "timeout_keep_alive_handler"]


@pytest.mark.parametrize(("name", "fingerprint"), sorted(OVERRIDDEN.items()))
def test_the_uvicorn_methods_the_guards_override_are_the_ones_they_were_written_against(name: str,
                                                                                       fingerprint: str) -> None:
    source = inspect.getsource(getattr(HttpToolsProtocol, name))
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == fingerprint, f"uvicorn changed {name}"
    assert name in GuardedHttpToolsProtocol.__dict__  # still overridden here


@pytest.mark.parametrize("name", USED)
def test_the_private_members_the_guards_call_still_exist(name: str) -> None:
    assert callable(getattr(HttpToolsProtocol, name, None)), name


def test_the_instance_state_the_guards_read_is_still_set() -> None:
    source = inspect.getsource(HttpToolsProtocol.__init__)
    for attribute in ("self.parser", "self.connections", "self.server_state", "self.timeout_keep_alive_task",
                      "self.timeout_keep_alive"):
        assert f"{attribute} =" in source or f"{attribute}: " in source, attribute
