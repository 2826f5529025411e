"""The localisation product: tile a georeferenced map, index the tiles, localise drone images.

- :mod:`imlnet.geo.tiling`: GeoTIFF (any CRS) -> overlapping tiles + ``tiles.csv`` (lat/lon).
- :mod:`imlnet.geo.index`: tile descriptors in FAISS + metadata + manifest (``GalleryIndex``).
- :mod:`imlnet.geo.localize`: drone images -> top-k tiles, position estimate, error in metres.
- :mod:`imlnet.geo.coords`: CRS and distance helpers (pyproj).

Nothing here imports the trainer; the model is imported only by the ``index`` and ``localize``
commands.
"""
