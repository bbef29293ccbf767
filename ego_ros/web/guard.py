# SPDX-License-Identifier: Apache-2.0
"""Who may use the page: the token, and the checks that keep other web sites out.

- **The token.** Bound to a loopback address (the default), only this machine reaches the page. Bound to anything
  else, every ``/api/`` request, reading ones included (the camera is as private as the controls), needs the token
  the command prints at start: in the ``X-Ego-Token`` header, or ``?token=`` where a browser cannot set a header
  (an ``EventSource``). The page takes it from its URL's fragment (``#token=...``), which browsers never send to a
  server or put in a Referer. Without it: 403, and nothing happens.
- **Other sites in the same browser.** A page from elsewhere could post to ``127.0.0.1`` (cross-site request
  forgery): a state-changing request must be ``application/json`` (which a foreign page cannot send without a CORS
  preflight, never granted here) and, when the browser says where it comes from (``Origin``), from this page.
- **DNS rebinding.** Bound to loopback, a request must name a loopback host in ``Host``: a foreign name that
  resolves to 127.0.0.1 is refused.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from urllib.parse import urlsplit

TOKEN_HEADER = "X-Ego-Token"
TOKEN_QUERY = "token"
LOOPBACK_NAMES = ("localhost", "localhost.")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost."""
    host = host.strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


class Guard:
    """The checks above for a server bound to loopback (``token`` None) or beyond it (``token`` set)."""

    def __init__(self, token: str | None):
        self.token = token

    def refusal(self, method: str, path: str, headers, query) -> str | None:
        """Why this request is refused (a 403's message), or None."""
        host = headers.get("Host", "")
        if self.token is None and not is_loopback(urlsplit(f"//{host}").hostname or ""):
            return f"this page is served to this machine only; {host[:60]!r} is not a local address"
        if method not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("Origin")
            if origin is not None and urlsplit(origin).netloc != host:
                return "a request from another site is refused"
            if headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
                return "a request that changes something must be application/json"
        if self.token is not None and path.startswith("/api/"):
            given = headers.get(TOKEN_HEADER) or query.get(TOKEN_QUERY) or ""
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return ("this page needs the token that 'ego-ros web' printed at start: open the address it "
                        "printed (with #token=...)")
        return None
