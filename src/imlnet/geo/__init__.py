"""The localisation product: tile a georeferenced map, index the tiles, localise drone images.

- :mod:`imlnet.geo.tiling`: GeoTIFF (any CRS) -> a window plan -> tiles + ``tiles.csv``.
- :mod:`imlnet.geo.raster`: opening a raster, band choice, 8-bit mapping, windowed reads.
- :mod:`imlnet.geo.tables`: the CSV tables and WKT footprints (shapely) every step shares.
- :mod:`imlnet.geo.gallery`: tile descriptors in FAISS + metadata + manifest (``GalleryIndex``).
- :mod:`imlnet.geo.index`: the ``imlnet index`` command: embed tiles into a gallery.
- :mod:`imlnet.geo.localize`: drone images -> top-k tiles, position estimate, error in metres.
- :mod:`imlnet.geo.outputs`: what ``localize`` writes (CSV, GeoJSON, summary).
- :mod:`imlnet.geo.coords`: CRS, ground pixel size and distance helpers (pyproj).
- :mod:`imlnet.geo.verify`: local-feature matching of the top-K tiles (OpenCV), aim point, pose;
  :mod:`imlnet.geo.mapwindow` reads the map behind a tile at native resolution and
  :mod:`imlnet.geo.pose` holds the camera geometry (intrinsics, attitude, planar PnP).
- :mod:`imlnet.geo.track`: consecutive frames of a flight fused into a track (Viterbi).
- :mod:`imlnet.geo.refine`: verification and flights after retrieval; :mod:`imlnet.geo.fixes_io`
  their files, metrics and ``localize`` options; :mod:`imlnet.geo.mapping` the run's map PNG.

Nothing here imports the trainer; the model is imported only by the ``index`` and ``localize``
commands.
"""
