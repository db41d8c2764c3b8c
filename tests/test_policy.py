"""The pin policy with tiny fakes: header dicts, replica names and load maps; no HTTP,
no Redis. Rendezvous properties are checked on 10k keys (spread, movement) and with
hypothesis on small replica sets (relative order is stable under add/remove)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.policy import (
    SESSION_ID_PATTERN,
    PolicyError,
    SessionKey,
    choose_replica,
    client_ip,
    new_session_id,
    parse_networks,
    pin_is_live,
    rendezvous_order,
    session_key,
    stored_session,
)

KEYS = [f"session-{i}" for i in range(10_000)]
REPLICAS = ["replica-0", "replica-1", "replica-2", "replica-3"]
# nginx on the head node and an internal load balancer in front of it
TRUSTED = parse_networks(["10.0.0.0/8", "fd00::/8"])
NGINX = "10.0.0.2"

names = st.text("abcdefgh0123456789-", min_size=1, max_size=8)
replica_sets = st.lists(names, min_size=1, max_size=8, unique=True)
keys = st.text(max_size=40)


class RepeatedHeaders(Mapping[str, str]):
    """Like Starlette's Headers: lower-case names, items() keeps repeated headers."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = [(k.lower(), v) for k, v in pairs]

    def __getitem__(self, name: str) -> str:
        return next(v for k, v in self.pairs if k == name.lower())

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k for k, _ in self.pairs))

    def __len__(self) -> int:
        return len(set(k for k, _ in self.pairs))

    def items(self):  # type: ignore[override]
        return list(self.pairs)


def first_choices(replicas: list[str]) -> dict[str, str]:
    return {k: rendezvous_order(k, replicas)[0] for k in KEYS}


# ---- rendezvous hashing -------------------------------------------------------------


@given(keys, replica_sets)
def test_rendezvous_matches_reference_and_ignores_input_order(key: str, replicas: list[str]
                                                              ) -> None:
    def score(r: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{key}\0{r}".encode()).digest()[:8], "big")

    expected = sorted(replicas, key=lambda r: (-score(r), r))
    assert rendezvous_order(key, replicas) == expected
    assert rendezvous_order(key, list(reversed(replicas))) == expected


def test_rendezvous_is_the_same_in_another_process() -> None:
    # hash() is salted per process; the ranking must not be, or routers would disagree
    code = ("from router.policy import rendezvous_order as r; "
            "print([r(f'k{i}', ['a', 'b', 'c']) for i in range(50)])")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == str([rendezvous_order(f"k{i}", ["a", "b", "c"])
                                      for i in range(50)])


def test_rendezvous_deduplicates_and_handles_empty() -> None:
    assert sorted(rendezvous_order("k", ["a", "b", "a"])) == ["a", "b"]
    assert rendezvous_order("k", []) == []


def test_rendezvous_spreads_keys_evenly() -> None:
    counts = Counter(first_choices(REPLICAS).values())
    even = len(KEYS) / len(REPLICAS)
    assert set(counts) == set(REPLICAS)
    assert all(abs(n - even) <= 0.15 * even for n in counts.values()), counts


def test_adding_a_replica_moves_only_keys_to_it() -> None:
    before = first_choices(REPLICAS)
    after = first_choices([*REPLICAS, "replica-4"])
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "replica-4" for k in moved)  # nothing moves between old ones
    expected = len(KEYS) / (len(REPLICAS) + 1)
    assert abs(len(moved) - expected) <= 0.15 * expected, len(moved)


def test_removing_a_replica_moves_only_its_own_keys() -> None:
    before = first_choices(REPLICAS)
    after = first_choices(REPLICAS[1:])
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == REPLICAS[0]}


@given(keys, replica_sets, names)
def test_adding_or_removing_keeps_the_relative_order_of_the_rest(
        key: str, replicas: list[str], extra: str) -> None:
    # the stronger form of both movement properties, on any key and replica set
    grown = rendezvous_order(key, [*replicas, extra])
    assert [r for r in grown if r != extra] == rendezvous_order(
        key, [r for r in replicas if r != extra])


# ---- bounded load -------------------------------------------------------------------


def key_ranking_first(replica: str, replicas: list[str]) -> str:
    return next(k for k in KEYS if rendezvous_order(k, replicas)[0] == replica)


