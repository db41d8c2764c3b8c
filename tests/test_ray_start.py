"""infra.ray_start: `ray start` made again (after `ray stop --force`) when Ray's own start
timed out, as a busy machine's does; any other failure comes back at once. A stand-in
`ray` (a shell script) records what it was asked and answers as Ray 2.60 does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from infra.ray_start import RAY_START_ATTEMPTS, RAY_START_TIMED_OUT, ray_start

REPO = Path(__file__).resolve().parent.parent


def fake_ray(tmp_path: Path, timeouts: int, other_failure: str = "") -> Path:
    """A `ray` whose first `timeouts` starts fail as a timed-out start does (then it
    starts), or whose every start fails saying `other_failure`; each call's arguments go
    to calls.txt, one line each."""
    script = tmp_path / "ray"
    script.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {tmp_path}/calls.txt
if [ "$1" = start ]; then
  if [ -n "{other_failure}" ]; then echo "{other_failure}"; exit 1; fi
  n=$(grep -c '^start' {tmp_path}/calls.txt)
  if [ "$n" -le {timeouts} ]; then
    echo "Traceback (most recent call last):" >&2
    echo "Exception: {RAY_START_TIMED_OUT}. This could happen because ..." >&2
    exit 1
  fi
  echo "Ray runtime started."
fi
exit 0
""")
    script.chmod(0o755)
    return script


def calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.txt").read_text().splitlines()


def test_a_start_that_timed_out_is_stopped_and_made_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ray = fake_ray(tmp_path, timeouts=1)
    assert ray_start(["--head", "--port", "6379"], ray=str(ray)) == 0
    assert calls(tmp_path) == ["start --head --port 6379", "stop --force",
                               "start --head --port 6379"]
    out = capsys.readouterr().out
    assert RAY_START_TIMED_OUT in out  # Ray's own words are shown, not swallowed
    assert f"attempt 2 of {RAY_START_ATTEMPTS}" in out and "Ray runtime started." in out


def test_a_start_that_always_times_out_fails_after_every_attempt(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ray = fake_ray(tmp_path, timeouts=99)
    assert ray_start(["--head"], ray=str(ray)) == 1
    made = calls(tmp_path)
    assert made.count("start --head") == RAY_START_ATTEMPTS
    assert made.count("stop --force") == RAY_START_ATTEMPTS - 1  # none after the last
    assert f"timed out {RAY_START_ATTEMPTS} times" in capsys.readouterr().err


def test_another_failure_is_not_made_again(tmp_path: Path) -> None:
    ray = fake_ray(tmp_path, timeouts=0, other_failure="ConnectionError: address already in use")
    assert ray_start(["--head"], ray=str(ray)) == 1
    assert calls(tmp_path) == ["start --head"]  # nothing stopped, nothing made again


def test_the_module_runs_the_ray_beside_its_interpreter(tmp_path: Path) -> None:
    """`python -m infra.ray_start ARGS` (start_head.sh, cluster.yaml's workers): the `ray`
    beside the interpreter (the project's .venv's), given ARGS; its exit status is the
    module's. The interpreter here is a link to this one in a folder with the stand-in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_ray(tmp_path, timeouts=1).rename(bin_dir / "ray")
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    done = subprocess.run([str(bin_dir / "python3"), "-m", "infra.ray_start",
                           "--address=10.0.0.1:6379"], env=env, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls(tmp_path) == ["start --address=10.0.0.1:6379", "stop --force",
                               "start --address=10.0.0.1:6379"]
    assert "attempt 2 of" in done.stdout
