"""GeoTIFF tiling: coordinates against an independent pyproj computation, counts, errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from pyproj import Geod, Transformer
from rasterio.transform import from_origin

from imlnet.cli import main as cli_main
from imlnet.errors import GeoError
from imlnet.geo.tables import TILE_COLUMNS, read_tileset
from imlnet.geo.tiling import plan_tiles, tile_geotiff

GEOD = Geod(ellps="WGS84")
W, H = 512, 384


def write_raster(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = "EPSG:32632",
    transform=None,
    nodata: float | None = None,
) -> Path:
    """Write ``data (bands, H, W)`` as a GeoTIFF (no georeference when crs is None)."""
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0])
    profile["dtype"] = str(data.dtype)
    if crs is not None:
        profile.update(crs=crs, transform=transform or from_origin(480_000, 5_300_000, 0.5, 0.5))
    if nodata is not None:
        profile["nodata"] = nodata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning for the bad-input case
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(data)
    return path


def texture(bands: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 255, (bands, H, W), dtype=np.uint8)


def test_utm_centres_round_trip_and_pixels(tmp_path: Path) -> None:
    data = texture()
    src = write_raster(tmp_path / "utm.tif", data)
    tiles = tile_geotiff(
        src,
        tmp_path / "t",
        tile_size_m=60,
        stride_m=30,
        out_px=120,
        image_format="png",
        resampling="nearest",
        progress=False,
    )
    to_ll = Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True)
    assert tiles.params["tile_px"] == [120, 120]
    for row in tiles.rows:
        col_c, row_c = row["col_off"] + row["width"] / 2, row["row_off"] + row["height"] / 2
        x, y = 480_000 + 0.5 * col_c, 5_300_000 - 0.5 * row_c  # the raster transform by hand
        assert (row["center_x"], row["center_y"]) == pytest.approx((x, y), abs=1e-6)
        lon, lat = to_ll.transform(x, y)
        assert GEOD.inv(lon, lat, row["lon"], row["lat"])[2] < 1.0
        assert row["crs"] == "EPSG:32632" and row["source"] == str(src.resolve())
    # with out_px = window size and nearest resampling the tile is the raster window itself
    row = tiles.rows[9]
    tile = np.asarray(Image.open(tiles.root / row["path"]))
    r0, c0 = row["row_off"], row["col_off"]
    np.testing.assert_array_equal(tile, data[:, r0 : r0 + 120, c0 : c0 + 120].transpose(1, 2, 0))
    # the table on disk reads back to the same rows
    again = read_tileset(tiles.root)
    assert again.rows == tiles.rows and list(again.rows[0]) == list(TILE_COLUMNS)


@pytest.mark.parametrize(
    ("stride_m", "cover", "nx", "ny"),
    [(30, False, 7, 5), (30, True, 8, 6), (60, False, 4, 3), (60, True, 5, 4)],
)
def test_tile_counts(tmp_path: Path, stride_m: float, cover: bool, nx: int, ny: int) -> None:
    src = write_raster(tmp_path / "utm.tif", texture())
    tiles = tile_geotiff(
        src,
        tmp_path / "t",
        tile_size_m=60,
        stride_m=stride_m,
        out_px=16,
        cover_edges=cover,
        progress=False,
    )
    cols = sorted({r["col_off"] for r in tiles.rows})
    rows = sorted({r["row_off"] for r in tiles.rows})
    assert (len(cols), len(rows), len(tiles)) == (nx, ny, nx * ny)
    assert cols[0] == 0 and rows[0] == 0
    if cover:  # the last column/row is flush with the map's edge
        assert (cols[-1], rows[-1]) == (W - 120, H - 120)
    assert len(list(tiles.root.glob("*.jpg"))) == nx * ny
    assert all(Image.open(tiles.root / r["path"]).size == (16, 16) for r in tiles.rows[:3])


def test_geographic_and_mercator_tiles_measure_tile_size_on_the_ground(tmp_path: Path) -> None:
    """Tiles are tile_size_m wide on the ground in EPSG:4326 and in Web Mercator (EPSG:3857)."""
    lat0 = 50.0
    cases = {
        # 1e-5 deg/px: 0.72 m east-west, 1.11 m north-south at 50 N
        "EPSG:4326": from_origin(8.0, lat0, 1e-5, 1e-5),
        # 0.5 Mercator metres per pixel = 0.32 m on the ground at 50 N
        "EPSG:3857": from_origin(890_555.9, 6_446_275.8, 0.5, 0.5),
    }
    for crs, transform in cases.items():
        src = write_raster(tmp_path / f"{crs[5:]}.tif", texture(), crs=crs, transform=transform)
        tiles = tile_geotiff(src, tmp_path / crs[5:], tile_size_m=80, stride_m=40, progress=False)
        to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
        for row in tiles.rows[:5]:
            c0, r0, w, h = (row[k] for k in ("col_off", "row_off", "width", "height"))
            rmid, cmid = r0 + h / 2, c0 + w / 2
            west = to_ll.transform(*(transform @ (c0, rmid)))
            east = to_ll.transform(*(transform @ (c0 + w, rmid)))
            north = to_ll.transform(*(transform @ (cmid, r0)))
            south = to_ll.transform(*(transform @ (cmid, r0 + h)))
            width_m = GEOD.inv(*west, *east)[2]
            height_m = GEOD.inv(*north, *south)[2]
            gx, gy = tiles.params["ground_pixel_m"]
            assert abs(width_m - 80) <= gx and abs(height_m - 80) <= gy, (crs, width_m, height_m)
            lon, lat = to_ll.transform(*(transform @ (cmid, rmid)))
            assert GEOD.inv(lon, lat, row["lon"], row["lat"])[2] < 1.0
            assert row["crs"] == crs


def test_band_selection_and_errors(tmp_path: Path) -> None:
    five = write_raster(tmp_path / "five.tif", texture(5))
    with pytest.raises(GeoError, match=r"five\.tif.*5 bands.*bands=\(r, g, b\)"):
        tile_geotiff(five, tmp_path / "a", tile_size_m=60, stride_m=60, progress=False)
    tiles = tile_geotiff(
        five,
        tmp_path / "b",
        tile_size_m=60,
        stride_m=60,
        bands=(4, 3, 2),
        out_px=120,
        resampling="nearest",
        image_format="png",
        progress=False,
    )
    first = np.asarray(Image.open(tiles.root / tiles.rows[0]["path"]))
    np.testing.assert_array_equal(first[..., 0], texture(5)[3, :120, :120])
    with pytest.raises(GeoError, match="between 1 and 5"):
        tile_geotiff(five, tmp_path / "c", tile_size_m=60, stride_m=60, bands=(6,), progress=False)

    grey = write_raster(tmp_path / "grey.tif", texture(1))
    tiles = tile_geotiff(grey, tmp_path / "g", tile_size_m=60, stride_m=60, progress=False)
    assert Image.open(tiles.root / tiles.rows[0]["path"]).mode == "L"

    bare = write_raster(tmp_path / "bare.tif", texture(), crs=None)
    with pytest.raises(GeoError, match=r"bare\.tif.*no georeference"):
        tile_geotiff(bare, tmp_path / "d", tile_size_m=60, stride_m=60, progress=False)

    utm = write_raster(tmp_path / "utm.tif", texture())
    with pytest.raises(GeoError, match=r"1000 m \(1999 x 1999 px\).*512 x 384 px"):
        tile_geotiff(utm, tmp_path / "e", tile_size_m=1000, stride_m=60, progress=False)


def test_nodata_and_alpha_tiles_are_skipped(tmp_path: Path) -> None:
    data = texture()
    data[:, :, :200] = 0  # nodata on the left
    src = write_raster(tmp_path / "nd.tif", data, nodata=0)
    tiles = tile_geotiff(
        src, tmp_path / "t", tile_size_m=60, stride_m=30, min_valid=0.9, progress=False
    )
    # independently: a window is kept when >= 90 % of its pixels are not nodata in some band
    expected, skipped = set(), 0
    for r0 in (0, 60, 120, 180, 240, 264):
        for c0 in (0, 60, 120, 180, 240, 300, 360, 392):
            valid = (data[:, r0 : r0 + 120, c0 : c0 + 120] != 0).any(axis=0).mean()
            if valid >= 0.9:
                expected.add((c0, r0))
            else:
                skipped += 1
    assert {(r["col_off"], r["row_off"]) for r in tiles.rows} == expected
    assert tiles.skipped == skipped > 0 and tiles.params["skipped"] == skipped

    rgba = np.concatenate([texture(), np.full((1, H, W), 255, np.uint8)])
    rgba[3, 200:, :] = 0  # transparent bottom
    src = write_raster(tmp_path / "rgba.tif", rgba)
    tiles = tile_geotiff(src, tmp_path / "a", tile_size_m=60, stride_m=60, progress=False)
    assert {r["row_off"] for r in tiles.rows} == {0} and tiles.skipped == 5 * 3
    assert Image.open(tiles.root / tiles.rows[0]["path"]).mode == "RGB"  # alpha dropped


def test_sixteen_bit_raster_is_stretched_to_eight_bits(tmp_path: Path) -> None:
    data = (texture().astype(np.uint16) * 200).astype(np.uint16)
    src = write_raster(tmp_path / "u16.tif", data)
    tiles = tile_geotiff(
        src, tmp_path / "t", tile_size_m=60, stride_m=60, image_format="png", progress=False
    )
    pixels = np.asarray(Image.open(tiles.root / tiles.rows[0]["path"]))
    assert pixels.dtype == np.uint8 and pixels.min() == 0 and pixels.max() == 255


def test_cli_tile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_raster(tmp_path / "utm.tif", texture())
    argv = ["tile", str(src), str(tmp_path / "t"), "--tile-size-m", "60", "--stride-m", "60"]
    assert cli_main([*argv, "--out-px", "32", "--quiet"]) == 0
    assert "20 tiles" in capsys.readouterr().out
    assert len(read_tileset(tmp_path / "t")) == 20
    # --image-size is the flag of every command; --out-px stays as a hidden alias
    other = [*argv[:2], str(tmp_path / "s"), *argv[3:], "--image-size", "24", "--quiet"]
    assert cli_main(other) == 0
    first = read_tileset(tmp_path / "s").rows[0]["path"]
    assert Image.open(tmp_path / "s" / first).size == (24, 24)
    capsys.readouterr()
    assert cli_main(["tile", str(tmp_path / "missing.tif"), str(tmp_path / "u"), "--quiet"]) == 2
    assert "missing.tif" in capsys.readouterr().err


def test_plan_tiles_without_io() -> None:
    """The window plan is a pure function of the raster's size and ground pixel size."""
    plan = plan_tiles((W, H), (0.5, 0.5), tile_size_m=60, stride_m=30, cover_edges=False)
    assert plan.tile_px == (120, 120) and len(plan) == 7 * 5
    assert plan.cols == (0, 60, 120, 180, 240, 300, 360) and plan.rows == (0, 60, 120, 180, 240)
    assert plan.windows()[:2] == [(0, 0), (0, 60)]  # (row_off, col_off), row by row
    edges = plan_tiles((W, H), (0.5, 0.5), tile_size_m=60, stride_m=30)
    assert edges.cols[-1] == W - 120 and edges.rows[-1] == H - 120 and len(edges) == 8 * 6
    # anisotropic pixels: 120 x 60 px windows, strides of 60 and 30 px
    aniso = plan_tiles((W, H), (0.5, 1.0), tile_size_m=60, stride_m=30, cover_edges=False)
    assert aniso.tile_px == (120, 60) and aniso.cols[1] == 60 and aniso.rows[1] == 30
    # a fractional stride in pixels is rounded per window, not accumulated
    frac = plan_tiles((100, 100), (1.0, 1.0), tile_size_m=10, stride_m=2.5, cover_edges=False)
    assert frac.cols[:5] == (0, 2, 5, 8, 10)


