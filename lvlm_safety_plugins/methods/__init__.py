"""Safety methods, one folder per method (config dataclass beside the code)."""

from .base import Method

__all__ = ["Method"]
