"""imlnet.models."""
