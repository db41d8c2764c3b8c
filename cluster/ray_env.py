"""The Ray Serve settings every node runs with (cluster/ray.env), as a dict.

Ray reads these variables when a process starts, so they go into the environment of
`ray start` (infra/stack.py, infra/start_head.sh, cluster.yaml) and of a script's Ray
driver before `import ray` (infra/load.py). This module imports nothing from Ray.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

RAY_ENV_FILE = Path(__file__).resolve().parent / "ray.env"


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and `#` comments skipped. A malformed line raises
    ValueError naming it (the shell would otherwise run it as a command)."""
    env: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"line {number} is not KEY=VALUE: {raw!r}")
        env[key] = value
    return env


def ray_env(path: Path = RAY_ENV_FILE) -> dict[str, str]:
    """The settings of cluster/ray.env."""
    return parse_env(path.read_text())


def deviations(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The settings of cluster/ray.env that `environ` (default: this process's) sets
    otherwise, as it sets them: what a measurement ran with that the file does not say."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k, v in ray_env().items() if k in environ and environ[k] != v}
