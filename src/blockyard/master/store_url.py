"""``--store`` URLs: ``sqlite:///ABSOLUTE/PATH`` and ``etcd://HOST:PORT[,HOST:PORT...][/PREFIX]``.

:func:`parse_store_url` is pure (the CLI calls it first, so a bad URL is a usage error before
anything starts); :func:`make_store` builds the store, unopened; :func:`open_store` builds and
opens it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from blockyard.errors import StoreUrlError
from blockyard.master.store import DEFAULT_OP_TIMEOUT_S, MasterStore

#: Key prefix of an etcd store when the URL names none.
DEFAULT_ETCD_PREFIX: Final = "/blockyard/"
#: Endpoints one etcd URL may list (an etcd cluster has 3, 5 or 7 members).
MAX_ETCD_ENDPOINTS: Final = 16
#: The longest URL accepted (a bound on what we parse).
MAX_URL_CHARS: Final = 4096

_HOST_RE: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_PREFIX_PART_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_USAGE: Final = (
    "use sqlite:///ABSOLUTE/PATH (one master) or etcd://HOST:PORT[,HOST:PORT...][/PREFIX] "
    "(several masters)"
)


@dataclass(frozen=True, slots=True)
class SqliteUrl:
    path: str


@dataclass(frozen=True, slots=True)
class EtcdUrl:
    #: ``host:port`` strings as gRPC takes them (IPv6 hosts in brackets).
    endpoints: tuple[str, ...]
    #: Every key of the store starts with this; starts and ends with "/".
    prefix: str = DEFAULT_ETCD_PREFIX


StoreUrl = SqliteUrl | EtcdUrl


def parse_store_url(url: str) -> StoreUrl:
    """Parse a ``--store`` URL; :class:`StoreUrlError` says what is wrong and what to write."""
    if len(url) > MAX_URL_CHARS:
        raise StoreUrlError(f"store URL is {len(url)} characters long; {_USAGE}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise StoreUrlError(f"store URL {url!r} has no scheme; {_USAGE}")
    if "?" in rest or "#" in rest:
        raise StoreUrlError(
            f"store URL {url!r} has a query or fragment, which none takes; {_USAGE}"
        )
    scheme = scheme.lower()
    if scheme == "sqlite":
        return _parse_sqlite(url, rest)
    if scheme == "etcd":
        return _parse_etcd(url, rest)
    raise StoreUrlError(f"store URL {url!r} has unknown scheme {scheme!r}; {_USAGE}")


def _parse_sqlite(url: str, rest: str) -> SqliteUrl:
    if not rest.startswith("/"):
        raise StoreUrlError(
            f"store URL {url!r}: a sqlite path must be absolute, written with three slashes "
            "(sqlite:///var/lib/blockyard/master.db)"
        )
    # sqlite:////abs/path (SQLAlchemy's spelling of an absolute path) means the same.
    path = PurePosixPath("/" + rest.lstrip("/"))
    if rest.endswith("/") or path.name in ("", ".", ".."):
        raise StoreUrlError(f"store URL {url!r} names a directory; name the database file")
    if "\x00" in rest:
        raise StoreUrlError(f"store URL {url!r} contains a NUL byte")
    return SqliteUrl(path=str(path))


def _parse_etcd(url: str, rest: str) -> EtcdUrl:
    hosts, slash, prefix_path = rest.partition("/")
    if not hosts:
        raise StoreUrlError(f"store URL {url!r} names no etcd endpoint; {_USAGE}")
    parts = hosts.split(",")
    if len(parts) > MAX_ETCD_ENDPOINTS:
        raise StoreUrlError(
            f"store URL {url!r} lists {len(parts)} endpoints; at most {MAX_ETCD_ENDPOINTS}"
        )
    endpoints = tuple(_parse_endpoint(url, part) for part in parts)
    if len(set(endpoints)) != len(endpoints):
        raise StoreUrlError(f"store URL {url!r} lists an endpoint twice")
    prefix = DEFAULT_ETCD_PREFIX
    if slash and prefix_path.strip("/"):
        pieces = prefix_path.strip("/").split("/")
        bad = [p for p in pieces if not _PREFIX_PART_RE.fullmatch(p)]
        if bad:
            raise StoreUrlError(
                f"store URL {url!r}: key prefix part {bad[0]!r} is not valid; use 1-64 "
                "characters from A-Z, a-z, 0-9, '.', '_' and '-' per part"
            )
        prefix = "/" + "/".join(pieces) + "/"
    return EtcdUrl(endpoints=endpoints, prefix=prefix)


def _parse_endpoint(url: str, part: str) -> str:
    if part.startswith("["):  # [v6]:port
        host, close, port_text = part[1:].partition("]")
        if not close or not port_text.startswith(":") or not host or ":" not in host:
            raise StoreUrlError(f"store URL {url!r}: endpoint {part!r} is not [IPV6]:PORT")
        port_text = port_text[1:]
        shown = f"[{host}]"
    else:
        host, colon, port_text = part.rpartition(":")
        if not colon or not host:
            raise StoreUrlError(
                f"store URL {url!r}: endpoint {part!r} has no port; write HOST:PORT "
                "(etcd listens on 2379 by default)"
            )
        if not _HOST_RE.fullmatch(host):
            raise StoreUrlError(f"store URL {url!r}: {host!r} is not a host name or address")
        shown = host
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise StoreUrlError(
            f"store URL {url!r}: port {port_text!r} of endpoint {part!r} is not 1-65535"
        )
    return f"{shown}:{int(port_text)}"


def make_store(
    url: str | StoreUrl,
    *,
    op_timeout_s: float = DEFAULT_OP_TIMEOUT_S,
    election_ttl_s: int | None = None,
) -> MasterStore:
    """The store a URL names, not yet opened. ``election_ttl_s`` is the etcd leader lease's TTL
    (ignored by sqlite)."""
    parsed = parse_store_url(url) if isinstance(url, str) else url
    if isinstance(parsed, SqliteUrl):
        from blockyard.master.store_sqlite import SqliteStore  # noqa: PLC0415

        return SqliteStore(Path(parsed.path), op_timeout_s=op_timeout_s)
    # Imported here so a sqlite master never loads the etcd client and its protos.
    from blockyard.master.store_etcd import DEFAULT_ELECTION_TTL_S, EtcdStore  # noqa: PLC0415

    return EtcdStore(
        parsed.endpoints,
        prefix=parsed.prefix,
        op_timeout_s=op_timeout_s,
        election_ttl_s=election_ttl_s or DEFAULT_ELECTION_TTL_S,
    )


async def open_store(
    url: str | StoreUrl,
    *,
    op_timeout_s: float = DEFAULT_OP_TIMEOUT_S,
    election_ttl_s: int | None = None,
) -> MasterStore:
    """Build the store a URL names and open it (sqlite: takes its lock; etcd: connects)."""
    store = make_store(url, op_timeout_s=op_timeout_s, election_ttl_s=election_ttl_s)
    await store.open()
    return store
