"""Ranks 1..tp-1 of an engine replica as Ray actors in the replica's placement group.

The Serve replica is rank 0 and sits in bundle 0 of its placement group; rank r sits in
bundle r (STRICT_PACK: one node). On GPUs, every rank of a replica must see all of the
replica's GPUs (NCCL peer-to-peer and symmetric memory need it): the rank actors start
with Ray's CUDA_VISIBLE_DEVICES setting turned off, report the GPUs Ray gave their bundle,
and all ranks then set CUDA_VISIBLE_DEVICES to the union, in rank order, before CUDA
starts; each rank picks its own by LOCAL_RANK.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

if TYPE_CHECKING:  # (the engine is imported in the rank actor: RankActor)
    from replicas import EngineConfig
    from replicas.ranks import RankHandle

NOSET_CUDA = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def visible_devices(gpu_ids_by_rank: list[list[str]]) -> str:
    """CUDA_VISIBLE_DEVICES for every rank of a replica: its GPUs in rank order.

    Raises ValueError when two ranks were given the same GPU (NCCL cannot run two ranks
    on one device) or a rank got none.
    """
    flat = [str(g) for ids in gpu_ids_by_rank for g in ids]
    if any(not ids for ids in gpu_ids_by_rank):
        raise ValueError(f"a rank has no GPU: {gpu_ids_by_rank}")
    if len(set(flat)) != len(flat):
        raise ValueError(f"ranks of one replica share a GPU: {gpu_ids_by_rank}")
    return ",".join(flat)


def rank_env(visible: str | None, rank: int) -> dict[str, str]:
    env = {"LOCAL_RANK": str(rank)}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return env


@ray.remote
class RankActor:
    """One rank r >= 1: runs the worker loop until rank 0 says stop."""

    def __init__(self, import_engine: bool = False) -> None:
        """`import_engine`: import the worker (torch) now, while rank 0 is still importing
        its own and reading the model, rather than when `run` comes: on CPU that takes
        the ~2 s of imports off the replica's start (rank 0 waits for this rank at the
        group's join). Never on GPUs: there CUDA_VISIBLE_DEVICES comes with `run`, and
        nothing may touch CUDA before it."""
        if import_engine:
            import replicas.worker  # noqa: F401

    def gpu_ids(self) -> list[str]:
        return [str(g) for g in ray.get_gpu_ids()]

    def run(self, config: EngineConfig, model_dir: str, rank: int, init_method: str,
            env: dict[str, str]) -> None:
        os.environ.update(env)  # before CUDA starts in this process
        from replicas.worker import rank_main

        rank_main(config, model_dir, rank, init_method)


@dataclass
class ActorRank:
    """A RankHandle over a rank actor and its running `run` call."""

    actor: Any
    done: Any  # ObjectRef of the `run` call

    def is_alive(self) -> bool:
        ready, _ = ray.wait([self.done], timeout=0)
        return not ready

    def join(self, timeout: float | None = None) -> None:
        ray.wait([self.done], timeout=timeout)

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)


class RankGroup:
    """Creates the rank actors of the current replica and launches them for the Engine."""

    def __init__(self, tp: int, use_gpu: bool, cpus_per_rank: float, name: str) -> None:
        pg = get_current_placement_group()
        if tp > 1 and pg is None:
            raise RuntimeError("tp > 1 needs the replica to run in a placement group "
                               "(deployment option placement_group_bundles)")
        self.actors = [
            RankActor.options(
                name=f"{name}-rank{rank}",  # findable by operators (and tests)
                num_cpus=cpus_per_rank, num_gpus=1 if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank),
                runtime_env={"env_vars": {NOSET_CUDA: "1"}} if use_gpu else None,
            ).remote(import_engine=not use_gpu)
            for rank in range(1, tp)
        ]
        self.visible = None
        if use_gpu:
            own = [str(g) for g in ray.get_gpu_ids()]
            others = ray.get([a.gpu_ids.remote() for a in self.actors])
            self.visible = visible_devices([own, *others])
            os.environ.update(rank_env(self.visible, 0))  # rank 0: this replica process

    def launch(self, config: EngineConfig, model_dir: str, rank: int, init_method: str
               ) -> RankHandle:
        actor = self.actors[rank - 1]
        done = actor.run.remote(config, model_dir, rank, init_method,
                                rank_env(self.visible, rank))
        return ActorRank(actor, done)
