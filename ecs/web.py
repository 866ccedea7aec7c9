"""The ECS's status page: plain HTML, CSS and JavaScript served by the ECS itself (no CDN, no
build step), the JSON behind it (``/status.json``, the same object as ``ecsclient status
--json``) and the ECS's Prometheus metrics (``/metrics``), on one listener (the ``web``
option, ``tcp:49990:interface=127.0.0.1`` by default; see L{chainstore.web} for access
beyond loopback).

The page polls ``/status.json`` every second and redraws in place: the ring as an SVG circle
(each range coloured by its head, middle and tail), the chains with their lag and window, the
members with their state and heartbeat age, and a reconfiguration's progress.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Request

from chainstore.control import NotLeader
from chainstore.web import MetricsResource, plain_error

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# The page's files (twisted.web.static is not used: importing it warns, deprecated, in Twisted
# itself, and the page needs three files, no directory listing and no range requests).
TYPES = {".html": b"text/html; charset=utf-8", ".css": b"text/css; charset=utf-8",
         ".js": b"text/javascript; charset=utf-8"}
# Only the ECS's own files and requests: a page that runs no third-party script.
CSP = b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"


def status_json(leader: Any) -> str:
    """The C{Status} answer of the leading ECS, as C{ecsclient status --json} prints it; raises
    L{NotLeader} on a standby."""
    return json.dumps({**leader.current().status(), **leader.ha_status()}, sort_keys=True)


class StatusJSON(Resource):
    """``/status.json``: the leading ECS's status now (a standby answers 503, naming the
    leader)."""

    isLeaf = True

    def __init__(self, leader: Any) -> None:
        super().__init__()
        self.leader = leader

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("cache-control", "no-store")
        try:
            body = status_json(self.leader)
        except NotLeader as e:
            return _not_leader(request, e)
        request.setHeader("content-type", "application/json")
        return body.encode("utf-8")


class LeaderMetrics(Resource):
    """``/metrics`` of whichever ECS leads: each term's coordinator has its own registry."""

    isLeaf = True

    def __init__(self, leader: Any) -> None:
        super().__init__()
        self.leader = leader

    def render_GET(self, request: Request) -> bytes:
        try:
            ecs = self.leader.current()
        except NotLeader as e:
            return _not_leader(request, e)
        return MetricsResource(ecs.metrics.registry).render_GET(request)


def _not_leader(request: Request, error: Exception) -> bytes:
    return plain_error(request, 503, str(error))


class _Page(Resource):
    """One of the page's files, read when asked for, with the page's content security
    policy."""

    isLeaf = True

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.type = TYPES[os.path.splitext(path)[1]]

    def render_GET(self, request: Request) -> bytes:
        if request.postpath:  # (a path below a file)
            return notFound("No such page", "There is nothing here.").render(request)
        try:
            with open(self.path, "rb") as f:
                body = f.read()
        except OSError:
            return notFound("No such file", "The page's files are missing.").render(request)
        request.setHeader("content-type", self.type)
        request.setHeader("content-security-policy", CSP)
        request.setHeader("cache-control", "no-cache")
        return body


class _Folder(Resource):
    """Its children only: anything else is 404 (Resource's own answer is deprecated)."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return notFound("No such page", "There is nothing here.")


def _static() -> Resource:
    """``/static/``: the page's script and style, nothing else (and no listing)."""
    static = _Folder()
    for name in sorted(os.listdir(STATIC)):
        if os.path.splitext(name)[1] in TYPES and name != "index.html":
            static.putChild(name.encode("ascii"), _Page(os.path.join(STATIC, name)))
    return static


def status_root(leader: Any) -> Resource:
    """``/`` the page, ``/static/...`` its script and style, ``/status.json``, ``/metrics``, of
    C{leader} (L{ecs.leadership.Fixed} or L{ecs.leadership.Leadership})."""
    root = _Folder()
    root.putChild(b"", _Page(os.path.join(STATIC, "index.html")))
    root.putChild(b"static", _static())
    root.putChild(b"status.json", StatusJSON(leader))
    root.putChild(b"metrics", LeaderMetrics(leader))
    return root
