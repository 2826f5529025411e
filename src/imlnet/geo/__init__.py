"""The localisation product: tile a georeferenced map, index the tiles, localise drone images.

- :mod:`imlnet.geo.tiling`: GeoTIFF (any CRS) -> a window plan -> tiles + ``tiles.csv``.
- :mod:`imlnet.geo.raster`: opening a raster, band choice, 8-bit mapping, windowed reads.
- :mod:`imlnet.geo.tables`: the CSV tables and WKT footprints (shapely) every step shares.
- :mod:`imlnet.geo.gallery`: tile descriptors in FAISS + metadata + manifest (``GalleryIndex``).
- :mod:`imlnet.geo.index`: the ``imlnet index`` command: embed tiles into a gallery.
- :mod:`imlnet.geo.localize`: drone images -> top-k tiles, position estimate, error in metres.
- :mod:`imlnet.geo.outputs`: what ``localize`` writes (CSV, GeoJSON, summary).
- :mod:`imlnet.geo.coords`: CRS, ground pixel size and distance helpers (pyproj).

Nothing here imports the trainer; the model is imported only by the ``index`` and ``localize``
commands.
"""