def test_idle_cluster_follows_the_hash() -> None:
    loads = dict.fromkeys(REPLICAS, 0)
    for k in KEYS[:200]:
        assert choose_replica(k, loads) == rendezvous_order(k, REPLICAS)[0]


def test_overloaded_first_choice_is_skipped_for_the_next() -> None:
    key = key_ranking_first("replica-0", REPLICAS)
    # mean 2.5, bound 1.25 * 2.5 + 1 = 4.125
    loads = {"replica-0": 10, "replica-1": 0, "replica-2": 0, "replica-3": 0}
    assert choose_replica(key, loads) == rendezvous_order(key, REPLICAS)[1]
    # exactly at the bound it keeps its sessions: mean 4, bound 1.25 * 4 + 1 = 6
    at_bound = {"replica-0": 6, "replica-1": 4, "replica-2": 3, "replica-3": 3}
    assert choose_replica(key, at_bound) == "replica-0"
    over = {**at_bound, "replica-0": 7}  # mean 4.25, bound 6.3125
    assert choose_replica(key, over) == rendezvous_order(key, REPLICAS)[1]


@given(keys, st.dictionaries(names, st.integers(0, 50), min_size=1, max_size=8),
       st.floats(0.1, 3.0), st.integers(0, 3))
def test_choice_is_the_first_ranked_replica_under_the_bound(
        key: str, loads: dict[str, int], load_factor: float, slack: int) -> None:
    chosen = choose_replica(key, loads, load_factor, slack)
    bound = load_factor * sum(loads.values()) / len(loads) + slack
    under = [r for r in rendezvous_order(key, list(loads)) if loads[r] <= bound]
    if under:
        assert chosen == under[0]
    else:
        assert loads[chosen] == min(loads.values())
    if load_factor >= 1:
        assert under  # the least loaded replica always fits a bound of at least the mean


def test_all_overloaded_picks_the_least_loaded_with_ties_by_rank() -> None:
    key = KEYS[0]
    order = rendezvous_order(key, REPLICAS)
    loads = {order[0]: 9, order[1]: 7, order[2]: 5, order[3]: 8}  # bound 0.5 * 7.25
    assert choose_replica(key, loads, load_factor=0.5, slack=0) == order[2]
    tied = {order[0]: 9, order[1]: 5, order[2]: 5, order[3]: 8}
    assert choose_replica(key, tied, load_factor=0.5, slack=0) == order[1]


def test_no_live_replica_is_an_error() -> None:
    with pytest.raises(PolicyError, match="no live replica"):
        choose_replica("k", {})


def test_pin_is_live() -> None:
    assert pin_is_live("a", {"a", "b"})
    assert not pin_is_live("c", {"a", "b"})
    assert not pin_is_live(None, {"a"})
    assert not pin_is_live("a", [])


# ---- session keys -------------------------------------------------------------------


def test_session_key_precedence_header_then_user_then_ip() -> None:
    h = {"X-Session-ID": "chat-42"}
    assert session_key(h, "alice", "1.2.3.4", TRUSTED) == SessionKey("session", "chat-42")
    assert session_key({}, "alice", "1.2.3.4", TRUSTED) == SessionKey("user", "alice")
    assert session_key({}, None, "1.2.3.4", TRUSTED) == SessionKey("ip", "1.2.3.4")
    assert session_key({}, "", "1.2.3.4", TRUSTED) == SessionKey("ip", "1.2.3.4")
    # the ip fallback goes through client_ip, so a trusted proxy's header counts
    via_nginx = session_key({"X-Real-IP": "5.6.7.8"}, None, NGINX, TRUSTED)
    assert via_nginx == SessionKey("ip", "5.6.7.8")


def test_session_header_is_case_insensitive_and_wins_over_a_bad_user() -> None:
    for name in ("x-session-id", "X-SESSION-ID", "X-Session-Id"):
        got = session_key({name: "a.b:c_d-1"}, 12345, "1.2.3.4", TRUSTED)
        assert got == SessionKey("session", "a.b:c_d-1")


