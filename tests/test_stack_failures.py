"""The local stack when something is missing or gone: Ray's auth token made on a fresh
HOME, a Ray that dies at start reported within seconds with its log and the fix, a start
that fails leaving no stack record behind, and `tpserve status` / `down` explaining a
missing, stale or unreadable record instead of a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.ray_token import ensure_token, read_token, token_path
from infra.stack import (
    NOT_RUNNING,
    RAY_START_TIMED_OUT,
    StackConfig,
    StackError,
    on_free_ports,
    progress,
    ray_died,
    serve_api_up,
    start_ray,
    start_ray_head,
    stop,
    up,
)
from replicas.ranks import free_ports

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    return home


def tpserve(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], cwd=REPO,
                          env={**os.environ, "HOME": str(home)}, capture_output=True,
                          text=True, timeout=60)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`tpserve ARGS` in this process (a traceback would fail the test): exit status and
    stderr."""
    from infra.cli import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def ports_config(state: Path, **overrides: object) -> StackConfig:
    return on_free_ports(state_dir=str(state), **overrides)


def test_a_token_is_made_once_where_ray_looks(empty_home: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert read_token() == ""
    made = ensure_token()
    assert made == empty_home / ".ray" / "auth_token" == token_path()
    token = made.read_text()
    assert len(token) == 64 and int(token, 16) >= 0  # 256 bits, hex, as Ray makes it
    assert oct(made.stat().st_mode & 0o777) == "0o600"
    assert ensure_token() is None and read_token() == token  # kept, not replaced
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(empty_home / "elsewhere"))
    assert ensure_token() == empty_home / "elsewhere"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "given")
    assert ensure_token() is None and read_token() == "given"


@pytest.mark.slow
@pytest.mark.stack
def test_a_ray_that_dies_at_start_is_reported_within_seconds(empty_home: Path,
                                                             tmp_path: Path) -> None:
    # the failure of issue 15: token auth on, no token anywhere (nothing made it)
    config = ports_config(tmp_path)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    ray = start_ray(config, tmp_path, env)
    started = time.monotonic()
    try:
        with pytest.raises(StackError) as err:
            progress("starting Ray", lambda: False, 120,
                     failed=lambda: ray_died(ray, tmp_path / "ray.log"))
    finally:
        if ray.poll() is None:
            os.killpg(ray.pid, signal.SIGKILL)
            ray.wait()
    assert time.monotonic() - started < 20
    message = str(err.value)
    assert "no authentication token was found" in message  # the log's last lines
    assert "ray get-auth-token --generate" in message and str(tmp_path / "ray.log") in message


