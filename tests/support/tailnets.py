"""The imaginary tailnet the namespace tests share: the owner's "studio" serving, laptops as peers."""

from __future__ import annotations

from typing import Any

from support.localapi_standin import Node, Tailnet

DOMAIN = "tail1234.ts.net"
STUDIO = f"studio.{DOMAIN}"


def laptop(who: str, ip: str, user_id: int, **kw: Any) -> Node:
    """`who`'s laptop: node `<who>-laptop`, login `<who>@example.com`."""
    return Node(f"{who}-laptop.{DOMAIN}", [ip], login_name=f"{who}@example.com", user_id=user_id,
                **kw)


def studio_tailnet(node_ip: str, *peers: Node) -> Tailnet:
    """The owner's server `studio` (owner@example.com, with a tailnet cert) and its peers."""
    me = Node(STUDIO, [node_ip], login_name="owner@example.com", display_name="Owner", user_id=1)
    return Tailnet(me, list(peers), cert_domains=[STUDIO])
