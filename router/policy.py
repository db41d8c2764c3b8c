"""The pin policy: which session a request belongs to, and which replica serves it.

Pure functions, no I/O: the HTTP app (`router/app.py`) hands in headers, the socket
peer and the live replicas' loads; the session store (`router/sessions.py`) keeps the
pins. Contract:

- A request's session is, in order of precedence, the `X-Session-ID` header, the
  OpenAI `user` field, or the client IP (`session_key`). Bad values raise
  `PolicyError`, a client error whose message says what to change.
- The client IP is the socket peer; `X-Real-IP` / `X-Forwarded-For` are believed only
  when the peer is a configured trusted proxy (`client_ip`). Header values never raise.
- A new session goes to its highest-ranked replica under rendezvous hashing unless that
  replica is over a load bound (`choose_replica`); the ranking is the same in every
  router process, so routers agree without talking to each other.
- Which requests store a session in Redis (`stored_session`): those that use one (an
  X-Session-ID, or a chat body's "session" field), or all with the "always" policy; the
  pin of a client without one (its `user` or IP) is one key per client, not per request.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from router import keys

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Starts with an alphanumeric so an id cannot look like an option or a path; 128 chars
# bounds the Redis key; ':' is allowed so clients may namespace their own ids.
SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_USER_LEN = 256
SESSION_KINDS = ("session", "user", "ip")
# RouterConfig.routing. pinned: a session keeps its replica (the prefix cache pays);
# random: every request to a random live replica (the baseline pinning is measured by)
ROUTING_MODES = ("pinned", "random")
# RouterConfig.sessions: when the router stores a session (its pin and chat history).
# on_use: only when the request uses one (an X-Session-ID header, or a chat body with
# "session": {...}); always: every request, under an id the router makes and returns.
SESSION_POLICIES = ("on_use", "always")
# RouterConfig.rate_limit_per_minute: requests a minute per session key (session id, user,
# else client IP) at each router replica; 0 = no limit. Off by default: a key is often
# many people (every user behind one NAT or proxy, a benchmark host), and overload is
# already refused by max_in_flight (429 with Retry-After).
RATE_LIMIT_PER_MINUTE = 0


class PolicyError(ValueError):
    """A client error (the app answers 4xx); the message says what is wrong."""


@dataclass(frozen=True)
class SessionKey:
    """What a request's pin is keyed on: kind is "session", "user" or "ip"."""

    kind: str
    value: str

    def __post_init__(self) -> None:
        if self.kind not in SESSION_KINDS:
            raise ValueError(f"SessionKey kind={self.kind!r}: use one of {SESSION_KINDS}")

    @property
    def redis_key(self) -> str:
        # the kind prefix keeps a user named "10.0.0.1" apart from that IP's session
        return keys.session(self.kind, self.value)


# ---- trusted proxies and the client IP ----------------------------------------------


def parse_networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    """Trusted-proxy networks from config: CIDRs ("10.0.0.0/8") or plain IPs (a /32 or
    /128). Host bits set ("10.0.0.1/8") are an error: they usually hide a typo that would
    trust far more addresses than meant."""
    if isinstance(cidrs, str):  # a lone string would otherwise be read char by char
        raise PolicyError(f"trusted proxies must be a list of CIDRs, not the string {cidrs!r}")
    return tuple(_parse_network(c) for c in cidrs)


def _parse_network(cidr: str) -> Network:
    if not isinstance(cidr, str):
        raise PolicyError(f"trusted proxy {cidr!r} is not a string; write e.g. '10.0.0.0/8'")
    try:
        return ipaddress.ip_network(cidr.strip(), strict=True)
    except ValueError as e:
        raise PolicyError(
            f"trusted proxy {cidr!r} is not an IP or CIDR ({e}); write e.g. '10.0.0.0/8' "
            "or '192.168.1.5'") from None


def client_ip(peer: str, headers: Mapping[str, str], trusted: Sequence[Network]) -> str:
    """The client's IP: the socket peer, unless the peer is a trusted proxy; then
    X-Real-IP if valid, else the rightmost X-Forwarded-For hop that is not trusted,
    else the peer. Never raises on header contents."""
    peer_ip = _parse_ip(peer)
    if peer_ip is None:  # e.g. a unix socket: nothing to trust, nothing to normalise
        return peer
    if not _is_trusted(peer_ip, trusted):
        return str(peer_ip)  # an untrusted peer's forwarding headers are spoofable
    real = _header_values(headers, "x-real-ip")
    if len(real) == 1 and (real_ip := _parse_ip(real[0])) is not None:
        return str(real_ip)
    forwarded = _forwarded_for(headers, trusted)
    return str(forwarded if forwarded is not None else peer_ip)


def _forwarded_for(headers: Mapping[str, str], trusted: Sequence[Network]) -> IPAddress | None:
    """Walk X-Forwarded-For from the right: each hop was appended by the proxy to its
    right, so hops are believable only while that proxy is trusted. The first untrusted
    hop is the client; anything left of it is client-supplied and never read. A
    malformed hop inside the believable part voids the header. If every hop is trusted
    (a client inside a trusted network) the leftmost one is the client, as in nginx's
    real_ip_recursive."""
    hops = [h.strip() for v in _header_values(headers, "x-forwarded-for") for h in v.split(",")]
    last: IPAddress | None = None
    for hop in reversed(hops):
        ip = _parse_ip(hop)
        if ip is None:
            return None
        if not _is_trusted(ip, trusted):
            return ip
        last = ip
    return last