def test_a_session_is_stored_only_when_used_unless_the_policy_is_always() -> None:
    client = SessionKey("session", "chat-42")
    for policy in ("on_use", "always"):  # a client's own id is always its session
        assert stored_session(client, False, policy) == "chat-42"
    for anonymous in (SessionKey("ip", "1.2.3.4"), SessionKey("user", "alice")):
        assert stored_session(anonymous, False, "on_use") == ""  # nothing stored
        opened = stored_session(anonymous, True, "on_use")  # "session": {...} in the body
        made = stored_session(anonymous, False, "always")
        assert SESSION_ID_PATTERN.match(opened) and SESSION_ID_PATTERN.match(made)
        assert opened != made  # a new id each time
    with pytest.raises(ValueError, match="session policy"):
        stored_session(client, False, "never")


def test_redis_key_is_prefixed_by_kind() -> None:
    assert SessionKey("user", "10.0.0.1").redis_key == "user:10.0.0.1"
    assert SessionKey("ip", "10.0.0.1").redis_key == "ip:10.0.0.1"
    with pytest.raises(ValueError, match="kind"):
        SessionKey("cookie", "x")


@pytest.mark.parametrize("bad", ["", "-leading-dash", "has space", "slash/y", "ü",
                                 "x" * 129, "new\nline"])
def test_bad_session_header_is_an_actionable_error(bad: str) -> None:
    with pytest.raises(PolicyError, match="X-Session-ID .* invalid: use 1-128 characters"):
        session_key({"X-Session-ID": bad}, None, "1.2.3.4", TRUSTED)


def test_session_header_limits() -> None:
    longest = "x" * 128
    assert session_key({"X-Session-ID": longest}, None, "1.2.3.4", TRUSTED).value == longest
    twice = RepeatedHeaders([("X-Session-ID", "a"), ("x-session-id", "b")])
    with pytest.raises(PolicyError, match="one X-Session-ID"):
        session_key(twice, None, "1.2.3.4", TRUSTED)


