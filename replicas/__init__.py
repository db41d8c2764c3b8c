"""tpserve's tensor-parallel inference engine: usable alone, without Ray, Redis or HTTP.

The engine's names load with their first use (`from replicas import Engine`), not with the
package: a rank process imports only `replicas.worker`, and so never transformers'
tokenizer (about a second and a half of CPU per rank process)."""

from typing import TYPE_CHECKING, Any

from replicas.config import ConfigError, EngineConfig, SamplingParams, StructuredSpec

if TYPE_CHECKING:
    from replicas.engine import Completion, Engine, TokenDelta
    from replicas.errors import EngineDeadError, RequestError

__all__ = [
    "Completion",
    "ConfigError",
    "Engine",
    "EngineConfig",
    "EngineDeadError",
    "RequestError",
    "SamplingParams",
    "StructuredSpec",
    "TokenDelta",
]

_ENGINE_NAMES = ("Completion", "Engine", "TokenDelta")
_ERROR_NAMES = ("EngineDeadError", "RequestError")


def __getattr__(name: str) -> Any:
    if name in _ERROR_NAMES:  # (without the engine: a router unpickles these)
        from replicas import errors

        return getattr(errors, name)
    if name in _ENGINE_NAMES:
        from replicas import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'replicas' has no attribute {name!r}")