def _parse_ip(text: str) -> IPAddress | None:
    """An address, with IPv4-mapped IPv6 (::ffff:1.2.3.4) unwrapped so a dual-stack
    socket and an IPv4 trusted network agree; None when it is not an address."""
    if not isinstance(text, str):  # ip_address() would read 4 bytes or an int as an address
        return None
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_trusted(ip: IPAddress, trusted: Sequence[Network]) -> bool:
    # `in` across IP versions is False, not an error
    return any(ip in net for net in trusted)


def _header_values(headers: Mapping[str, str], name: str) -> list[str]:
    """All values of header `name` (lower case), matched case-insensitively. Iterating
    items() rather than calling get() works for plain dicts in any case and keeps
    repeated headers (Starlette's Headers yields each one)."""
    return [v for k, v in headers.items() if isinstance(k, str) and k.lower() == name]


# ---- sessions -----------------------------------------------------------------------


def session_key(headers: Mapping[str, str], user: object, peer: str,
                trusted: Sequence[Network]) -> SessionKey:
    """The key a request is pinned on: X-Session-ID, else the OpenAI `user` field, else
    the client IP. A present but bad X-Session-ID or `user` is a PolicyError rather than
    a silent fallback, so a client's typo does not scatter its session."""
    header = _session_header(headers)
    if header is not None:
        return SessionKey("session", header)
    if user is not None and not isinstance(user, str):
        raise PolicyError(f"'user' must be a string, got {type(user).__name__}")
    if user:  # an empty `user` means "not given", as some clients send ""
        if len(user) > MAX_USER_LEN:
            raise PolicyError(f"'user' is {len(user)} characters; the limit is {MAX_USER_LEN}")
        return SessionKey("user", user)
    return SessionKey("ip", client_ip(peer, headers, trusted))


def _session_header(headers: Mapping[str, str]) -> str | None:
    values = {v.strip() for v in _header_values(headers, "x-session-id")}
    if not values:
        return None
    if len(values) > 1:
        raise PolicyError("send one X-Session-ID header; this request has several values")
    value = values.pop()
    if not SESSION_ID_PATTERN.match(value):
        raise PolicyError(
            f"X-Session-ID {value[:40]!r} is invalid: use 1-128 characters from "
            "A-Z a-z 0-9 . _ : -, starting with a letter or digit, or omit the header "
            "to get a new id in the response")
    return value


def new_session_id() -> str:
    """A fresh session id: 128 random bits as 32 hex chars (matches SESSION_ID_PATTERN)."""
    return secrets.token_hex(16)


def stored_session(key: SessionKey, opens: bool, policy: str) -> str:
    """The id a request's session is stored under (its pin and chat history), or "" for a
    request that stores none. A client's X-Session-ID is always its session; otherwise the
    router makes a new id when the request opens one (`opens`: a chat body with
    "session": {...}) or when `policy` (SESSION_POLICIES) is "always"."""
    if policy not in SESSION_POLICIES:
        raise ValueError(f"session policy {policy!r}: use one of {SESSION_POLICIES}")
    if key.kind == "session":
        return key.value
    return new_session_id() if opens or policy == "always" else ""


# ---- replica choice -----------------------------------------------------------------


def rendezvous_order(key: str, replicas: Sequence[str]) -> list[str]:
    """Replicas ranked for `key` by highest-random-weight hashing: adding a replica moves
    only the keys that now rank it first; removing one moves only its own keys. blake2b,
    not hash(), so every router process ranks alike (hash() is salted per process)."""
    distinct = dict.fromkeys(replicas)  # a duplicate id must not rank twice
    return sorted(distinct, key=lambda r: (-_score(key, r), r))


def _score(key: str, replica: str) -> int:
    # NUL separates the parts so ("ab", "c") and ("a", "bc") hash differently
    digest = hashlib.blake2b(f"{key}\0{replica}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def choose_replica(key: str, loads: Mapping[str, int], load_factor: float = 1.25,
                   slack: int = 1) -> str:
    """The replica for a new (or re-pinned) session: the first in rendezvous order whose
    load is <= load_factor * mean load + slack, so a hot replica's sessions spill to
    their next choice instead of piling up (consistent hashing with bounded loads).
    `slack` lets an idle cluster (mean 0) still follow the hash. With load_factor >= 1
    and slack >= 0 the least loaded replica always qualifies; tighter settings can
    exclude every replica, and then the least loaded wins (ties by rendezvous order)."""
    if not loads:
        raise PolicyError("no live replica")
    order = rendezvous_order(key, list(loads))
    bound = load_factor * sum(loads.values()) / len(loads) + slack
    for replica in order:
        if loads[replica] <= bound:
            return replica
    return min(order, key=lambda r: loads[r])  # min is stable: ties keep rendezvous order


def pin_is_live(pinned: str | None, live: Collection[str]) -> bool:
    """Whether a stored pin can be honoured: it exists and its replica is still live."""
    return pinned is not None and pinned in live
