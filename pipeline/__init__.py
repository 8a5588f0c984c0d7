"""v2m: reproducible video-to-music. One DVC stage = one module of this package."""

__version__ = "0.1.0"
