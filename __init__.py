"""headscope: find, score and steer attention heads."""

__version__ = "0.1.0"
