"""Options of the synthetic benchmark (``imlnet synth``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from imlnet.data.synthetic.common import DEFAULT_SEASONS, DEFAULT_WEATHER
from imlnet.data.synthetic.scene import SceneConfig
from imlnet.data.synthetic.shading import SEASONS
from imlnet.data.synthetic.weather import WEATHERS
from imlnet.errors import ImlnetError


@dataclass
class SynthConfig:
    """Options of the benchmark (see ``imlnet synth --help``)."""

    locations: int = 40  # locations with queries, split between train and test
    views: int = 54  # drone views per location (University-1652: 54)
    size: int = 256  # image side in pixels
    seed: int = 0
    train_fraction: float = 0.5
    distractors: int | None = None  # gallery-only test locations; None = 250/701 of the test set
    satellite_extent_m: float = 180.0  # ground side of the satellite image
    altitude_m: tuple[float, float] = (150.0, 60.0)  # the orbit descends from first to second
    pitch_deg: tuple[float, float] = (52.0, 40.0)  # optical axis below the horizon, high -> low
    turns: float = 2.0  # orbits around the target over all views
    fov_deg: float = 50.0
    jitter: bool = True  # small random yaw/pitch/altitude offsets per view
    anywhere: float = 0.0  # share of locations centred on a ground point between the landmarks
    seasons: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SEASONS))
    weather: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEATHER))
    jpeg_quality: int = 92
    scene: SceneConfig = field(default_factory=SceneConfig)

    @property
    def targets_per_city(self) -> int:
        """Targets (locations) one generated city holds."""
        return self.scene.targets_per_side**2

    def validate(self) -> None:
        """Raise :class:`ImlnetError` naming the option that is out of range."""
        if self.locations < 2:
            raise ImlnetError(
                "--locations must be at least 2 (train and test), got " + str(self.locations)
            )
        if self.views < 1 or self.size < 32 or self.size % 2:
            raise ImlnetError(
                f"--views must be >= 1 and --size an even number >= 32, got "
                f"{self.views} and {self.size}"
            )
        if not 0.0 <= self.anywhere <= 1.0:
            raise ImlnetError(f"--anywhere must be a share in [0, 1], got {self.anywhere:g}")
        if self.scene.extent_m < self.satellite_extent_m:
            raise ImlnetError(
                f"--city-size-m {self.scene.extent_m:g} must be at least the satellite image's "
                f"{self.satellite_extent_m:g} m"
            )
        for name, table, allowed in (
            ("seasons", self.seasons, SEASONS),
            ("weather", self.weather, WEATHERS),
        ):
            bad = set(table) - set(allowed)
            if bad or not table or min(table.values()) < 0 or sum(table.values()) <= 0:
                raise ImlnetError(
                    f"{name} probabilities {table} must use names from {allowed} "
                    "with non-negative weights that do not all vanish"
                )

    @property
    def n_train(self) -> int:
        return max(1, min(self.locations - 1, round(self.locations * self.train_fraction)))

    @property
    def n_test(self) -> int:
        return self.locations - self.n_train

    @property
    def n_distractors(self) -> int:
        if self.distractors is not None:
            return self.distractors
        return round(self.n_test * 250 / 701)
