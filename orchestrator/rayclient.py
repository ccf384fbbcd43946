"""The Ray Jobs API client alexray uses: which address, which token, and one line for each way it fails.

**Addresses.** ``resolve_address`` takes the argument, then ``RAY_API_SERVER_ADDRESS`` (Ray's own
variable for the Jobs API), then ``RAY_ADDRESS``, then ``http://127.0.0.1:8265``. A bare
``host:port`` becomes ``http://host:port``, a bare host gets the dashboard port 8265, ``auto``
means the local default. ``ray://`` client addresses and GCS ports (6379) are refused with the fix.

**Security.** The Jobs API runs whatever command it is given, on every node's credentials.
Clusters with port 8265 open were taken over in the wild (ShadowRay, CVE-2023-48022), and a Ray
token travels in clear text over plain HTTP. So a plain ``http://`` address whose host is not
loopback (127.0.0.0/8, ``localhost``, ``::1``) is refused before any connection is made, unless
``insecure=True``: use an SSH tunnel (``ssh -L 8265:127.0.0.1:8265 HEAD``) or an https proxy.

**Tokens.** Ray 2.52+ clusters started with ``RAY_AUTH_MODE=token`` (or, since 2.59, any ``ray
start --head`` that finds a token) refuse requests without ``Authorization: Bearer TOKEN``. The
token is read from ``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token`` (Ray's own order) and passed to ``JobSubmissionClient(headers=...)``; Ray's
client keeps a caller's ``Authorization`` header as given. No token is sent when none is found.
Refusals (401: none sent, 403: wrong one) become a ``JobError`` naming ``RAY_AUTH_TOKEN``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import threading
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from alexray_core.errors import AlexrayError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DASHBOARD_PORT = 8265
TOKEN_HINT = ("set RAY_AUTH_TOKEN to the cluster's token (print it with 'ray get-auth-token' on the head), "
              "or point RAY_AUTH_TOKEN_PATH at a file holding it")


class JobError(AlexrayError):
    """A problem the user can fix; the message names it and the fix, on one line."""


# --- addresses and security -------------------------------------------------------------------

def resolve_address(address: str | None = None) -> str:
    """The Jobs API (dashboard) URL: the argument, RAY_API_SERVER_ADDRESS, RAY_ADDRESS, the local default."""
    source = "--address"
    if not address:
        for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            if os.environ.get(name, "").strip():
                address, source = os.environ[name].strip(), name
                break
        else:
            return DEFAULT_ADDRESS
    address = address.strip()
    if address in ("auto", "local"):
        return DEFAULT_ADDRESS
    if address.startswith("ray://"):
        raise JobError(f"{source}: {address} is a Ray Client address; the Jobs API is the dashboard's HTTP "
                       f"address: pass e.g. http://HEAD:{DASHBOARD_PORT}")
    bare = "://" not in address
    if bare:
        address = f"http://{address}"
    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError as e:
        raise JobError(f"{source}: {address!r} is not a valid address ({e}); pass http(s)://HOST:PORT") from None
    if parts.scheme not in ("http", "https"):
        raise JobError(f"{source}: unsupported scheme {parts.scheme!r} in {address}; "
                       f"pass the dashboard address, http(s)://HOST:{DASHBOARD_PORT}")
    if parts.username or parts.password:
        raise JobError(f"{source}: the address carries credentials; remove them and give the cluster's token "
                       "through RAY_AUTH_TOKEN")
    if not parts.hostname:
        raise JobError(f"{source}: {address!r} names no host; pass http(s)://HOST:{DASHBOARD_PORT}")
    if port == 6379:
        raise JobError(f"{source}: {address} looks like the cluster's GCS port (6379); the Jobs API listens on "
                       f"the dashboard port: pass http://{parts.hostname}:{DASHBOARD_PORT}")
    netloc = parts.netloc
    if port is None and bare and not parts.path.strip("/"):
        netloc = f"{netloc}:{DASHBOARD_PORT}"  # a bare host: the dashboard's default port
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def is_loopback(address: str) -> bool:
    """True when the URL's host is a loopback address or ``localhost`` (no name is looked up)."""
    host = (urlsplit(address).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_secure(address: str, insecure: bool = False) -> None:
    """Refuse plain HTTP to a host other than this one, before anything is sent."""
    if insecure or urlsplit(address).scheme != "http" or is_loopback(address):
        return
    host = urlsplit(address).hostname
    raise JobError(
        f"refusing plain http:// to {address}: the Ray Jobs API runs arbitrary code and the token would travel "
        f"in clear text (clusters with an open port {DASHBOARD_PORT} were taken over: ShadowRay, CVE-2023-48022); "
        f"use an SSH tunnel (ssh -L {DASHBOARD_PORT}:127.0.0.1:{DASHBOARD_PORT} {host}, then "
        f"--address http://127.0.0.1:{DASHBOARD_PORT}) or https://, or pass --insecure on a trusted network")


def auth_token() -> tuple[str | None, str]:
    """``(token, where it came from)``: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token, or None."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise JobError(f"RAY_AUTH_TOKEN_PATH: cannot read {path} ({e.strerror}); {TOKEN_HINT}") from None
        if not token:
            raise JobError(f"RAY_AUTH_TOKEN_PATH: {path} is empty; {TOKEN_HINT}")
        return token, f"RAY_AUTH_TOKEN_PATH ({path})"
    default = Path.home() / ".ray" / "auth_token"
    try:
        token = default.read_text().strip()
    except OSError:
        return None, "no token"
    return (token, str(default)) if token else (None, "no token")


# --- the client and its errors ----------------------------------------------------------------

_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    # JobSubmissionClient replaces the address it is given with RAY_API_SERVER_ADDRESS or RAY_ADDRESS
    # when either is set; the address checked above must be the one contacted.
    with _ENV_LOCK:
        saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def guard(address: str, token_source: str = "the token") -> Iterator[None]:
    """Turn the Jobs SDK's connection, TLS and authentication errors into JobErrors."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except JobError:
        raise
    except AuthenticationError as e:
        text = str(e.message if hasattr(e, "message") else e)
        if text.startswith("Authentication required") or "401" in text:
            raise JobError(f"the Ray cluster at {address} requires a token and none was sent; {TOKEN_HINT}") from None
        raise JobError(f"the Ray cluster at {address} refused {token_source}; {TOKEN_HINT}") from None
    except requests.exceptions.SSLError as e:
        raise JobError(f"TLS check failed for {address} ({_one_line(e)[:200]}); fix the certificate "
                       "or pass verify= with the cluster's CA bundle") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError) as e:
        raise JobError(f"cannot reach the Ray cluster at {address}: start one with 'ray start --head' "
                       "or pass --address") from e
    except Exception as e:  # aiohttp's errors while following logs
        name = type(e).__name__
        if name == "WSServerHandshakeError" and getattr(e, "status", None) in (401, 403):
            raise JobError(f"the Ray cluster at {address} refused {token_source}; {TOKEN_HINT}") from None
        if name.startswith("ClientConnector") or name == "ServerDisconnectedError":
            raise JobError(f"cannot reach the Ray cluster at {address}: start one with 'ray start --head' "
                           "or pass --address") from e
        if isinstance(e, RuntimeError) and "Version check returned 404" in str(e):
            raise JobError(f"{address} answers HTTP but is not a Ray dashboard with the Jobs API; "
                           f"pass the dashboard address (port {DASHBOARD_PORT} by default)") from None
        raise


