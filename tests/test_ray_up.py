"""`ray up cluster/cluster.local.yaml` / `ray down` for real, over SSH on loopback.

The test starts its own sshd on 127.0.0.1 (Debian's openssh-server) with a key it makes
and a HOME of its own for the sessions (empty but for a ~/.bashrc that puts this test's
Python environment on PATH, as a node's image would: no Ray token, nothing installed
there), writes a copy of cluster/cluster.local.yaml with that key and its own ports, and
runs the real cluster launcher: the yaml's setup and start commands run over SSH, the head
comes up with Redis, nginx and the Serve app (and a Ray token it made), a completion comes
back through nginx (cluster/serve.yaml's app, with one engine replica), and after `ray down
-y` nothing of it is running and its ports are free.

The sshd runs in a PID namespace of its own (`unshare --pid --mount-proc`): the `ray stop`
that the yaml's start commands and `ray down` run kills every Ray process it can see, so
there it sees only this test's head, never another Ray on the host (another test's stack,
another user's cluster). Everything started over SSH dies with that namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from stack_tier import processes

from infra.stack import port_busy
from replicas.ranks import free_port, free_ports

pytestmark = [pytest.mark.slow, pytest.mark.stack]
REPO = Path(__file__).resolve().parent.parent
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass(frozen=True)
class Sshd:
    key: Path
    port: int
    home: Path  # its sessions' HOME
    namespace: str  # its PID namespace (`readlink /proc/PID/ns/pid`)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """An sshd of this test's own on 127.0.0.1:PORT accepting a key made here, alone in a
    PID namespace (with its own /proc); its sessions get HOME=tmp_path/home, whose
    ~/.bashrc puts this interpreter's environment first on PATH (Ray's command runner
    sources it)."""
    if not (os.path.exists(SSHD) and shutil.which("rsync") and shutil.which("unshare")
            and os.geteuid() == 0):
        pytest.skip("needs root, openssh-server, rsync and unshare (infra/install.sh --test "
                    "installs them)")
    key = tmp_path / "id_ed25519"
    host_key = tmp_path / "host_ed25519"
    for path in (key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                       check=True)
    (tmp_path / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    port = free_port()
    config = tmp_path / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
        f"PidFile {tmp_path / 'sshd.pid'}", f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}",
        "UsePAM no", "PermitRootLogin prohibit-password", "PasswordAuthentication no",
        "StrictModes no", f"SetEnv HOME={home}", "",
    ]))
    Path("/run/sshd").mkdir(exist_ok=True)
    # --kill-child: sshd (the namespace's pid 1) dies with unshare, and with it whatever
    # still runs in the namespace
    child = 0
    proc = subprocess.Popen(["unshare", "--pid", "--mount-proc", "--kill-child", SSHD, "-D",
                             "-f", str(config), "-E", str(tmp_path / "sshd.log")])
    try:
        deadline = time.monotonic() + 10
        while not port_busy(port):
            assert proc.poll() is None and time.monotonic() < deadline, (
                (tmp_path / "sshd.log").read_text())
            time.sleep(0.1)
        child = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        yield Sshd(key, port, home, os.readlink(f"/proc/{child}/ns/pid"))
    finally:  # unshare ignores SIGTERM while it waits for its child: stop sshd itself
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()  # (--kill-child: sshd and the namespace go with it)
            proc.wait(10)


def run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def stack_processes(namespace: str, marker: str) -> list[str]:
    """Command lines of the processes in the PID namespace `namespace` that are Ray's head
    (raylet, gcs_server) or mention `marker`: the cluster's own, whatever else runs here."""
    found = []
    for pid, args in processes():
        if any(word in args for word in ("raylet", "gcs_server", marker)):
            with contextlib.suppress(OSError):  # gone meanwhile
                if os.readlink(f"/proc/{pid}/ns/pid") == namespace:
                    found.append(f"{pid} {args}")
    return found