@pytest.mark.parametrize("user, message", [
    (42, "must be a string, got int"),
    (["alice"], "must be a string, got list"),
    ("u" * 257, "257 characters; the limit is 256"),
])
def test_bad_user_is_an_error(user: object, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        session_key({}, user, "1.2.3.4", TRUSTED)


def test_user_at_the_length_limit_is_accepted() -> None:
    assert session_key({}, "u" * 256, "1.2.3.4", TRUSTED) == SessionKey("user", "u" * 256)


def test_new_session_id_is_random_hex_and_a_valid_header() -> None:
    ids = [new_session_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    for sid in ids:
        assert len(sid) == 32 and int(sid, 16) >= 0 and sid == sid.lower()
        assert SESSION_ID_PATTERN.match(sid)


# ---- trusted proxies and client_ip --------------------------------------------------


def test_parse_networks_accepts_cidrs_and_plain_ips() -> None:
    nets = parse_networks(["10.0.0.0/8", " 192.168.1.5 ", "::1", "fd00::/8"])
    assert [str(n) for n in nets] == ["10.0.0.0/8", "192.168.1.5/32", "::1/128", "fd00::/8"]
    assert parse_networks([]) == ()


@pytest.mark.parametrize("bad", [["10.0.0.0/33"], ["nginx"], [""], ["10.0.0.1/8"], [8],
                                 "10.0.0.0/8"])
def test_parse_networks_rejects_bad_entries(bad: object) -> None:
    with pytest.raises(PolicyError, match="10.0.0.0/8"):  # every message shows an example
        parse_networks(bad)  # type: ignore[arg-type]


def test_untrusted_peer_cannot_spoof_its_ip() -> None:
    spoof = {"X-Forwarded-For": "9.9.9.9", "X-Real-IP": "8.8.8.8"}
    assert client_ip("1.2.3.4", spoof, TRUSTED) == "1.2.3.4"
    assert client_ip("1.2.3.4", spoof, ()) == "1.2.3.4"  # no trusted proxies configured


def test_trusted_peer_x_real_ip_is_used_before_x_forwarded_for() -> None:
    h = {"X-Real-IP": "5.6.7.8", "X-Forwarded-For": "9.9.9.9"}
    assert client_ip(NGINX, h, TRUSTED) == "5.6.7.8"


def test_x_forwarded_for_walks_right_to_left_over_trusted_proxies() -> None:
    # client 5.6.7.8 -> LB 10.1.1.1 -> nginx 10.0.0.2 -> router; the client prepended junk
    h = {"X-Forwarded-For": "9.9.9.9, not-an-ip, 5.6.7.8, 10.1.1.1"}
    assert client_ip(NGINX, h, TRUSTED) == "5.6.7.8"
    # the walk stops at the first untrusted hop: what lies left of it is the client's claim
    assert client_ip(NGINX, {"X-Forwarded-For": "5.6.7.8,7.7.7.7"}, TRUSTED) == "7.7.7.7"


def test_x_forwarded_for_across_repeated_headers_in_order() -> None:
    h = RepeatedHeaders([("X-Forwarded-For", "9.9.9.9, 5.6.7.8"),
                         ("x-forwarded-for", "10.1.1.1")])
    assert client_ip(NGINX, h, TRUSTED) == "5.6.7.8"


def test_all_trusted_hops_give_the_leftmost() -> None:
    # a client inside the trusted network: the first hop written by a trusted proxy
    h = {"X-Forwarded-For": "10.5.5.5, 10.1.1.1"}
    assert client_ip(NGINX, h, TRUSTED) == "10.5.5.5"


@pytest.mark.parametrize("headers", [
    {"X-Real-IP": "999.1.1.1"},
    {"X-Real-IP": ""},
    {"X-Forwarded-For": ""},
    {"X-Forwarded-For": " , "},
    {"X-Forwarded-For": "5.6.7.8, garbage"},  # the hop nginx itself wrote is unreadable
    {"X-Forwarded-For": "5.6.7.8:4711"},
    {"X-Real-IP": "unknown", "X-Forwarded-For": "1.2.3.4.5"},
])
def test_malformed_forwarding_headers_fall_back_to_the_peer(headers: dict[str, str]) -> None:
    assert client_ip(NGINX, headers, TRUSTED) == NGINX


def test_malformed_x_real_ip_falls_back_to_x_forwarded_for() -> None:
    h = {"X-Real-IP": "nope", "X-Forwarded-For": "5.6.7.8"}
    assert client_ip(NGINX, h, TRUSTED) == "5.6.7.8"
    twice = RepeatedHeaders([("X-Real-IP", "5.6.7.8"), ("X-Real-IP", "9.9.9.9")])
    assert client_ip(NGINX, twice, TRUSTED) == NGINX  # ambiguous: believe neither


def test_ipv4_mapped_ipv6_is_normalised_everywhere() -> None:
    # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    assert client_ip("::ffff:1.2.3.4", {}, TRUSTED) == "1.2.3.4"
    mapped_nginx = "::ffff:10.0.0.2"
    assert client_ip(mapped_nginx, {"X-Real-IP": "::ffff:5.6.7.8"}, TRUSTED) == "5.6.7.8"
    h = {"X-Forwarded-For": "::ffff:5.6.7.8, ::ffff:10.1.1.1"}
    assert client_ip(mapped_nginx, h, TRUSTED) == "5.6.7.8"


def test_ipv6_proxies_and_clients() -> None:
    h = {"x-forwarded-for": "2001:DB8::1, fd00::7"}
    assert client_ip("fd00::2", h, TRUSTED) == "2001:db8::1"  # canonical lower-case form


def test_forwarding_header_names_are_case_insensitive() -> None:
    for real, xff in [("x-real-ip", "x-forwarded-for"), ("X-REAL-IP", "X-FORWARDED-FOR")]:
        assert client_ip(NGINX, {real: "5.6.7.8"}, TRUSTED) == "5.6.7.8"
        assert client_ip(NGINX, {xff: "5.6.7.8"}, TRUSTED) == "5.6.7.8"


def test_a_peer_that_is_not_an_ip_is_returned_as_is() -> None:
    assert client_ip("unix:/run/router.sock", {"X-Real-IP": "5.6.7.8"}, TRUSTED) == (
        "unix:/run/router.sock")


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(["X-Real-IP", "x-forwarded-for", "X-Other"]),
                       st.text(max_size=60)),
       st.sampled_from(["1.2.3.4", NGINX, "::ffff:10.0.0.2", "fd00::2"]))
def test_client_ip_never_raises_and_untrusted_peers_are_final(
        headers: dict[str, str], peer: str) -> None:
    ip = client_ip(peer, headers, TRUSTED)
    assert isinstance(ip, str) and ip
    if peer == "1.2.3.4":
        assert ip == peer
