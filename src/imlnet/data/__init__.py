"""imlnet.data."""
