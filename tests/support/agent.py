"""What the agent-API tests share: a tool schema, and a server with `lmlink link` in front."""

from __future__ import annotations

import contextlib
from typing import Iterator

from conftest import start_server, stop_server
from support.link import start_link

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "unit": {"enum": ["C", "F"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["city", "days", "unit", "tags"],
    "additionalProperties": False,
}


@contextlib.contextmanager
def serve_with_link() -> Iterator[dict[str, str]]:
    """A real `lmlink serve` and a real `lmlink link` to it: base URLs by door."""
    srv = start_server()
    link, url = start_link(srv.address)
    try:
        yield {"server": srv.http_url, "link": url.rstrip("/").removesuffix("/v1")}
    finally:
        link.terminate()
        link.wait(10)
        stop_server(srv.process)
