"""The nginx config of tpserve's edge, generated with nginx-config-builder.

Contract: `render(NginxConfig)` returns a complete nginx.conf that runs without root paths
(`daemon off`, pid, logs and every `*_temp_path` under `config.prefix`) and proxies every
request to the Ray Serve HTTP proxies (one per node), or the router replicas themselves
(infra/edge.py), in `upstream tpserve_serve`, keyed by default on the session and the
client address (`hash $http_x_session_id$remote_addr consistent`): one session keeps
reaching the same upstream, and the sessions of one address (many users behind one NAT
or load balancer, a load test on loopback) spread over all of them. Requests and
responses are not buffered (SSE token streams reach the client as they are made);
`X-Real-IP` / `X-Forwarded-For` carry the client address to the router.

nginx-config-builder keeps options and sections in dicts keyed by name, prints keyword
options before positional ones, and lets a second directive of the same name replace the
first. So every block here is built from positional items in nginx's order, and repeated
directives (`server`, `proxy_set_header`, `set_real_ip_from`) are one `KeyValuesMultiLines`.

`write` + `check` put the file on disk and run `nginx -t` on it; `add_parser` / `run` are
the `tpserve nginx` subcommand, which prints the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nginx.config.api import Config, EmptyBlock, KeyOption, Location, Section
from nginx.config.api.options import KeyMultiValueOption, KeyValueOption, KeyValuesMultiLines

UPSTREAM_NAME = "tpserve_serve"
FALLBACK_NAME = "tpserve_fallback"
# how nginx picks an upstream. A router keeps no state a later request needs (pins and
# histories live in Redis); only its per-client rate limit counts locally, keyed on the
# router's session key (X-Session-ID, else the body's `user`, else the address), which
# each of these keeps on one router for a given header and address.
BALANCE = {"session": "hash $http_x_session_id$remote_addr consistent",
           "hash": "hash $remote_addr consistent", "ip_hash": "ip_hash"}
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
# where Debian/Ubuntu and nginx's own builds put the binary; /usr/sbin is often not on the
# PATH of a non-root user
SBIN_DIRS = "/usr/sbin:/usr/local/sbin:/usr/local/nginx/sbin"
LOG_FORMAT = ("'$remote_addr [$time_local] \"$request\" $status $body_bytes_sent "
              "upstream=$upstream_addr rt=$request_time urt=$upstream_response_time "
              "xff=\"$http_x_forwarded_for\"'")

_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*)$")
_SIZE = re.compile(r"^[0-9]+[kKmMgG]?$")
_UNSAFE = re.compile(r"[\s;{}'\"\\#$]")  # would end or change an nginx directive


class NginxConfigError(ValueError):
    """A setting nginx cannot run with; the message says what to change."""


class NginxError(RuntimeError):
    """nginx is missing or rejected a config; the message carries nginx's own words."""


