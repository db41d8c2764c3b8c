"""The engine's request errors, in a module of their own: the engine replica's Serve process
(replicas/engineproc.py) and a router that unpickles them load these without the engine,
and so without torch."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine refuses (bad prompt or parameters); other requests go on."""


class EngineDeadError(RuntimeError):
    """The engine failed (a rank died or a step raised); retry on another replica."""
