"""The iterative restoration algorithms, written once for both backends."""

from .rl import richardson_lucy

__all__ = ["richardson_lucy"]
