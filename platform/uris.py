"""URIs given on the command line or in files: secrets masked wherever they are shown or saved, and the
MLflow tracking URI checked before anything starts.

A URI may carry credentials (``http://user:PASS@host:5000``, ``postgresql://user:PASS@db/mlflow``):
`redact` is what every print, MLflow param, tag and saved file gets; the full URI stays in memory.
Credentials are better given through the environment (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` /
``_TOKEN``, ``AWS_ACCESS_KEY_ID``...), which sdetr never copies anywhere.
"""

from __future__ import annotations

import os
import re

from sdetr.detector.errors import ConfigError

MASK = "***"
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/@?#]*)@")
_SECRET_QUERY = re.compile(r"(?i)([?&][^=&]*(?:password|passwd|token|secret|key)[^=&]*=)[^&#]*")
_TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "file")
_DATABASES = ("postgresql", "mysql", "mssql")


def redact(uri: str | None) -> str | None:
    """``uri`` with its password (``user:PASS@``, ``TOKEN@``) and secret query values masked: what is
    printed, logged as a param or saved. The full URI only ever lives in memory."""
    if not uri:
        return uri

    def mask(m: re.Match) -> str:
        user, _, password = m.group(2).partition(":")
        return f"{m.group(1)}{user}:{MASK}@" if password else f"{m.group(1)}{MASK}@"

    return _SECRET_QUERY.sub(rf"\g<1>{MASK}", _USERINFO.sub(mask, uri, count=1))


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Refuse, within ``timeout`` seconds and before anything starts, a tracking URI MLflow cannot use:
    an unknown scheme, a server that does not answer (or refuses the credentials), a database that
    cannot be connected to. The message names the URI (credentials masked)."""
    scheme = scheme_of(uri)
    if scheme not in _TRACKING_SCHEMES:
        raise ConfigError(
            f"MLflow tracking URI {redact(uri)}: unknown scheme {scheme!r}; expected a server "
            "(http://host:5000), sqlite:////abs/path/mlflow.db or a database (postgresql://user@host/db)"
        )
    if scheme in ("http", "https"):
        _probe_server(uri, timeout)
    elif scheme in _DATABASES:
        _probe_database(uri, timeout)


def _probe_server(uri: str, timeout: float) -> None:
    import base64
    import socket
    import urllib.error
    import urllib.parse
    import urllib.request

    m = _USERINFO.match(uri)
    url = uri[: m.start(2)] + uri[m.end() :] if m else uri
    where = f"MLflow tracking server {redact(uri)}"
    # Reachability in `timeout` seconds; a busy server then gets longer to answer the probe itself.
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{where}: cannot be reached ({exc}); start it, or fix --mlflow-uri / $MLFLOW_TRACKING_URI"
        ) from None
    headers = {}
    user, _, password = (m.group(2) if m else "").partition(":")
    if not user and os.environ.get("MLFLOW_TRACKING_USERNAME"):
        user = os.environ["MLFLOW_TRACKING_USERNAME"]
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    # Any MLflow server answers this (the /health route is optional behind proxies).
    probe = f"{url.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with urllib.request.urlopen(urllib.request.Request(probe, headers=headers), timeout=6 * timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ConfigError(f"{where}: refused the credentials (HTTP {exc.code})") from None
        raise ConfigError(
            f"{where}: not an MLflow server, or not working (HTTP {exc.code} on {probe})"
        ) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"{where}: does not answer ({reason}); is it an MLflow server? Fix --mlflow-uri or the server"
        ) from None


def _probe_database(uri: str, timeout: float) -> None:
    import sqlalchemy  # MLflow's own dependency; only database stores need it

    where = f"MLflow store {redact(uri)}"
    try:
        connect_args = {"connect_timeout": max(1, int(timeout))} if scheme_of(uri) != "mssql" else {}
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
    except ImportError as exc:
        raise ConfigError(f"{where}: its database driver is not installed ({exc})") from None
    except Exception as exc:  # sqlalchemy's ArgumentError and friends: a malformed URI
        raise ConfigError(f"{where}: not a database URI ({exc})") from None
    try:
        with engine.connect():
            pass
    except Exception as exc:  # OperationalError etc.: the first line says what (refused, no database...)
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ConfigError(f"{where}: cannot connect ({first})") from None
    finally:
        engine.dispose()


def usable_uri(saved: str | None) -> str | None:
    """The URI to use for one read back from a file: itself, or, when its password was masked, the
    same URI from $MLFLOW_TRACKING_URI; None when only the masked one is known."""
    if not saved or MASK not in saved:
        return saved
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    return env if env and redact(env) == saved else None
