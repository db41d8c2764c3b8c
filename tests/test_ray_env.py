"""cluster/ray.env: the Serve settings every node starts Ray with, read the same way by
the shell (infra/start_head.sh, cluster.yaml) and by Python (infra/stack.py, drivers)."""

import os
import subprocess
from pathlib import Path

import pytest

from cluster.ray_env import RAY_ENV_FILE, parse_env, ray_env
from infra.stack import StackConfig, stack_env


def test_parse_env_skips_comments_and_rejects_junk() -> None:
    assert parse_env("# c\n\nA=1\n  B=x=y  \n") == {"A": "1", "B": "x=y"}
    with pytest.raises(ValueError, match="line 2"):
        parse_env("A=1\necho hi\n")
    with pytest.raises(ValueError, match="line 1"):
        parse_env("1A=2\n")


def test_shell_and_python_read_the_same_settings() -> None:
    out = subprocess.run(["bash", "-c", f"set -a; . {RAY_ENV_FILE}; env -0"],
                         env={"PATH": os.environ["PATH"]}, capture_output=True, check=True)
    shell = dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if item)
    settings = ray_env()
    assert settings["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1"
    assert {k: shell[k] for k in settings} == settings


def test_stack_and_head_start_ray_with_them(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ray_env():
        monkeypatch.delenv(key, raising=False)
    env = stack_env(StackConfig(state_dir=str(tmp_path)), tmp_path, "token")
    assert {k: env[k] for k in ray_env()} == ray_env()
    monkeypatch.setenv("RAY_SERVE_USE_GRPC_BY_DEFAULT", "0")  # the caller's setting wins
    assert stack_env(StackConfig(state_dir=str(tmp_path)), tmp_path, "t")[
        "RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "0"
    head = (RAY_ENV_FILE.parent.parent / "infra" / "start_head.sh").read_text()
    assert ". cluster/ray.env" in head.split("\npython3 -m infra.ray_start")[0]
    workers = (RAY_ENV_FILE.parent / "cluster.yaml").read_text()
    assert "cluster/ray.env" in workers.split("worker_start_ray_commands")[1]


def test_deviations_name_the_settings_a_run_changed() -> None:
    """What a measurement ran with otherwise than cluster/ray.env (gpu_stack rows'
    serve_env, device_stack.sh AB_ENV); unset or equal settings are not deviations."""
    from cluster.ray_env import deviations

    settings = ray_env()
    assert deviations({}) == {} and deviations(dict(settings)) == {}
    changed = {**settings, "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1", "OTHER": "x"}
    assert settings["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] != "1"
    assert deviations(changed) == {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}
