"""diagnose: synthetic star tables with a known optical pattern must be named, with numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from astropy.table import Table

from gpudeconv import GpudeconvError
from gpudeconv.psf.diagnose import Diagnosis, diagnose

SHAPE = (3000, 4000)  # H, W: a 4000 x 3000 sensor
YC, XC = (SHAPE[0] - 1) / 2, (SHAPE[1] - 1) / 2
RADIUS = math.hypot(XC, YC)  # half-diagonal, 2499.5 px


def star_table(fwhm, shape=None, *, n=300, seed=0, fwhm_noise=0.06, e_noise=0.04, rejected=12):
    """Stars uniform over the frame, with parameters from a known pattern plus noise.

    ``fwhm(u, v)`` and ``shape(u, v) -> (ellipticity, angle_deg)`` take positions in units of
    the half-diagonal from the centre (u along x, v along y). FWHM noise is relative; shape
    noise is added to the spin-2 vector e (cos 2θ, sin 2θ), as measurement noise acts. The first
    ``rejected`` stars are marked unused and given wild values that must be ignored.
    """
    rng = np.random.default_rng(seed)
    height, width = SHAPE
    x = rng.uniform(15, width - 16, n)
    y = rng.uniform(15, height - 16, n)
    u, v = (x - XC) / RADIUS, (y - YC) / RADIUS
    values = fwhm(u, v) * (1 + rng.normal(0, fwhm_noise, n))
    e, angle = shape(u, v) if shape is not None else (np.zeros(n), np.zeros(n))
    e1 = e * np.cos(np.radians(2 * angle)) + rng.normal(0, e_noise, n)
    e2 = e * np.sin(np.radians(2 * angle)) + rng.normal(0, e_noise, n)
    used = np.ones(n, dtype=bool)
    used[:rejected] = False
    values[:rejected] *= 4.0
    return Table(
        {
            "x": x,
            "y": y,
            "flux": rng.uniform(1e3, 1e5, n),
            "peak": rng.uniform(1e2, 1e4, n),
            "fwhm": values,
            "ratio": 1 - np.clip(np.hypot(e1, e2), 0, 0.9),
            "angle": np.degrees(np.arctan2(e2, e1)) / 2 % 180,
            "beta": np.full(n, 3.0),
            "used": used,
            "reason": np.where(used, "", "blended"),
        }
    )


def flat(value=3.5):
    return lambda u, v: value + 0 * u


def radial(amount, power, centre=(0.0, 0.0), turn=0.0):
    """Elongation ``amount * r**power`` along the radius from ``centre`` (turned by ``turn``)."""

    def shape(u, v):
        du, dv = u - centre[0], v - centre[1]
        return amount * np.hypot(du, dv) ** power, np.degrees(np.arctan2(dv, du)) + turn

    return shape


def test_uniform_field_names_nothing_else():
    diagnosis = diagnose(star_table(flat(3.5)), SHAPE)
    assert diagnosis.kinds == ["uniform"]
    evidence = diagnosis.finding("uniform").evidence
    assert evidence["fwhm_median_px"] == pytest.approx(3.5, rel=0.03)
    assert evidence["fwhm_variation_percent"] < 5
    assert "uniform across the field" in diagnosis.text()
    assert diagnosis.stars == 300 - 12


@pytest.mark.parametrize("seed", range(5))
def test_uniform_field_stays_uniform_with_noise_and_outliers(seed):
    table = star_table(flat(3.5), n=150, seed=seed, fwhm_noise=0.1, e_noise=0.06)
    # 5% of the used stars are blends or cosmic rays measured far too wide
    table["fwhm"][20:27] *= 3
    assert diagnose(table, SHAPE).kinds == ["uniform"]


def test_tilt_toward_the_upper_right():
    # FWHM = 3.5 (1 + 0.2 (u + v) / sqrt 2): gradient toward +x +y (45 deg)
    table = star_table(lambda u, v: 3.5 * (1 + 0.2 * (u + v) / math.sqrt(2)))
    diagnosis = diagnose(table, SHAPE)
    assert diagnosis.kinds == ["tilt"]
    evidence = diagnosis.finding("tilt").evidence
    hw, hh = XC / RADIUS, YC / RADIUS
    true_change = 2 * 3.5 * 0.2 * (hw + hh) / math.sqrt(2)  # corner to corner, 1.39 px
    assert evidence["change_px"] == pytest.approx(true_change, rel=0.15)
    assert evidence["change_percent"] == pytest.approx(100 * true_change / 3.5, rel=0.15)
    assert abs(evidence["direction_deg"] - 45) < 15
    assert evidence["fwhm_low_corner_px"] < 3.1 and evidence["fwhm_high_corner_px"] > 3.9
    summary = diagnosis.finding("tilt").summary
    assert "upper-right" in summary and "lower-left" in summary and "tilted" in summary


def test_tilt_toward_the_bottom_names_the_direction():
    diagnosis = diagnose(star_table(lambda u, v: 4.0 - 0.6 * v, seed=3), SHAPE)
    assert diagnosis.kinds == ["tilt"]
    evidence = diagnosis.finding("tilt").evidence
    assert abs(evidence["direction_deg"] - 270) < 10
    assert "worse toward the bottom" in diagnosis.finding("tilt").summary
    # the change between rows 0 and H-1: 0.6 * 2 * YC / R = 0.72 px
    assert evidence["change_px"] == pytest.approx(1.2 * YC / RADIUS, rel=0.15)


def test_small_gradients_are_not_tilt():
    # 4% corner to corner: measurable with 600 stars, but below what is worth naming
    table = star_table(lambda u, v: 3.5 * (1 + 0.02 * u), n=600, fwhm_noise=0.03)
    assert diagnose(table, SHAPE).kinds == ["uniform"]


def test_coma_radial_elongation_growing_as_r():
    diagnosis = diagnose(star_table(flat(3.5), radial(0.3, 1)), SHAPE)
    assert diagnosis.kinds == ["coma"]
    evidence = diagnosis.finding("coma").evidence
    assert evidence["elongation_power"] == 1
    assert evidence["radial_slope"] > 0
    assert evidence["elongation_corner"] == pytest.approx(0.3, abs=0.04)
    assert evidence["angle_to_radius_deg"] < 12
    assert "radially" in diagnosis.finding("coma").summary


def test_radial_elongation_growing_as_r2_is_back_focus():
    diagnosis = diagnose(star_table(flat(3.5), radial(0.3, 2), seed=1), SHAPE)
    assert diagnosis.kinds == ["back focus"]
    evidence = diagnosis.finding("back focus").evidence
    assert evidence["elongation_power"] == 2
    assert evidence["elongation_corner"] == pytest.approx(0.3, abs=0.04)


def test_tangential_elongation_is_field_curvature():
    diagnosis = diagnose(star_table(flat(3.5), radial(0.3, 2, turn=90), seed=2), SHAPE)
    assert diagnosis.kinds == ["field curvature"]
    evidence = diagnosis.finding("field curvature").evidence
    assert evidence["radial_slope"] < 0
    assert evidence["elongation_power"] == 2
    assert evidence["angle_to_radius_deg"] > 75
    assert evidence["elongation_corner"] == pytest.approx(0.3, abs=0.04)
    assert "tangentially" in diagnosis.finding("field curvature").summary


def test_fwhm_growing_as_r2_from_the_centre_is_field_curvature_without_offset():
    diagnosis = diagnose(star_table(lambda u, v: 3.0 + 1.5 * (u**2 + v**2), seed=4), SHAPE)
    assert diagnosis.kinds == ["field curvature"]
    evidence = diagnosis.finding("field curvature").evidence
    assert evidence["fwhm_centre_px"] == pytest.approx(3.0, rel=0.05)
    assert evidence["fwhm_corner_px"] == pytest.approx(4.5, rel=0.05)
    assert evidence["fwhm_power"] == 2


def test_off_centre_symmetric_pattern_is_collimation():
    # FWHM bowl and radial elongation both centred at (u, v) = (0.3, -0.2): pixel (2749, 1000)
    centre = (0.3, -0.2)
    table = star_table(
        lambda u, v: 3.0 + 1.5 * ((u - centre[0]) ** 2 + (v - centre[1]) ** 2),
        radial(0.25, 1, centre),
        seed=5,
    )
    diagnosis = diagnose(table, SHAPE)
    assert "collimation" in diagnosis.kinds and "tilt" not in diagnosis.kinds
    evidence = diagnosis.finding("collimation").evidence
    true_x, true_y = XC + centre[0] * RADIUS, YC + centre[1] * RADIUS
    true_offset = math.hypot(*centre) * RADIUS  # 901 px
    assert math.hypot(evidence["centre_x"] - true_x, evidence["centre_y"] - true_y) < 100
    assert evidence["offset_px"] == pytest.approx(true_offset, rel=0.1)
    assert evidence["offset_percent_diagonal"] == pytest.approx(
        100 * true_offset / (2 * RADIUS), rel=0.1
    )
    true_direction = math.degrees(math.atan2(centre[1], centre[0])) % 360  # 326 deg
    assert abs(evidence["direction_deg"] - true_direction) < 8
    assert "lower-right" in diagnosis.finding("collimation").summary
    # both patterns locate the centre
    assert "fwhm_centre_x" in evidence and "elongation_centre_x" in evidence


def test_off_centre_fwhm_bowl_alone_is_collimation_not_tilt():
    centre = (-0.35, 0.1)
    table = star_table(lambda u, v: 3.0 + 2.0 * ((u - centre[0]) ** 2 + (v - centre[1]) ** 2))
    diagnosis = diagnose(table, SHAPE)
    assert sorted(diagnosis.kinds) == ["collimation", "field curvature"]
    evidence = diagnosis.finding("collimation").evidence
    assert evidence["offset_px"] == pytest.approx(math.hypot(*centre) * RADIUS, rel=0.1)


def test_uniform_elongation_is_named_with_its_angle():
    diagnosis = diagnose(star_table(flat(3.5), lambda u, v: (0.2 + 0 * u, 30 + 0 * u)), SHAPE)
    assert diagnosis.kinds == ["uniform", "elongation"]
    evidence = diagnosis.finding("elongation").evidence
    assert evidence["ratio"] == pytest.approx(0.8, abs=0.02)
    assert evidence["angle_deg"] == pytest.approx(30, abs=3)


def test_aberrated_field_pattern_is_coma_like():
    """The pattern of gpudeconv.psf.field.aberrated_field (its Notes): FWHM linear in r,
    major/minor 1 -> 1.5 linear in r, major axis along the radius."""

    def fwhm(u, v):
        return 3.0 + (6.0 - 3.0) * np.hypot(u, v)

    def shape(u, v):
        rho = np.hypot(u, v)
        return 1 - 1 / (1 + 0.5 * rho), np.degrees(np.arctan2(v, u))

    diagnosis = diagnose(star_table(fwhm, shape, seed=6), SHAPE)
    assert diagnosis.kinds == ["coma"]
    evidence = diagnosis.finding("coma").evidence
    assert evidence["fwhm_power"] == 1 and evidence["elongation_power"] == 1
    assert evidence["fwhm_centre_px"] == pytest.approx(3.0, rel=0.06)
    assert evidence["fwhm_corner_px"] == pytest.approx(6.0, rel=0.06)
    # 1 - 1/1.5 = 0.33 at the corners; a straight line through a concave curve reads a little high
    assert evidence["elongation_corner"] == pytest.approx(1 / 3, abs=0.07)
    assert evidence["angle_to_radius_deg"] < 10


def test_used_column_selects_the_stars():
    good = star_table(flat(3.5), n=200, rejected=0)
    bad = star_table(lambda u, v: 3.5 + 3 * u, n=200, seed=9, rejected=0)
    bad["used"] = False
    from astropy.table import vstack

    assert diagnose(vstack([good, bad]), SHAPE).kinds == ["uniform"]
    del bad["used"]
    assert diagnose(bad, SHAPE).kinds == ["tilt"]


def test_estimate_like_objects_give_their_stars_and_shape():
    class Estimate:
        stars = star_table(lambda u, v: 3.5 * (1 + 0.2 * u))
        image_shape = SHAPE

    assert diagnose(Estimate()).kinds == ["tilt"]


def test_too_few_stars_give_a_note_and_no_findings():
    diagnosis = diagnose(star_table(flat(), n=20, rejected=10), SHAPE)
    assert diagnosis.findings == [] and diagnosis.stars == 10
    assert "too few stars (10)" in diagnosis.note and "too few stars" in diagnosis.text()
    assert diagnosis.as_dict()["note"] == diagnosis.note


def test_stars_bunched_in_a_corner_or_on_a_line_give_a_note():
    corner = star_table(flat(), n=60, rejected=0)
    corner["x"] = 100 + corner["x"] / 40
    corner["y"] = 100 + corner["y"] / 40
    line = star_table(flat(), n=60, rejected=0)
    line["y"] = 1500.0
    for table in (corner, line):
        diagnosis = diagnose(table, SHAPE)
        assert diagnosis.findings == [] and "bunched" in diagnosis.note


def test_noise_free_parameters_are_diagnosed_without_warnings(recwarn):
    table = star_table(lambda u, v: 3.0 + 0.5 * u, n=40, rejected=0, fwhm_noise=0, e_noise=0)
    diagnosis = diagnose(table, SHAPE)
    assert diagnosis.kinds == ["tilt"]
    assert diagnosis.finding("tilt").evidence["direction_deg"] == pytest.approx(0, abs=0.5)
    assert "over 100 sigma" in diagnosis.text() and "toward the right" in diagnosis.text()
    assert not recwarn.list


def test_as_dict_is_json_with_numbers():
    diagnosis = diagnose(star_table(flat(3.5), radial(0.3, 1)), SHAPE)
    data = json.loads(json.dumps(diagnosis.as_dict(), allow_nan=False))
    assert data["stars"] == 288 and data["image_shape"] == [3000, 4000]
    assert "row 0 at the bottom" in data["orientation"]
    (finding,) = data["findings"]
    assert finding["kind"] == "coma" and finding["summary"]
    assert all(isinstance(value, (int, float)) for value in finding["evidence"].values())
    assert isinstance(diagnosis, Diagnosis)


def test_non_finite_star_parameters_are_ignored():
    table = star_table(flat(3.5))
    table["fwhm"][50:60] = np.nan
    table["ratio"][60:70] = np.nan
    diagnosis = diagnose(table, SHAPE)
    assert diagnosis.kinds == ["uniform"] and diagnosis.stars == 300 - 12 - 20


def test_validation_errors_are_one_line():
    table = star_table(flat())
    with pytest.raises(GpudeconvError, match="image_shape"):
        diagnose(table)
    with pytest.raises(GpudeconvError, match="lacks column.*ratio"):
        diagnose(table[["x", "y", "fwhm", "angle"]], SHAPE)
    with pytest.raises(GpudeconvError, match="image_shape must be"):
        diagnose(table, (0, 10))
    with pytest.raises(GpudeconvError, match="star table"):
        diagnose(np.zeros((5, 5)), SHAPE)


# --- end to end: images blurred by a known field, stars measured by fit_psf ----------------------


def blurred_star_field(field, *, n_stars=250, seed=0):
    """Point stars blurred by ``field`` (each with the PSF at its own position), sky and noise."""
    from gpudeconv.operators import SpatiallyVaryingConvolution

    rng = np.random.default_rng(seed)
    height, width = field.image_shape
    truth = np.zeros((height, width), dtype=np.float32)
    rows = rng.integers(8, height - 8, n_stars)
    cols = rng.integers(8, width - 8, n_stars)
    np.add.at(truth, (rows, cols), 10 ** rng.uniform(3.3, 5.0, n_stars))
    blurred = np.asarray(SpatiallyVaryingConvolution(field, backend="numpy").forward(truth))
    observed = rng.poisson(np.clip(blurred + 100.0, 0, None)) + rng.normal(0, 3.0, blurred.shape)
    return observed.astype(np.float32)


def test_image_blurred_by_an_aberrated_field_reads_as_coma():
    from gpudeconv.psf import field as field_module
    from gpudeconv.psf.estimate import fit_psf

    field = field_module.aberrated_field(
        (480, 640), (4, 5), fwhm_centre=3.0, fwhm_corner=5.5, elongation_corner=1.6, beta=3.0
    )
    estimate = fit_psf(blurred_star_field(field, seed=2))
    diagnosis = diagnose(estimate)
    assert diagnosis.kinds == ["coma"], diagnosis.text()
    evidence = diagnosis.finding("coma").evidence
    assert evidence["fwhm_centre_px"] == pytest.approx(3.0, rel=0.1)
    assert evidence["fwhm_corner_px"] == pytest.approx(5.5, rel=0.1)
    assert evidence["elongation_corner"] == pytest.approx(1 - 1 / 1.6, abs=0.07)
    assert evidence["angle_to_radius_deg"] < 10


def test_image_blurred_by_a_tilted_focal_plane_reads_as_tilt():
    import gpudeconv as gd
    from gpudeconv.psf.estimate import fit_psf

    height, width = 480, 640

    def psf(y, x):  # FWHM 3 px at pixel (0, 0) to 5 px at the opposite corner
        return gd.psf.moffat(3.0 + 2.0 * (x + y) / (height + width - 2), 3.0)

    field = gd.PSFField.from_function(psf, (height, width), (4, 5))
    diagnosis = diagnose(fit_psf(blurred_star_field(field, seed=3)))
    assert diagnosis.kinds == ["tilt"], diagnosis.text()
    evidence = diagnosis.finding("tilt").evidence
    assert evidence["fwhm_low_corner_px"] == pytest.approx(3.0, rel=0.1)
    assert evidence["fwhm_high_corner_px"] == pytest.approx(5.0, rel=0.1)
    assert abs(evidence["direction_deg"] - 45) < 10
    assert "upper-right" in diagnosis.finding("tilt").summary