@pytest.mark.slow
@pytest.mark.stack
def test_a_failed_start_leaves_no_stack_behind(empty_home: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Ray dies while `up` waits for it (here: its head process is killed as soon as it is
    recorded): `up` says so at once and removes its record, so `status` has nothing stale."""
    state = tmp_path / "state"
    config = ports_config(state)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            up({"tp": 1}, config, detach=True)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not (state / "stack.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = json.loads((state / "stack.json").read_text())["pid"]
    killed = time.monotonic()
    os.killpg(pid, signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], StackError), errors
    assert "Ray exited" in str(errors[0]) and str(state / "ray.log") in str(errors[0])
    assert time.monotonic() - killed < 45  # its own stop() included
    assert not (state / "stack.json").exists()
    assert cli(capsys, "status", f"--state-dir={state}")[0] == NOT_RUNNING


def test_status_and_down_explain_a_missing_stale_or_unreadable_stack(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    out = tpserve("status", home=home)  # the default state dir, in an empty HOME
    assert out.returncode == NOT_RUNNING and "Traceback" not in out.stderr + out.stdout
    assert "tpserve is not running" in out.stdout and "tpserve up" in out.stdout

    # what a failed start used to leave: a record of a Ray head that is gone, no token
    state = tmp_path / "stale"
    state.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    record = {"pid": gone.pid, "services": {}, "config": {"state_dir": str(state)}}
    (state / "stack.json").write_text(json.dumps(record))
    code, err = cli(capsys, "status", f"--state-dir={state}")
    assert code == 1 and "not running" in err and "tpserve down" in err
    assert cli(capsys, "down", f"--state-dir={state}")[0] == 0
    assert not (state / "stack.json").exists()

    (state / "stack.json").write_text('{"pid": ')  # cut short
    code, err = cli(capsys, "status", f"--state-dir={state}")
    assert code == 1 and "cannot be read" in err
    assert cli(capsys, "down", f"--state-dir={state}")[0] == 0
    assert not (state / "stack.json").exists()


def test_one_port_for_two_servers_is_refused_before_anything_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two servers given one port (here nginx and the Ray dashboard) is a clear error from
    `up`, before Ray, Redis or nginx start; and `free_ports` never picks one port twice."""
    nginx, serve, ray, redis = free_ports(("nginx", "serve", "ray", "redis")).values()
    state = tmp_path / "state"
    code, err = cli(capsys, "up", "--detach", f"--state-dir={state}", f"--nginx-port={nginx}",
                    f"--serve-port={serve}", f"--dashboard-port={nginx}", f"--ray-port={ray}",
                    f"--redis-port={redis}")
    assert code == 1, err
    assert f"nginx and Ray dashboard both on {nginx}" in err and "--dashboard-port" in err
    assert "Traceback" not in err and not (state / "stack.json").exists()
    for _ in range(20):
        picked = free_ports(str(i) for i in range(8))
        assert len(set(picked.values())) == 8, picked


def test_free_ports_come_from_outside_the_kernels_ephemeral_range(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The stack's ports are picked above Ray's worker ports and below the kernel's
    ephemeral range (replicas.ranks.PICK_RANGE): a port the kernel hands out can be taken
    by any outgoing connection before the server binds it (CI: Redis's, while Ray
    started). Where the range's tries all find a port taken, the kernel picks."""
    import socket

    from replicas import ranks

    span = ranks._pick_range()
    if span is None:
        pytest.skip("this kernel's ephemeral range starts below PICK_RANGE")
    picked = list(ranks.free_ports(str(i) for i in range(16)).values())
    assert all(span[0] <= p < span[1] for p in picked) and len(set(picked)) == 16
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        monkeypatch.setattr(ranks.random, "randrange", lambda *_: taken)
        assert ranks.free_ports(["x"])["x"] not in (taken, 0)


# each Ray process imports this (PYTHONPATH); the dashboard agent's first start waits
SLOW_AGENT = """import os, sys, time
if sys.argv and sys.argv[0].replace(os.sep, "/").endswith("ray/dashboard/agent.py"):
    try:
        open({marker!r}, "x").close()
    except FileExistsError:
        pass
    else:
        time.sleep({delay})
"""


@pytest.mark.slow
@pytest.mark.stack
def test_a_ray_start_that_times_out_is_made_again(empty_home: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Ray 2.60's raylet waits a fixed 15 s for its dashboard agent to write its ports to
    files, then aborts, and `ray start` fails (RAY_START_TIMED_OUT): CI's whole-stack tier
    lost every shared-stack test so, the agent taking 19-20 s twice in a row on a busy 2-core
    machine. Here the agent's first start takes 16 s longer: start_ray_head stops that Ray,
    says so, and starts it again, and the record names the Ray head that runs."""
    ensure_token()
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "sitecustomize.py").write_text(
        SLOW_AGENT.format(marker=str(tmp_path / "agent-waited"), delay=16))
    state = tmp_path / "state"
    state.mkdir()
    config = ports_config(state)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PYTHONPATH": os.pathsep.join([str(custom), str(REPO)])}
    record: dict[str, object] = {"pid": None, "services": {}}
    try:
        ray = start_ray_head(config, state, env, record)
        assert ray.poll() is None and serve_api_up(config)
        assert (tmp_path / "agent-waited").exists()  # (the slow start did happen)
        assert "Ray's start timed out" in capsys.readouterr().out
        assert record["pid"] == ray.pid == json.loads((state / "stack.json").read_text())["pid"]
    finally:
        if record["pid"] is not None:
            stop(record, config)


def test_a_ray_start_that_timed_out_every_time_says_so(tmp_path: Path) -> None:
    log = tmp_path / "ray.log"
    log.write_text(f"  File ...\nException: {RAY_START_TIMED_OUT}. This could happen "
                   "because some of the raylet failed to startup or the GCS has become "
                   "overloaded.\n")
    gone = subprocess.Popen(["false"])
    gone.wait()
    message = ray_died(gone, log) or ""
    assert RAY_START_TIMED_OUT in message and "too slow to start" in message
    assert "`tpserve up` again" in message
