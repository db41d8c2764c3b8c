"""The cluster's config files pass Ray's own validation, and the pure pieces of cluster/
behave: GPU visibility of a replica's ranks, Serve config overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from cluster.control import load_config  # noqa: E402
from cluster.ranks import rank_env, visible_devices  # noqa: E402

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster.local.yaml"])
def test_cluster_yaml_passes_ray_validation(name: str) -> None:
    config = prepare_config(yaml.safe_load((CLUSTER / name).read_text()))
    validate_config(config)  # raises on any schema error


def test_cluster_yaml_has_gpu_workers_and_starts_the_stack() -> None:
    config = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    assert config["provider"]["type"] == "aws"
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["node_config"]["InstanceType"].startswith(("p5.", "p4d."))
    head_start = " ".join(config["head_start_ray_commands"])
    assert "infra/start_head.sh" in head_start
    # the workers' `ray start` too is made again when it times out (infra/ray_start.py)
    assert "python3 -m infra.ray_start --address=" in " ".join(config["worker_start_ray_commands"])
    assert any("redis-server nginx" in c for c in config["setup_commands"])


def test_validation_catches_a_broken_cluster_yaml() -> None:
    config = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    config["max_workerz"] = 3
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(config))
    config = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    config["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(config))


def test_serve_yaml_is_a_valid_serve_config_with_overrides() -> None:
    config = load_config(CLUSTER / "serve.yaml", "127.0.0.1", 18000, {"tp": 4, "model": "/m"})
    schema = ServeDeploySchema(**config)
    app = schema.applications[0]
    assert app.external_scaler_enabled and app.import_path == "cluster.app:build"
    assert app.args["engine"]["tp"] == 4 and app.args["engine"]["model"] == "/m"
    assert app.args["engine"]["comm_dtype"] == "auto"  # untouched fields stay
    assert config["http_options"] == {"host": "127.0.0.1", "port": 18000}


def test_replica_counts_of_the_engine_and_the_router_override_their_deployments() -> None:
    """`tpserve up --replicas N --router-replicas M`: each count lands on its own
    deployment (the router's entry is added; serve.yaml lists the engine's alone), and a
    chaos redeploy of the router keeps its count."""
    from infra.chaos import redeploy_config

    config = load_config(CLUSTER / "serve.yaml", num_replicas=3, router_replicas=2)
    app = ServeDeploySchema(**config).applications[0]
    counts = {d.name: d.num_replicas for d in app.deployments}
    assert counts == {"Engine": 3, "Router": 2}
    plain = load_config(CLUSTER / "serve.yaml")["applications"][0]["deployments"]
    assert [d["name"] for d in plain] == ["Engine"]
    body = {"applications": {"tpserve": {"deployed_app_config": config["applications"][0]}},
            "http_options": config["http_options"]}
    again = redeploy_config(body)
    router = next(d for d in again["applications"][0]["deployments"] if d["name"] == "Router")
    assert router["num_replicas"] == 2
    assert router["ray_actor_options"]["runtime_env"]["env_vars"] == {
        "TPSERVE_ROUTER_GENERATION": "1"}
    assert ServeDeploySchema(**again)
    # a second drill on the same stack: the deployed generation + 1, never the same config
    # (one counting from 1 again redeployed it unchanged and no router was replaced)
    body["applications"]["tpserve"]["deployed_app_config"] = again["applications"][0]
    third = redeploy_config(body)["applications"][0]["deployments"]
    assert next(d for d in third if d["name"] == "Router")["ray_actor_options"][
        "runtime_env"]["env_vars"] == {"TPSERVE_ROUTER_GENERATION": "2"}


def test_the_data_path_is_an_app_argument_and_a_bad_one_is_refused_by_name() -> None:
    """serve.yaml says the default (DATA_PATHS' first); `tpserve up --data-path` overrides
    it; the app's builder refuses an unknown one before any replica starts."""
    from cluster.app import build
    from cluster.datapath import DATA_PATHS

    args = load_config(CLUSTER / "serve.yaml")["applications"][0]["args"]
    assert args["data_path"] == DATA_PATHS[0] == "direct"
    app = load_config(CLUSTER / "serve.yaml", data_path="serve")["applications"][0]
    assert ServeDeploySchema(**load_config(CLUSTER / "serve.yaml", data_path="serve"))
    assert app["args"]["data_path"] == "serve"
    with pytest.raises(ValueError, match="data_path must be one of"):
        build({**args, "data_path": "sideways"})


def test_each_rank_sees_all_gpus_of_its_replica_in_rank_order() -> None:
    assert visible_devices([["3"], ["5"], ["4"], ["6"]]) == "3,5,4,6"
    assert rank_env("3,5", 1) == {"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "3,5"}
    assert rank_env(None, 0) == {"LOCAL_RANK": "0"}  # CPU: nothing to hide or show
    with pytest.raises(ValueError, match="share a GPU"):
        visible_devices([["0"], ["0"]])
    with pytest.raises(ValueError, match="no GPU"):
        visible_devices([["0"], []])


def test_an_engine_replica_takes_twice_its_batch_at_once_unless_told(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve's max_ongoing_requests of the engine deployment: twice the engine's
    max_num_seqs (cluster/engine.py ONGOING_PER_SEQ: Serve's count of direct-path calls
    runs ahead of the engine's), or TPSERVE_MAX_ONGOING as the Serve app's build sees it
    (for measuring; infra/device_stack.sh AB_MAX_ONGOING)."""
    from cluster.engine import MAX_ONGOING, engine_deployment
    from replicas import EngineConfig

    monkeypatch.delenv("TPSERVE_MAX_ONGOING", raising=False)
    app = engine_deployment(EngineConfig(), use_gpu=False)
    assert app._bound_deployment.max_ongoing_requests == MAX_ONGOING == 128
    app = engine_deployment(EngineConfig(max_num_seqs=200), use_gpu=False)
    assert app._bound_deployment.max_ongoing_requests == 400
    monkeypatch.setenv("TPSERVE_MAX_ONGOING", "64")
    app = engine_deployment(EngineConfig(max_num_seqs=200), use_gpu=False)
    assert app._bound_deployment.max_ongoing_requests == 64


def test_tp1_replicas_may_share_a_gpu_with_a_set_kv_pool() -> None:
    """gpus_per_rank (an app argument, `tpserve up --gpus-per-rank`): each rank's bundle
    and the replica's actor take that share of a GPU; under 1 only at tp=1 and with the
    KV pool's size set, each refused by name otherwise (before any replica starts)."""
    from cluster.app import build
    from cluster.engine import engine_deployment
    from replicas import EngineConfig

    def options(app: object) -> tuple[object, object]:
        dep = app._bound_deployment  # type: ignore[attr-defined]
        return dep._replica_config.placement_group_bundles, dep.ray_actor_options["num_gpus"]

    shared = EngineConfig(kv_cache_memory=16 * 2**30)
    app = engine_deployment(shared, use_gpu=True, gpus_per_rank=0.5)
    assert options(app) == ([{"CPU": 1.0, "GPU": 0.5}], 0.5)
    assert options(engine_deployment(EngineConfig(tp=2), use_gpu=True)) == (
        [{"CPU": 1.0, "GPU": 1.0}] * 2, 1.0)
    assert options(engine_deployment(shared, use_gpu=False, gpus_per_rank=0.5)) == (
        [{"CPU": 1.0}], 0)
    with pytest.raises(ValueError, match="tp=1 only"):
        engine_deployment(EngineConfig(tp=2, kv_cache_memory=2**30), gpus_per_rank=0.5)
    with pytest.raises(ValueError, match="set kv_cache_memory"):
        engine_deployment(EngineConfig(), gpus_per_rank=0.5)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        engine_deployment(EngineConfig(), gpus_per_rank=2)
    args = load_config(CLUSTER / "serve.yaml", gpus_per_rank=0.5)["applications"][0]["args"]
    assert args["gpus_per_rank"] == 0.5
    assert load_config(CLUSTER / "serve.yaml")["applications"][0]["args"]["gpus_per_rank"] == 1
    with pytest.raises(ValueError, match="tp=1 only"):
        build({**args, "engine": {"tp": 2, "kv_cache_memory": 2**30}})


def test_the_engine_replicas_gil_switch_interval_is_pythons_unless_told(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """TPSERVE_SWITCH_INTERVAL_MS (for measuring; infra/device_stack.sh AB_SWITCH_MS):
    unset or empty is Python's own; milliseconds in (0, 1000] are taken; anything else
    is refused with the variable's name, not ignored."""
    from cluster.engine import switch_interval_ms

    monkeypatch.delenv("TPSERVE_SWITCH_INTERVAL_MS", raising=False)
    assert switch_interval_ms() is None
    monkeypatch.setenv("TPSERVE_SWITCH_INTERVAL_MS", "")
    assert switch_interval_ms() is None
    monkeypatch.setenv("TPSERVE_SWITCH_INTERVAL_MS", "0.5")
    assert switch_interval_ms() == 0.5
    for bad in ("0", "-1", "2000", "fast"):
        monkeypatch.setenv("TPSERVE_SWITCH_INTERVAL_MS", bad)
        with pytest.raises(ValueError, match="TPSERVE_SWITCH_INTERVAL_MS"):
            switch_interval_ms()
