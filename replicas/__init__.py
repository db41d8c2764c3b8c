"""tpserve's tensor-parallel inference engine: usable alone, without Ray, Redis or HTTP."""

from replicas.config import ConfigError, EngineConfig, SamplingParams
from replicas.engine import Completion, Engine, EngineDeadError, RequestError, TokenDelta

__all__ = [
    "Completion",
    "ConfigError",
    "Engine",
    "EngineConfig",
    "EngineDeadError",
    "RequestError",
    "SamplingParams",
    "TokenDelta",
]