def client(address: str | None = None, insecure: bool = False, verify: bool | str = True):
    """A ``JobSubmissionClient`` for the cluster, sending the Ray token when one is found.

    The address is checked (``check_secure``) before anything is sent; the client's constructor
    then checks the connection and the cluster's Ray version.
    """
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    check_secure(address, insecure)
    token, source = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with guard(address, f"the token from {source}"), _without_address_env():
        job_client = JobSubmissionClient(address, headers=headers, verify=verify)
    # The SDK client keeps no public record of the address it was given or where its token came
    # from; error messages need both, so they ride on the client object. Only the functions below
    # read them.
    job_client.alexray_address = address
    job_client.alexray_token_source = source
    return job_client


def client_of(address, insecure: bool):
    """``address`` when it is already a client, else a new client for it."""
    if address is not None and not isinstance(address, str):
        return address
    return client(address, insecure)


def client_address(job_client) -> str:
    return getattr(job_client, "alexray_address", "the cluster")


def guard_of(job_client):
    """``guard`` for calls through ``job_client``."""
    return guard(client_address(job_client),
                 f"the token from {getattr(job_client, 'alexray_token_source', 'this machine')}")


def get_json(job_client, endpoint: str) -> tuple[dict | None, str]:
    """``(parsed body or None, what the server said)`` of a GET on the dashboard's HTTP API.

    The SDK has no public call for dashboard endpoints other than jobs (such as the nodes list);
    its private ``_do_request`` sends the request with the client's address, headers and TLS
    settings, so it is used here, and only here.
    """
    with guard_of(job_client):
        response = job_client._do_request("GET", endpoint)
    try:
        return response.json(), f"HTTP {response.status_code}"
    except ValueError:
        return None, f"HTTP {response.status_code}: {response.text[:200]!r}"
