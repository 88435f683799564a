"""artnet: given a painting, name the painter."""

__version__ = "0.1.0"
