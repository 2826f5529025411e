"""``imlnet serve``: a local web page where drone photos are dropped and located on the map.

:mod:`imlnet.serve.app` (the FastAPI app: page, static files, JSON API),
:mod:`imlnet.serve.jobs` (the bounded job queue and the localisation, through the functions
``imlnet localize`` uses), :mod:`imlnet.serve.media` (upload checks, thumbnails, match figures,
base maps), :mod:`imlnet.serve.cli` (the command). Needs ``pip install 'imlnet[serve]'``.
"""
