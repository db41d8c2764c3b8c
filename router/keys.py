"""tpserve's Redis key schema, in one place: every key the router, the request router
(cluster/pinning.py) and the engine replicas (cluster/engine.py) read or write is
formatted here.

- A session key names what a request is pinned on: `kind:value`, kind "session" (an
  X-Session-ID), "user" (the OpenAI `user`) or "ip" (the client's address); the kind keeps a
  user named "10.0.0.1" apart from that IP (router/policy.py: SessionKey).
- `{prefix}s:{session key}`, a hash: the pin (`replica`) and `last_seen`.
- `{prefix}h:{session key}`, a list: the chat history, JSON messages, oldest first.
- `{prefix}replica:{replica id}`, a string: the JSON stats an engine replica publishes
  (short TTL) for the dashboard.

`prefix` is "tpserve:" unless a SessionStoreConfig says otherwise (router/sessions.py).
"""

from __future__ import annotations

PREFIX = "tpserve:"


def session(kind: str, value: str) -> str:
    """The session key of a request keyed on `kind` ("session", "user", "ip")."""
    return f"{kind}:{value}"


def session_id(sid: str) -> str:
    """The session key of an X-Session-ID (what GET/DELETE /v1/sessions/{id} name)."""
    return session("session", sid)


def pin(key: str, prefix: str = PREFIX) -> str:
    """The hash of a session key's pin and last_seen."""
    return f"{prefix}s:{key}"


def history(key: str, prefix: str = PREFIX) -> str:
    """The list of a session key's chat messages."""
    return f"{prefix}h:{key}"


def stats(replica: str, prefix: str = PREFIX) -> str:
    """The stats one engine replica publishes."""
    return f"{prefix}replica:{replica}"


def escape_glob(text: str) -> str:
    """`text` as a literal inside a Redis MATCH pattern."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def pins_pattern(prefix: str = PREFIX) -> str:
    """MATCH pattern of every pin hash."""
    return escape_glob(prefix) + "s:*"


def stats_pattern(prefix: str = PREFIX) -> str:
    """MATCH pattern of every replica's stats."""
    return escape_glob(prefix) + "replica:*"


def replica_of_stats(key: str, prefix: str = PREFIX) -> str:
    """The replica id in a stats key."""
    return key.removeprefix(f"{prefix}replica:")