@dataclass(frozen=True)
class NginxConfig:
    """The edge: where nginx listens, which Serve proxies it spreads users over, and how.

    `upstreams`: HOST:PORT of each Ray Serve HTTP proxy (one per node), at least one.
    `prefix`: an absolute directory for pid, logs and temp files (no root paths needed).
    `balance`: "session" (`hash $http_x_session_id$remote_addr consistent`: each session
    of each client address sticks to one upstream, adding one moves few sessions, and
    the sessions of one address spread), "hash" (`hash $remote_addr consistent`: each
    client address sticks to one upstream: behind one address every stream lands on one
    router) or "ip_hash" (keys on the first three octets of an IPv4 address, so all of
    127.0.0.x land on one upstream).
    `trusted`: CIDRs of proxies in front of nginx (a cloud load balancer) whose
    X-Forwarded-For nginx believes (realip module); empty = nginx is the edge and the
    socket address is the client.
    `fallback`: HOST:PORT of the Serve proxies, where a request goes when nginx cannot
    reach `upstreams` (its own 502: connection refused, or closed before a response, as
    when the router replica it went to has just crashed; the request, body included, is
    sent once more there). Empty: no fallback (`upstreams` are the proxies themselves).
    """

    upstreams: tuple[str, ...]
    prefix: str
    listen: str = "127.0.0.1:8080"
    balance: str = "session"
    client_max_body_size: str = "1m"
    proxy_read_timeout_s: int = 300
    proxy_connect_timeout_s: int = 5
    keepalive: int = 32  # idle connections kept open to the upstreams per worker
    worker_processes: str = "auto"
    worker_connections: int = 1024
    trusted: tuple[str, ...] = ()
    fallback: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("upstreams", "trusted", "fallback"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise NginxConfigError(f"{name} must be a tuple of strings, not the string "
                                       f"{value!r}; write ({value!r},)")
            object.__setattr__(self, name, tuple(value))  # a list is fine too
        self._check_upstreams()
        _split_listen(self.listen)
        self._check_prefix()
        self._check_numbers()
        for cidr in self.trusted:
            _check_cidr(cidr)

    def _check_upstreams(self) -> None:
        if not self.upstreams:
            raise NginxConfigError("at least one upstream is needed: the HOST:PORT of a Ray "
                                   "Serve HTTP proxy, e.g. upstreams=('127.0.0.1:8000',)")
        for upstream in self.upstreams:
            _split_host_port(upstream, "upstream")
        for upstream in self.fallback:
            _split_host_port(upstream, "fallback")
        duplicates = sorted({u for u in self.upstreams if self.upstreams.count(u) > 1})
        if duplicates:
            raise NginxConfigError(f"upstream listed twice: {', '.join(duplicates)}; list each "
                                   "Serve proxy once")

    def _check_prefix(self) -> None:
        if not self.prefix or not Path(self.prefix).is_absolute():
            raise NginxConfigError(f"prefix must be an absolute directory, got {self.prefix!r};"
                                   " e.g. /tmp/tpserve-nginx")
        if _UNSAFE.search(self.prefix):
            raise NginxConfigError(f"prefix {self.prefix!r} has a space, quote, ';', '#', '$' "
                                   "or brace, which nginx would misread; choose a plain path")

    def _check_numbers(self) -> None:
        if self.balance not in BALANCE:
            raise NginxConfigError(f"balance must be one of {sorted(BALANCE)}, got "
                                   f"{self.balance!r}")
        if not _SIZE.match(self.client_max_body_size):
            raise NginxConfigError("client_max_body_size must be a number with an optional "
                                   f"k/m/g suffix (e.g. '1m'), got {self.client_max_body_size!r}")
        if not (self.worker_processes == "auto" or self.worker_processes.isdigit()
                and int(self.worker_processes) > 0):
            raise NginxConfigError("worker_processes must be 'auto' or a positive number, got "
                                   f"{self.worker_processes!r}")
        for name in ("proxy_read_timeout_s", "proxy_connect_timeout_s", "keepalive",
                     "worker_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise NginxConfigError(f"{name} must be a positive integer, got {value!r}")


def _split_host_port(value: str, what: str) -> tuple[str, int]:
    """'host:port' / '[v6]:port' -> (host, port), or a NginxConfigError saying what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not _HOST.match(host):
        raise NginxConfigError(f"{what} {value!r} is not HOST:PORT (e.g. 127.0.0.1:8000, "
                               "node-2:8000 or [::1]:8000)")
    _check_port(port, what, value)
    return host, int(port)


def _check_port(port: str, what: str, value: str) -> None:
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise NginxConfigError(f"{what} {value!r}: port must be a number in 1..65535")


def _split_listen(listen: str) -> tuple[str | None, int]:
    """'8080' -> (None, 8080); 'host:port' -> (host, port)."""
    if ":" not in listen:
        _check_port(listen, "listen", listen)
        return None, int(listen)
    return _split_host_port(listen, "listen")


def _check_cidr(cidr: str) -> None:
    try:
        ipaddress.ip_network(cidr, strict=False)
    except ValueError as e:
        raise NginxConfigError(f"trusted {cidr!r} is not an IP address or CIDR "
                               f"(e.g. 10.0.0.0/8): {e}") from e


# ---------------------------------------------------------------- the config, block by block


def _main_options(config: NginxConfig) -> EmptyBlock:
    prefix = Path(config.prefix)
    return EmptyBlock(
        KeyValueOption("daemon", "off"),  # the launcher owns the process; stop it with QUIT
        KeyValueOption("worker_processes", config.worker_processes),
        KeyValueOption("pid", str(prefix / "nginx.pid")),
        KeyMultiValueOption("error_log", [str(prefix / "error.log"), "warn"]),
    )


def _upstream(config: NginxConfig, name: str, servers: tuple[str, ...]) -> Section:
    # the balancing method must come before `keepalive` (nginx docs), so all positional
    return Section(
        f"upstream {name}",
        KeyOption(BALANCE[config.balance]),
        KeyValuesMultiLines("server", list(servers)),  # one line per server
        KeyValueOption("keepalive", config.keepalive),
    )


def _location(config: NginxConfig, path: str, upstream: str, *extra: Any) -> Location:
    headers = [["Connection", '""'],  # keep upstream connections alive (HTTP/1.1)
               ["Host", "$host"],
               ["X-Real-IP", "$remote_addr"],
               ["X-Forwarded-For", "$proxy_add_x_forwarded_for"],
               ["X-Forwarded-Proto", "$scheme"]]
    return Location(
        path,
        KeyValueOption("proxy_pass", f"http://{upstream}"),
        KeyValueOption("proxy_http_version", "1.1"),
        KeyValuesMultiLines("proxy_set_header", headers),
        KeyValueOption("proxy_buffering", "off"),  # SSE: each token event goes out at once
        # bodies go straight to Serve, never to client_body_temp: run as root, workers are
        # `nobody` and cannot enter a prefix under a 0700 directory (pytest's tmp_path)
        KeyValueOption("proxy_request_buffering", "off"),
        KeyValueOption("proxy_cache", "off"),
        KeyValueOption("proxy_connect_timeout", f"{config.proxy_connect_timeout_s}s"),
        KeyValueOption("proxy_read_timeout", f"{config.proxy_read_timeout_s}s"),
        KeyValueOption("proxy_send_timeout", f"{config.proxy_read_timeout_s}s"),
        KeyValueOption("client_max_body_size", config.client_max_body_size),
        *extra,
    )


def _logs_and_temp(config: NginxConfig) -> EmptyBlock:
    prefix = Path(config.prefix)
    # log_format must precede the access_log that names it: both positional, in this order
    return EmptyBlock(
        KeyMultiValueOption("log_format", ["tpserve", LOG_FORMAT]),
        KeyMultiValueOption("access_log", [str(prefix / "access.log"), "tpserve"]),
        *[KeyValueOption(f"{kind}_temp_path", str(prefix / f"{kind}_temp")) for kind in
          TEMP_PATHS],
    )


def _real_ip(config: NginxConfig) -> EmptyBlock:
    if not config.trusted:
        return EmptyBlock()
    return EmptyBlock(
        KeyValuesMultiLines("set_real_ip_from", list(config.trusted)),
        KeyValueOption("real_ip_header", "X-Forwarded-For"),
        KeyValueOption("real_ip_recursive", "on"),
    )


def _too_large(config: NginxConfig) -> EmptyBlock:
    """nginx's own 413 (a body over client_max_body_size, refused before the router sees
    it) as an OpenAI error body, like the router's, instead of nginx's HTML page."""
    body = json.dumps({"error": {"message": "request body over "
                                 f"{config.client_max_body_size} bytes",
                                 "type": "invalid_request_error", "param": None,
                                 "code": None}})
    return EmptyBlock(
        KeyMultiValueOption("error_page", ["413", "@too_large"]),
        Location("@too_large", KeyValueOption("default_type", "application/json"),
                 KeyMultiValueOption("return", ["413", f"'{body}'"])))


def _http(config: NginxConfig) -> Section:
    upstreams = [_upstream(config, UPSTREAM_NAME, config.upstreams)]
    locations = [_location(config, "/", UPSTREAM_NAME)]
    if config.fallback:  # nginx's own 502 only: a router's error response is passed on
        upstreams.append(_upstream(config, FALLBACK_NAME, config.fallback))
        locations = [_location(config, "/", UPSTREAM_NAME,
                               KeyMultiValueOption("error_page", ["502", "=", "@serve_proxy"])),
                     _location(config, "@serve_proxy", FALLBACK_NAME)]
    server = Section("server", KeyValueOption("listen", config.listen), _too_large(config),
                     *locations)
    return Section("http", _logs_and_temp(config), _real_ip(config),
                   EmptyBlock(*upstreams), server)


def render(config: NginxConfig) -> str:
    """The whole nginx.conf for `config`, ending in a newline."""
    events = Section("events", KeyValueOption("worker_connections", config.worker_connections))
    text = str(Config(_main_options(config), events, _http(config)))
    command = " ".join(nginx_command("THIS_FILE", config.prefix, binary="nginx"))
    return (f"# tpserve edge, generated by infra/nginx.py. Run (the prefix must exist):\n"
            f"#   {command}\n# stop: kill -QUIT $(cat {config.prefix}/nginx.pid)\n"
            f"{text.lstrip()}\n")


# ---------------------------------------------------------------- files and the binary


def nginx_binary() -> str:
    """Path of the nginx binary, or NginxError saying how to install it."""
    found = shutil.which("nginx") or shutil.which("nginx", path=SBIN_DIRS)
    if found is None:
        raise NginxError("nginx is not installed (not on PATH nor in /usr/sbin): "
                         "apt-get install nginx")
    return found


def nginx_command(path: str | Path, prefix: str | Path, binary: str | None = None) -> list[str]:
    """argv that runs nginx (in the foreground: the config says `daemon off`) on `path`."""
    prefix = str(prefix)
    return [binary or nginx_binary(), "-p", prefix, "-c", str(path),
            "-e", str(Path(prefix) / "error.log")]


def write(config: NginxConfig, path: str | Path) -> Path:
    """Render `config` to `path`; create `config.prefix` (nginx needs it to exist)."""
    Path(config.prefix).mkdir(parents=True, exist_ok=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(config))
    return path


def check(path: str | Path, prefix: str | Path | None = None) -> None:
    """`nginx -t` on the file at `path`; NginxError with nginx's message if it fails.

    `prefix` defaults to the file's directory (the layout `write(config, prefix/nginx.conf)`).
    """
    path = Path(path).resolve()
    prefix = Path(prefix) if prefix is not None else path.parent
    argv = [*nginx_command(path, prefix), "-t", "-q"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        raise NginxError(f"nginx rejected {path}:\n{message}")


# ---------------------------------------------------------------- `tpserve nginx`

_CLI_SKIP = ("upstreams", "prefix", "trusted", "fallback")


# `tpserve nginx --help`: one sentence per NginxConfig field the command line sets
FIELD_HELP = {
    "listen": "Address and port nginx listens on.",
    "balance": "session: each session (X-Session-ID) of each client address sticks to one "
               "upstream; hash: each client address does; ip_hash: keyed on the first three "
               "octets of an IPv4 address.",
    "client_max_body_size": "Largest request body nginx accepts.",
    "proxy_read_timeout_s": "Seconds nginx waits for the next bytes of a response (a long "
                            "stream's gaps).",
    "proxy_connect_timeout_s": "Seconds nginx waits to connect to an upstream.",
    "keepalive": "Idle connections to the upstreams each nginx worker keeps open.",
    "worker_processes": "nginx worker processes (auto: one per core).",
    "worker_connections": "Connections each nginx worker may hold open.",
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `tpserve nginx` with its flags (add_arguments)."""
    parser = subparsers.add_parser("nginx", help="print the nginx config of the edge")
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `tpserve nginx`; their defaults come from NginxConfig's fields."""
    parser.add_argument("--upstream", action="append", required=True, metavar="HOST:PORT",
                        help="A Ray Serve HTTP proxy; repeat for each node.")
    parser.add_argument("--prefix", default=None, metavar="DIR", help="Directory of nginx's "
                        "pid, logs and temp files (default: <tmp>/tpserve-nginx-<listen "
                        "port>).")
    parser.add_argument("--trusted", action="append", default=[], metavar="CIDR",
                        help="A proxy in front of nginx whose X-Forwarded-For is believed; "
                        "repeat for each.")
    for f in dataclasses.fields(NginxConfig):
        if f.name in _CLI_SKIP:
            continue
        flag = f"--{f.name.replace('_', '-')}"
        choices = sorted(BALANCE) if f.name == "balance" else None
        parser.add_argument(flag, type=type(f.default), default=f.default, choices=choices,
                            help=f"{FIELD_HELP[f.name]} (default: {f.default})")


def config_from_args(args: argparse.Namespace) -> NginxConfig:
    prefix = args.prefix or str(Path(tempfile.gettempdir()) /
                                f"tpserve-nginx-{_split_listen(args.listen)[1]}")
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(NginxConfig)
               if f.name not in _CLI_SKIP}
    return NginxConfig(upstreams=tuple(args.upstream), prefix=str(Path(prefix).resolve()),
                       trusted=tuple(args.trusted), **options)


def run(args: argparse.Namespace) -> int:
    """Print the config; a bad setting prints its message and returns 2."""
    try:
        config = config_from_args(args)
    except NginxConfigError as e:
        print(f"tpserve nginx: {e}", file=sys.stderr)
        return 2
    print(render(config), end="")
    return 0
