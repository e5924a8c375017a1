"""The offline demo world: the safety-transfer problem at small scale (see docs/demo.md)."""

from .world import World, WorldConfig

__all__ = ["World", "WorldConfig"]