def test_plan_refuses_tiny_tiles_and_sub_pixel_strides() -> None:
    # 300 m pixels (RGB.byte.tif-like): 180 m tiles would be one pixel
    with pytest.raises(
        GeoError,
        match=r"map\.tif: a tile of 180 m is 1 x 1 px .*300 x 300 m.*"
        r"at least 8 px.*--tile-size-m between 2.4e\+03 and",
    ):
        plan_tiles((791, 718), (300.0, 300.0), tile_size_m=180, stride_m=45, where="map.tif")
    with pytest.raises(
        GeoError,
        match=r"a stride of 0.2 m is under one pixel \(0.5 x 0.5 m\).*"
        r"--stride-m between 0.5 and 60",
    ):
        plan_tiles((W, H), (0.5, 0.5), tile_size_m=60, stride_m=0.2)
    with pytest.raises(
        GeoError, match=r"1000 m \(2000 x 2000 px\) is larger than the map.*512 x 384 px"
    ):
        plan_tiles((W, H), (0.5, 0.5), tile_size_m=1000, stride_m=60)
    # the smallest tile and stride that are allowed
    assert plan_tiles((W, H), (0.5, 0.5), tile_size_m=4, stride_m=0.5).tile_px == (8, 8)
    # a stride of "0.5 m" on UTM's 0.5002 m pixels is one pixel: allowed, each window once
    near = plan_tiles((W, H), (0.5002, 0.5002), tile_size_m=4, stride_m=0.5)
    assert len(set(near.cols)) == len(near.cols) == W - 8 + 1
