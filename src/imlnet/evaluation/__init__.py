"""Retrieval evaluation with the official University-1652 protocol (imports without Lightning).

- :mod:`~imlnet.evaluation.protocol`: the metrics (R@1/5/10, R@1%, AP), as in the official code.
- :mod:`~imlnet.evaluation.ranking` (+ :mod:`~imlnet.evaluation.buckets`): the fast exact ranks.
- :mod:`~imlnet.evaluation.features`: features of the test views, ``.npz`` files, directions.
- :mod:`~imlnet.evaluation.breakdown`: metrics per season, weather, altitude, pitch (``--by``).
- :mod:`~imlnet.evaluation.corruption`, :mod:`~imlnet.evaluation.robustness`: the University-WX
  weather protocol (``--corrupt``).
- :mod:`~imlnet.evaluation.multidomain`: both in one call (for the demo).
- :mod:`~imlnet.evaluation.cli`: the ``imlnet evaluate`` command.
"""

from imlnet.evaluation.features import (
    evaluate_views,
    extract_features,
    features_key,
    load_features,
    save_features,
)
from imlnet.evaluation.protocol import (
    DIRECTIONS,
    METRICS,
    PROTOCOLS,
    VIEWS,
    Protocol,
    average_precision,
    evaluate_retrieval,
    format_table,
)
from imlnet.evaluation.ranking import good_ranks


def main(argv: list[str]) -> int:
    """``imlnet evaluate`` (see :mod:`imlnet.evaluation.cli`)."""
    from imlnet.evaluation.cli import main as cli_main

    return cli_main(argv)


__all__ = [
    "DIRECTIONS",
    "METRICS",
    "PROTOCOLS",
    "VIEWS",
    "Protocol",
    "average_precision",
    "evaluate_retrieval",
    "evaluate_views",
    "extract_features",
    "features_key",
    "format_table",
    "good_ranks",
    "load_features",
    "main",
    "save_features",
]