def test_ray_up_and_down_round_trip(sshd: Sshd, tmp_path: Path) -> None:
    key, ssh_port, home = sshd.key, sshd.port, sshd.home
    ports = free_ports(("ray", "dashboard", "redis", "http", "nginx"))
    name = f"tpserve-test-{uuid.uuid4().hex[:8]}"
    state = tmp_path / "state"
    config = yaml.safe_load((REPO / "cluster/cluster.local.yaml").read_text())
    config["cluster_name"] = name
    config["auth"] = {
        "ssh_user": "root", "ssh_private_key": str(key),
        "ssh_proxy_command": f"ssh -i {key} -p {ssh_port} -o StrictHostKeyChecking=no "
                             f"-o UserKnownHostsFile=/dev/null -W 127.0.0.1:{ssh_port} "
                             "root@127.0.0.1",
    }
    # cluster/serve.yaml with one engine replica (tp=2): the launcher's path is the same,
    # and one replica fewer to start on a 2-core machine that runs other tests meanwhile
    serve = yaml.safe_load((REPO / "cluster/serve.yaml").read_text())
    engine = next(d for d in serve["applications"][0]["deployments"] if d["name"] == "Engine")
    engine["num_replicas"] = 1
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve))
    knobs = (f"TPSERVE_RAY_PORT={ports['ray']} TPSERVE_DASHBOARD_PORT={ports['dashboard']} "
             f"TPSERVE_REDIS_PORT={ports['redis']} TPSERVE_HTTP_PORT={ports['http']} "
             f"TPSERVE_NGINX_LISTEN=127.0.0.1:{ports['nginx']} TPSERVE_STATE={state} "
             f"TPSERVE_SERVE_CONFIG={tmp_path / 'serve.yaml'} "
             "TPSERVE_ENGINE_JSON='{\"tp\": 2}'")
    config["head_start_ray_commands"] = [
        cmd.replace("TPSERVE_NGINX_LISTEN=127.0.0.1:8080", knobs)
        for cmd in config["head_start_ray_commands"]
    ]
    assert any(knobs in cmd for cmd in config["head_start_ray_commands"])
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_UP_enable_autoscaler_v2": "0",
           "AUTOSCALER_NODE_START_WAIT_S": "30", "RAY_AUTH_MODE": "token"}
    assert not stack_processes(sshd.namespace, str(state)), "a Ray is already running there"
    try:
        up = run(["ray", "up", "-y", "--no-config-cache", str(path)], env, timeout=420)
        # (a head whose Ray start timed out, as on a busy 2-core machine, starts it again
        # itself: infra/start_head.sh through infra/ray_start.py)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        body = {"prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0.0,
                "ignore_eos": True}
        req = urllib.request.Request(f"http://127.0.0.1:{ports['nginx']}/v1/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                answer = json.loads(resp.read())
        except OSError as e:
            pytest.fail(f"no completion through nginx ({e}); ray up said:\n{up.stdout[-4000:]}")
        assert answer["usage"]["completion_tokens"] == 6
        assert answer["choices"][0]["finish_reason"] == "length"
        assert port_busy(ports["redis"])
        # the router found Redis through the environment start_head.sh gave Ray: a pin
        # was stored under the client's address
        from infra.services import redis_url
        from router.sessions import SessionStore, SessionStoreConfig

        store = SessionStore(SessionStoreConfig(url=redis_url(state, "127.0.0.1", ports["redis"])))
        assert asyncio.run(store.get_pin("ip:127.0.0.1")) is not None
    finally:
        down = run(["ray", "down", "-y", str(path)], env, timeout=180)
    assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]
    deadline = time.monotonic() + 30
    while (left := stack_processes(sshd.namespace, str(state))) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, left
    assert not any(port_busy(p) for p in ports.values()), ports
    assert (home / ".ray" / "auth_token").is_file()  # start_head.sh made the head's token
    Path(f"/tmp/ray/cluster-{name}.state").unlink(missing_ok=True)
    signal.getsignal(signal.SIGINT)  # the test process itself is untouched
