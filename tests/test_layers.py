"""The folders import one way: infra -> cluster -> {router, replicas}, with no arrow
between router and replicas (DESIGN.md), and the router loads no engine: checked on the
source (every import statement, also those inside functions) and in a fresh process."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from probes import loaded_after

REPO = Path(__file__).resolve().parent.parent
# what each folder must not import (top-level names); infra may import everything
FORBIDDEN = {
    "router": {"ray", "torch", "transformers", "replicas", "cluster", "infra"},
    "replicas": {"ray", "redis", "fastapi", "starlette", "router", "cluster", "infra"},
    "cluster": {"infra"},
}


def imported(path: Path) -> set[tuple[str, int]]:
    """(top-level module, line) of every absolute import in a file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_run_one_way(folder: str) -> None:
    wrong = [f"{path.relative_to(REPO)}:{line} imports {name}"
             for path in sorted((REPO / folder).rglob("*.py"))
             for name, line in sorted(imported(path)) if name in FORBIDDEN[folder]]
    assert not wrong, "\n".join(wrong)


def test_the_router_loads_no_engine_and_no_ray() -> None:
    loaded = loaded_after("import router.app as app\n"
                          "app.make_api(app.Router(engine=None))")
    assert not loaded & {"torch", "transformers", "ray", "replicas", "cluster"}, loaded


def test_a_router_replica_loads_no_engine() -> None:
    """What a router replica's process imports (cluster.app for RouterDeployment, its
    request router, cluster.engine for ServeEngine) loads no torch or transformers; nor
    does an engine replica before its __init__ (so its rank actors start first) or a rank
    actor before its `run`."""
    loaded = loaded_after("import cluster.app, cluster.engine, cluster.pinning, cluster.ranks, "
                          "cluster.requests")
    assert "ray" in loaded  # (the check sees what was imported)
    assert not loaded & {"torch", "transformers", "replicas", "triton"}, loaded


def test_a_rank_process_loads_no_transformers() -> None:
    """A rank 1..tp-1 process (a Ray rank actor's `run`, the fork server of replicas/ranks.py)
    imports only replicas.worker: no transformers (rank 0 shares the model's config)."""
    loaded = loaded_after("import replicas.worker")
    assert "torch" in loaded  # (the check sees what was imported)
    assert "transformers" not in loaded, loaded
