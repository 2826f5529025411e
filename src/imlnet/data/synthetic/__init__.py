"""imlnet.data.synthetic."""
