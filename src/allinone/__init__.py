"""allinone: one small instruction model, many prompt-defined tasks, served dependably."""

__version__ = "0.1.0"

__all__ = ["__version__"]
