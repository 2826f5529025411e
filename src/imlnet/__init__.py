"""imlnet: IML-Net for cross-view geo-localisation (drone <-> satellite)."""

__version__ = "0.1.0"
