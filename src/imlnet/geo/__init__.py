"""imlnet.geo."""
