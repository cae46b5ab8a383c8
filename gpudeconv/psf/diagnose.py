"""What the stars say about the optics: tilt, field curvature, coma, back focus, collimation.

`diagnose` reads the per-star parameters of a PSF estimate (major-axis FWHM, minor/major ratio,
angle of the major axis) and fits a few low-order patterns across the frame with robust least
squares. Each pattern that is both significant (several standard errors) and large enough to
matter (a threshold in pixels or ellipticity) becomes a `Finding` named for its usual cause:

============================================================  ===================
pattern in the used stars                                       ``kind``
============================================================  ===================
FWHM changes linearly across the frame (a plane)                ``'tilt'``
FWHM grows (or falls) symmetrically with the radius, as r^2     ``'field curvature'``
elongation perpendicular to the radius (tangential)             ``'field curvature'``
elongation along the radius, growing as r (and FWHM as r)       ``'coma'``
elongation along the radius, growing as r^2                     ``'back focus'``
the centre of these symmetric patterns is off the image centre  ``'collimation'``
the same elongation everywhere (direction and amount)           ``'elongation'``
none of the spatial patterns above                              ``'uniform'``
============================================================  ===================

Directions are given as the image is shown by FITS viewers: row 0 at the bottom, x (columns)
to the right and y (rows) up; angles in degrees from +x toward +y (counter-clockwise), as in
`gpudeconv.psf.gaussian`. Distances from the centre are in units of the half-diagonal, so the
corners sit at r = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from .._errors import GpudeconvError

__all__ = ["Diagnosis", "Finding", "ORIENTATION", "diagnose"]

#: How directions are named in summaries (FITS display orientation).
ORIENTATION = "x right, y up: FITS orientation, row 0 at the bottom"

#: Fewer used stars than this give no diagnosis: a 4-parameter fit with clipping needs room.
MIN_STARS = 12
#: A pattern must exceed this many standard errors to be reported.
_SIGNIFICANCE = 5.0
#: A FWHM change across the field (corner to corner, or centre to corner) below this fraction
#: of the FWHM is not worth naming: seeing alone varies that much.
_FWHM_CHANGE = 0.10
#: Ellipticity 1 - minor/major (at the corners, or everywhere for a uniform elongation) below
#: this is not worth naming: noise alone makes round stars read about 0.02 to 0.05.
_ELLIPTICITY = 0.05
#: A centre of symmetry offset by less than this fraction of the diagonal is "centred".
_OFFSET = 0.05
#: Stars must spread over the frame at least this much (standard deviation of their position
#: over the half-side; 0.58 for an even spread) for a pattern across it to mean anything.
_MIN_SPREAD = 0.2
#: Robust fits drop points beyond this many (MAD-estimated) sigmas, re-fitting this often.
_CLIP_SIGMA = 3.0
_CLIP_ROUNDS = 5

_WORDS = (
    "right",
    "upper-right",
    "top",
    "upper-left",
    "left",
    "lower-left",
    "bottom",
    "lower-right",
)


@dataclass(frozen=True)
class Finding:
    """One named pattern, with the numbers that support it.

    Attributes
    ----------
    kind : {'tilt', 'field curvature', 'coma', 'back focus', 'collimation', 'elongation', \
'uniform'}
    summary : str
        One sentence for people, with the numbers.
    evidence : dict of str to float
        The measured numbers (pixels, percent, degrees, significance in standard errors).
    """

    kind: str
    summary: str
    evidence: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "summary": self.summary,
            "evidence": _json_numbers(self.evidence),
        }


@dataclass(frozen=True)
class Diagnosis:
    """What `diagnose` found.

    Attributes
    ----------
    findings : list of Finding
        Named patterns, most important first; ``'uniform'`` when no spatial pattern stands out.
        Empty (with a ``note``) when there are too few stars to say anything.
    stars : int
        Used stars the diagnosis rests on.
    image_shape : (H, W) tuple of int
    note : str
        Why there is no diagnosis, or an empty string.
    """

    findings: list
    stars: int
    image_shape: tuple
    note: str = ""

    @property
    def kinds(self) -> list[str]:
        """The kinds of the findings, in order."""
        return [finding.kind for finding in self.findings]

    def finding(self, kind: str) -> Finding | None:
        """The finding of ``kind``, or None."""
        return next((f for f in self.findings if f.kind == kind), None)

    def as_dict(self) -> dict:
        """A JSON-ready dict: stars, image shape, orientation, findings (and a note)."""
        result = {
            "stars": int(self.stars),
            "image_shape": [int(n) for n in self.image_shape],
            "orientation": ORIENTATION,
            "findings": [f.as_dict() for f in self.findings],
        }
        if self.note:
            result["note"] = self.note
        return result

    def text(self) -> str:
        """Several lines for a terminal: a heading, then one line per finding."""
        head = f"Field diagnosis from {self.stars} stars ({ORIENTATION}):"
        if self.note:
            return f"{head}\n  {self.note}"
        return "\n".join([head, *(f"  - {f.kind}: {f.summary}" for f in self.findings)])


def diagnose(source, image_shape=None) -> Diagnosis:
    """Name the optical problems that the stars' shapes show across the field.

    Parameters
    ----------
    source : PSFEstimate or astropy.table.Table
        An estimate from `gpudeconv.psf.fit_psf` (its ``stars`` and ``image_shape`` are used),
        or a star table with columns ``x``, ``y`` (0-based pixels, x the column), ``fwhm``
        (major-axis FWHM, pixels), ``ratio`` (minor/major, <= 1) and ``angle`` (degrees of the
        major axis from +x toward +y); a boolean ``used`` column, if present, selects the stars.
    image_shape : (H, W) tuple of int, optional
        The image's shape; required with a table, taken from an estimate otherwise.

    Returns
    -------
    Diagnosis

    Notes
    -----
    With the image centre :math:`(x_c, y_c) = ((W-1)/2, (H-1)/2)` and the half-diagonal
    :math:`R = \\sqrt{x_c^2 + y_c^2}`, stars sit at :math:`u = (x - x_c)/R`,
    :math:`v = (y - y_c)/R`, :math:`r = \\sqrt{u^2 + v^2}` (1 at the corners). The FWHM is fitted
    as

    .. math:: F = a + b\\,u + c\\,v + d\\,(u^2 + v^2)

    whose vertex :math:`-(b, c) / 2d` is the centre of symmetry when :math:`d` is significant
    and the vertex lies in the frame; otherwise the plane :math:`a + b u + c v` measures tilt.
    Elongation is the spin-2 vector :math:`e\\,(\\cos 2\\theta, \\sin 2\\theta)`,
    :math:`e = 1 - \\mathrm{ratio}`, fitted as a constant plus a radial part
    :math:`A\\,r^p (\\cos 2\\varphi, \\sin 2\\varphi)` and a cross part
    :math:`B\\,r^p (-\\sin 2\\varphi, \\cos 2\\varphi)` about the centre of symmetry
    (:math:`\\varphi` the direction of the radius, :math:`p \\in \\{1, 2\\}` whichever fits
    better, the centre refined by nonlinear least squares): :math:`A > 0` is radial
    elongation, :math:`A < 0` tangential (the tangential shear of weak lensing). All fits clip
    outliers at 3 MAD-sigmas; significances are coefficients over their standard errors.
    """
    table, shape = _validate_source(source, image_shape)
    stars = _Stars.from_table(table, shape)
    note = _coverage_note(stars)
    if note:
        return Diagnosis(findings=[], stars=stars.count, image_shape=shape, note=note)
    fwhm = _analyse_fwhm(stars)
    start = fwhm.vertex if fwhm.symmetric else (0.0, 0.0)
    shape_fit = _analyse_elongation(stars, start)
    findings = [
        *_fwhm_findings(stars, fwhm),
        *_elongation_findings(stars, shape_fit),
        *_collimation_findings(stars, fwhm, shape_fit),
    ]
    findings = _merge_same_kind(findings)
    if not findings:
        findings = [_uniform_finding(stars, fwhm, shape_fit)]
    findings += _constant_elongation_findings(shape_fit)
    return Diagnosis(findings=findings, stars=stars.count, image_shape=shape)


# --- input ----------------------------------------------------------------------------------


def _validate_source(source, image_shape):
    if hasattr(source, "stars") and hasattr(source, "image_shape"):
        table = source.stars
        image_shape = source.image_shape if image_shape is None else image_shape
    else:
        table = source
    if image_shape is None:
        msg = "image_shape (H, W) is needed to diagnose a star table; pass the image's shape"
        raise GpudeconvError(msg)
    try:
        height, width = (int(n) for n in tuple(image_shape)[-2:])
    except (TypeError, ValueError):
        height = width = 0
    if height < 1 or width < 1:
        msg = f"image_shape must be (H, W), two positive integers, got {image_shape!r}"
        raise GpudeconvError(msg)
    names = getattr(table, "colnames", None)
    if names is None:
        msg = f"diagnose takes a PSF estimate or a star table, got {type(source).__name__}"
        raise GpudeconvError(msg)
    missing = [name for name in ("x", "y", "fwhm", "ratio", "angle") if name not in names]
    if missing:
        msg = (
            f"the star table lacks column(s) {', '.join(missing)}; it needs x, y, fwhm, ratio and "
            "angle (as gpudeconv.psf.fit_psf writes them)"
        )
        raise GpudeconvError(msg)
    return table, (height, width)


@dataclass(frozen=True)
class _Stars:
    """Used stars in centred, half-diagonal units, and the frame's geometry."""

    u: np.ndarray
    v: np.ndarray
    fwhm: np.ndarray
    e1: np.ndarray
    e2: np.ndarray
    ellipticity: np.ndarray
    angle: np.ndarray
    half_width: float  # x extent of the frame from the centre, in units of R
    half_height: float
    radius: float  # R, pixels
    centre: tuple  # (xc, yc), pixels

    @classmethod
    def from_table(cls, table, shape) -> _Stars:
        columns = {name: np.asarray(table[name], dtype=np.float64) for name in _COLUMNS}
        keep = np.all([np.isfinite(c) for c in columns.values()], axis=0)
        keep &= (columns["fwhm"] > 0) & (columns["ratio"] > 0)
        if "used" in table.colnames:
            keep &= np.asarray(table["used"], dtype=bool)
        height, width = shape
        xc, yc = (width - 1) / 2, (height - 1) / 2
        radius = max(math.hypot(xc, yc), 0.5)
        ellipticity = np.clip(1.0 - np.minimum(columns["ratio"][keep], 1.0), 0.0, 1.0)
        theta = np.radians(columns["angle"][keep])
        return cls(
            u=(columns["x"][keep] - xc) / radius,
            v=(columns["y"][keep] - yc) / radius,
            fwhm=columns["fwhm"][keep],
            e1=ellipticity * np.cos(2 * theta),
            e2=ellipticity * np.sin(2 * theta),
            ellipticity=ellipticity,
            angle=columns["angle"][keep],
            half_width=xc / radius,
            half_height=yc / radius,
            radius=radius,
            centre=(xc, yc),
        )

    @property
    def count(self) -> int:
        return int(self.u.size)

    def corners(self) -> np.ndarray:
        """(4, 2) corners (u, v): lower-left, lower-right, upper-left, upper-right."""
        hw, hh = self.half_width, self.half_height
        return np.array([(-hw, -hh), (hw, -hh), (-hw, hh), (hw, hh)])

    def to_pixels(self, u: float, v: float) -> tuple[float, float]:
        return self.centre[0] + u * self.radius, self.centre[1] + v * self.radius


_COLUMNS = ("x", "y", "fwhm", "ratio", "angle")


def _coverage_note(stars: _Stars) -> str:
    """Why the stars cannot describe the field (too few, or bunched up), or ''."""
    if stars.count < MIN_STARS:
        return (
            f"too few stars ({stars.count}) to diagnose the field; at least {MIN_STARS} are "
            "needed, spread over the frame"
        )
    # Stars spread evenly over the frame have a spread of 0.58 of its half-sides.
    spread_x = float(np.std(stars.u)) / max(stars.half_width, 1e-12)
    spread_y = float(np.std(stars.v)) / max(stars.half_height, 1e-12)
    if min(spread_x, spread_y) < _MIN_SPREAD:
        return (
            f"the {stars.count} stars are bunched in a small part of the frame (spread "
            f"{spread_x:.2f} across, {spread_y:.2f} up, 0.58 when even); the field cannot be "
            "diagnosed from them"
        )
    return ""


# --- robust linear least squares --------------------------------------------------------------


@dataclass(frozen=True)
class _Fit:
    coef: np.ndarray
    cov: np.ndarray
    keep: np.ndarray
    rss: float
    sigma: float

    def z(self, index) -> float:
        """Significance of coefficient(s) ``index``: |c| / se, or the Mahalanobis norm of a set."""
        index = np.atleast_1d(index)
        coef = self.coef[index]
        cov = self.cov[np.ix_(index, index)]
        try:
            chi2 = float(coef @ np.linalg.solve(cov, coef))
        except np.linalg.LinAlgError:
            return 0.0
        # A degenerate fit (stars on a line, identical values) says nothing.
        return math.sqrt(chi2) if math.isfinite(chi2) and chi2 > 0 else 0.0


def _robust_fit(design: np.ndarray, values: np.ndarray, groups: np.ndarray | None = None) -> _Fit:
    """Least squares with iterative clipping at 3 MAD-sigmas; ``groups`` clip rows together."""
    n, p = design.shape
    keep = np.ones(n, dtype=bool)
    for _ in range(_CLIP_ROUNDS):
        coef = np.linalg.lstsq(design[keep], values[keep], rcond=None)[0]
        residual = values - design @ coef
        spread = residual[keep] - np.median(residual[keep])
        sigma = 1.4826 * float(np.median(np.abs(spread)))
        if sigma <= 0:
            break
        bad = np.abs(residual) > _CLIP_SIGMA * sigma
        if groups is not None:
            bad = np.isin(groups, groups[bad])
        new_keep = ~bad
        if new_keep.sum() < p + 3 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    coef = np.linalg.lstsq(design[keep], values[keep], rcond=None)[0]
    residual = values[keep] - design[keep] @ coef
    rss = float(residual @ residual)
    dof = max(int(keep.sum()) - p, 1)
    sigma2 = rss / dof
    normal = design[keep].T @ design[keep]
    cov = sigma2 * np.linalg.pinv(normal)
    return _Fit(coef=coef, cov=cov, keep=keep, rss=rss, sigma=math.sqrt(sigma2))


# --- FWHM: plane and bowl -------------------------------------------------------------------


@dataclass(frozen=True)
class _FwhmFit:
    median: float
    bowl: _Fit  # a + b u + c v + d r^2
    plane: _Fit  # a + b u + c v
    curved: bool  # d significant and large enough
    symmetric: bool  # curved, with the vertex inside the frame
    vertex: tuple  # (u0, v0)
    vertex_cov: np.ndarray
    power: int  # 1 or 2: how the FWHM grows with the distance from the vertex
    radial: _Fit  # p + q * rho**power about the vertex (or the image centre)


def _analyse_fwhm(stars: _Stars) -> _FwhmFit:
    u, v, values = stars.u, stars.v, stars.fwhm
    median = float(np.median(values))
    ones = np.ones_like(u)
    bowl = _robust_fit(np.column_stack([ones, u, v, u**2 + v**2]), values)
    plane = _robust_fit(np.column_stack([ones, u, v]), values)
    _, b, c, d = bowl.coef
    curved = bowl.z(3) > _SIGNIFICANCE and abs(d) > _FWHM_CHANGE * median
    vertex, vertex_cov, symmetric = (0.0, 0.0), np.zeros((2, 2)), False
    if curved:
        u0, v0 = -b / (2 * d), -c / (2 * d)
        # Delta method: the vertex is a ratio of coefficients.
        jacobian = np.array([[-1 / (2 * d), 0, b / (2 * d**2)], [0, -1 / (2 * d), c / (2 * d**2)]])
        vertex_cov = jacobian @ bowl.cov[1:, 1:] @ jacobian.T
        symmetric = abs(u0) <= stars.half_width and abs(v0) <= stars.half_height
        if symmetric:
            vertex = (float(u0), float(v0))
    rho = np.hypot(u - vertex[0], v - vertex[1])
    fits = {p: _robust_fit(np.column_stack([ones, rho**p]), values) for p in (1, 2)}
    power = min(fits, key=lambda p: _common_rss(fits[p], fits[3 - p], values, rho, p))
    return _FwhmFit(
        median=median,
        bowl=bowl,
        plane=plane,
        curved=curved,
        symmetric=symmetric,
        vertex=vertex,
        vertex_cov=vertex_cov,
        power=power,
        radial=fits[power],
    )


def _common_rss(fit: _Fit, other: _Fit, values, rho, power) -> float:
    """Residual sum of squares of ``fit`` over the points that both fits kept."""
    keep = fit.keep & other.keep
    model = fit.coef[0] + fit.coef[1] * rho**power
    return float(np.sum((values[keep] - model[keep]) ** 2))


def _fwhm_findings(stars: _Stars, fit: _FwhmFit) -> list[Finding]:
    findings = []
    if fit.curved:
        findings.append(_curvature_finding(stars, fit))
    if not fit.symmetric:
        tilt = _tilt_finding(stars, fit)
        if tilt is not None:
            findings.insert(0, tilt)
    return findings


def _tilt_finding(stars: _Stars, fit: _FwhmFit) -> Finding | None:
    # With significant curvature the gradient at the centre comes from the bowl's linear terms;
    # otherwise from the plane alone (fewer parameters, smaller errors).
    source = fit.bowl if fit.curved else fit.plane
    a, b, c = source.coef[:3]
    z = source.z([1, 2])
    hw, hh = stars.half_width, stars.half_height
    change = 2 * (abs(b) * hw + abs(c) * hh)
    if z <= _SIGNIFICANCE or change <= _FWHM_CHANGE * fit.median:
        return None
    high = (math.copysign(hw, b), math.copysign(hh, c))
    low_value = a - abs(b) * hw - abs(c) * hh
    high_value = a + abs(b) * hw + abs(c) * hh
    if fit.curved:  # the bowl adds the same d * r^2 to every corner
        low_value += fit.bowl.coef[3]
        high_value += fit.bowl.coef[3]
    direction = _degrees(c, b)
    words = _direction_words(direction)
    corner_from, corner_to = _corner_words(-high[0], -high[1]), _corner_words(*high)
    percent = 100 * change / fit.median
    per_kpx = 1000 * math.hypot(b, c) / stars.radius
    summary = (
        f"FWHM changes linearly across the frame, from {low_value:.2f} px at the {corner_from} "
        f"corner to {high_value:.2f} px at the {corner_to} ({change:.2f} px, {percent:.0f}% of "
        f"the median {fit.median:.2f} px; gradient {per_kpx:.2f} px per 1000 px toward "
        f"{direction:.0f} deg): the sensor is probably tilted, stars worse toward the {words} "
        f"({_sigmas(z)})"
    )
    evidence = {
        "fwhm_centre_px": a,
        "fwhm_low_corner_px": low_value,
        "fwhm_high_corner_px": high_value,
        "change_px": change,
        "change_percent": percent,
        "direction_deg": direction,
        "gradient_px_per_1000px": per_kpx,
        "significance_sigma": z,
    }
    return Finding("tilt", summary, evidence)


def _curvature_finding(stars: _Stars, fit: _FwhmFit) -> Finding:
    if fit.symmetric:
        p, q = fit.radial.coef
        power = fit.power
        corners = stars.corners()
        distance = np.hypot(corners[:, 0] - fit.vertex[0], corners[:, 1] - fit.vertex[1])
        corner_value = float(np.mean(p + q * distance**power))
    else:
        # The bowl's vertex is off the frame (a tilt goes with it): its curvature alone, which
        # adds d at every corner (r = 1) whatever the linear terms.
        p, power = float(fit.bowl.coef[0]), 2
        corner_value = p + float(fit.bowl.coef[3])
    change = corner_value - p
    percent = 100 * change / p
    z = fit.bowl.z(3)
    law = "r" if power == 1 else "r^2"
    where = "its centre of symmetry" if fit.symmetric else "the centre"
    if change >= 0:
        trend = f"grows from {p:.2f} px at {where} to {corner_value:.2f} px in the corners"
    else:
        trend = f"falls from {p:.2f} px at {where} to {corner_value:.2f} px in the corners"
    if power == 1 and change > 0:
        kind = "coma"
        cause = "off-axis blur growing linearly with the distance, as coma does"
    else:
        kind = "field curvature"
        cause = (
            "the centre and the edges focus at different distances (field curvature, or a "
            "flattener at the wrong back focus)"
        )
    summary = f"FWHM {trend} ({percent:+.0f}%, growing as {law}): {cause} ({_sigmas(z)})"
    evidence = {
        "fwhm_centre_px": p,
        "fwhm_corner_px": corner_value,
        "fwhm_change_px": change,
        "fwhm_change_percent": percent,
        "fwhm_power": power,
        "fwhm_significance_sigma": z,
    }
    return Finding(kind, summary, evidence)


# --- elongation: radial and tangential patterns --------------------------------------------------


@dataclass(frozen=True)
class _ShapeFit:
    fit: _Fit  # coefficients: C1, C2, A (radial), B (cross)
    power: int
    centre: tuple  # (u_c, v_c) of the pattern
    centre_cov: np.ndarray | None  # None when the centre was not refined
    significant: bool


def _shape_design(stars: _Stars, centre, power: int) -> tuple[np.ndarray, np.ndarray]:
    du, dv = stars.u - centre[0], stars.v - centre[1]
    phi2 = 2 * np.arctan2(dv, du)
    growth = np.hypot(du, dv) ** power
    n = stars.count
    zeros, ones = np.zeros(n), np.ones(n)
    rows_e1 = np.column_stack([ones, zeros, growth * np.cos(phi2), -growth * np.sin(phi2)])
    rows_e2 = np.column_stack([zeros, ones, growth * np.sin(phi2), growth * np.cos(phi2)])
    return np.vstack([rows_e1, rows_e2]), np.concatenate([stars.e1, stars.e2])


def _fit_shape(stars: _Stars, centre, power: int) -> _Fit:
    design, values = _shape_design(stars, centre, power)
    groups = np.tile(np.arange(stars.count), 2)
    return _robust_fit(design, values, groups)


def _analyse_elongation(stars: _Stars, start) -> _ShapeFit:
    fits = {p: _fit_shape(stars, start, p) for p in (1, 2)}
    power = _better_power(stars, start, fits)
    fit = fits[power]
    significant = fit.z(2) > _SIGNIFICANCE and abs(fit.coef[2]) > _ELLIPTICITY
    if not significant:
        return _ShapeFit(fit, power, tuple(start), None, False)
    centre, centre_cov = _refine_centre(stars, start, power, fit.keep)
    fits = {p: _fit_shape(stars, centre, p) for p in (1, 2)}
    power = _better_power(stars, centre, fits)
    fit = fits[power]
    significant = fit.z(2) > _SIGNIFICANCE and abs(fit.coef[2]) > _ELLIPTICITY
    return _ShapeFit(fit, power, centre, centre_cov, significant)


def _better_power(stars: _Stars, centre, fits: dict) -> int:
    keep = fits[1].keep & fits[2].keep
    rss = {}
    for p, fit in fits.items():
        design, values = _shape_design(stars, centre, p)
        residual = (values - design @ fit.coef)[keep]
        rss[p] = float(residual @ residual)
    return min(rss, key=rss.get)


def _refine_centre(stars: _Stars, start, power: int, keep: np.ndarray):
    """The point the elongation pattern radiates from: variable projection over (u_c, v_c)."""

    def residuals(centre):
        design, values = _shape_design(stars, centre, power)
        design, values = design[keep], values[keep]
        coef = np.linalg.lstsq(design, values, rcond=None)[0]
        return values - design @ coef

    limit = np.array([stars.half_width, stars.half_height]) * 1.5
    x0 = np.clip(np.asarray(start, dtype=np.float64), -limit * 0.99, limit * 0.99)
    result = optimize.least_squares(residuals, x0, bounds=(-limit, limit), x_scale=0.1)
    dof = max(int(keep.sum()) - 6, 1)
    sigma2 = float(result.fun @ result.fun) / dof
    try:
        cov = sigma2 * np.linalg.inv(result.jac.T @ result.jac)
    except np.linalg.LinAlgError:
        cov = np.full((2, 2), np.inf)
    return (float(result.x[0]), float(result.x[1])), cov


def _elongation_findings(stars: _Stars, shape: _ShapeFit) -> list[Finding]:
    if not shape.significant:
        return []
    _, _, radial, cross = shape.fit.coef
    z = shape.fit.z(2)
    corner_e = _corner_ellipticity(stars, shape)
    law = "r" if shape.power == 1 else "r^2"
    mean_angle = _mean_angle_to_radius(stars, shape.centre)
    if radial > 0:
        orientation = "radially (major axes point to the centre)"
        if shape.power == 1:
            kind = "coma"
            cause = "coma-like: an off-axis aberration, or a corrector at the wrong back focus"
        else:
            kind = "back focus"
            cause = (
                "typical of a flattener or reducer at the wrong back focus (off-axis astigmatism)"
            )
    else:
        orientation = "tangentially (major axes perpendicular to the radius)"
        kind = "field curvature"
        cause = (
            "typical of field curvature (no flattener, or one at the wrong back focus), "
            "or off-axis astigmatism"
        )
    summary = (
        f"stars are elongated {orientation}, growing as {law} to 1 - minor/major = "
        f"{corner_e:.2f} in the corners (axis ratio {1 - corner_e:.2f}; major axes "
        f"{mean_angle:.0f} deg from the radius on average): {cause} ({_sigmas(z)})"
    )
    evidence = {
        "elongation_corner": corner_e,
        "ratio_corner": 1 - corner_e,
        "elongation_power": shape.power,
        "radial_slope": radial,
        "cross_slope": cross,
        "angle_to_radius_deg": mean_angle,
        "elongation_significance_sigma": z,
    }
    return [Finding(kind, summary, evidence)]


def _corner_ellipticity(stars: _Stars, shape: _ShapeFit) -> float:
    """Mean |radial part| of the elongation model at the four corners."""
    corners = stars.corners()
    distance = np.hypot(corners[:, 0] - shape.centre[0], corners[:, 1] - shape.centre[1])
    return float(np.mean(np.abs(shape.fit.coef[2]) * distance**shape.power))


def _mean_angle_to_radius(stars: _Stars, centre) -> float:
    """Ellipticity-weighted mean |major axis - radius direction| (deg), outer stars only."""
    du, dv = stars.u - centre[0], stars.v - centre[1]
    rho = np.hypot(du, dv)
    phi = np.degrees(np.arctan2(dv, du))
    delta = np.abs((stars.angle - phi + 90) % 180 - 90)
    outer = (rho > 0.3 * max(rho.max(), 1e-9)) & (stars.ellipticity > 0)
    if not outer.any():
        return float("nan")
    weights = stars.ellipticity[outer]
    return float(np.sum(weights * delta[outer]) / np.sum(weights))


# --- collimation: the centre of symmetry -------------------------------------------------------


def _collimation_findings(stars: _Stars, fwhm: _FwhmFit, shape: _ShapeFit) -> list[Finding]:
    estimates = []  # (name, centre, covariance)
    if fwhm.symmetric:
        estimates.append(("fwhm", np.array(fwhm.vertex), fwhm.vertex_cov))
    if shape.significant and shape.centre_cov is not None:
        centre = np.array(shape.centre)
        inside = abs(centre[0]) <= stars.half_width and abs(centre[1]) <= stars.half_height
        if inside and np.all(np.isfinite(shape.centre_cov)):
            estimates.append(("elongation", centre, shape.centre_cov))
    if not estimates:
        return []
    # Inverse-covariance mean of the estimates.
    precisions = [np.linalg.pinv(cov) for _, _, cov in estimates]
    total = np.sum(precisions, axis=0)
    cov = np.linalg.pinv(total)
    centre = cov @ np.sum([p @ c for p, (_, c, _) in zip(precisions, estimates, strict=True)], 0)
    offset = float(np.hypot(*centre))
    try:
        chi2 = float(centre @ np.linalg.solve(cov, centre))
    except np.linalg.LinAlgError:
        chi2 = 0.0
    z = math.sqrt(chi2) if math.isfinite(chi2) and chi2 > 0 else 0.0
    # The diagonal is 2 R, so the offset over the diagonal is offset / 2 in units of R.
    fraction = offset / 2
    if z <= 3.0 or fraction <= _OFFSET:
        return []
    x, y = stars.to_pixels(*centre)
    direction = _degrees(centre[1], centre[0])
    offset_px = offset * stars.radius
    sources = " and ".join(
        {"fwhm": "the FWHM pattern", "elongation": "the elongation pattern"}[name]
        for name, _, _ in estimates
    )
    summary = (
        f"the centre of symmetry of {sources} sits at x = {x:.0f}, y = {y:.0f}, "
        f"{offset_px:.0f} px ({100 * fraction:.0f}% of the diagonal) toward the "
        f"{_direction_words(direction)} of the image centre: the optical axis is off the "
        f"sensor centre (miscollimation, or a tilt combined with field curvature) ({_sigmas(z)})"
    )
    evidence = {
        "centre_x": x,
        "centre_y": y,
        "offset_px": offset_px,
        "offset_percent_diagonal": 100 * fraction,
        "direction_deg": direction,
        "significance_sigma": z,
    }
    for name, estimate, _ in estimates:
        ex, ey = stars.to_pixels(*estimate)
        evidence[f"{name}_centre_x"] = ex
        evidence[f"{name}_centre_y"] = ey
    return [Finding("collimation", summary, evidence)]


# --- elongation the same everywhere, and nothing at all -------------------------------------------


def _constant_elongation_findings(shape: _ShapeFit) -> list[Finding]:
    c1, c2 = shape.fit.coef[:2]
    amount = math.hypot(c1, c2)
    z = shape.fit.z([0, 1])
    if z <= _SIGNIFICANCE or amount <= _ELLIPTICITY:
        return []
    angle = math.degrees(math.atan2(c2, c1)) / 2 % 180
    summary = (
        f"stars are elongated the same way across the field: axis ratio {1 - amount:.2f} "
        f"(1 - minor/major = {amount:.2f}), major axes at {angle:.0f} deg: tracking or "
        f"guiding error, wind or flexure (on-axis astigmatism if it stays in every frame) "
        f"({_sigmas(z)})"
    )
    evidence = {
        "elongation": amount,
        "ratio": 1 - amount,
        "angle_deg": angle,
        "significance_sigma": z,
    }
    return [Finding("elongation", summary, evidence)]


def _uniform_finding(stars: _Stars, fwhm: _FwhmFit, shape: _ShapeFit) -> Finding:
    # The fitted plane's largest departure from its centre value over the frame (not the
    # star-to-star scatter, which is mostly measurement noise; nor the bowl's, whose curvature
    # term is poorly constrained when it is not significant).
    a, b, c = fwhm.plane.coef
    variation = 100 * (abs(b) * stars.half_width + abs(c) * stars.half_height) / abs(a)
    corner_e = _corner_ellipticity(stars, shape)
    scatter = 100 * 1.4826 * float(np.median(np.abs(stars.fwhm - fwhm.median))) / fwhm.median
    summary = (
        f"the PSF is uniform across the field: FWHM {fwhm.median:.2f} px within "
        f"{variation:.0f}% (star-to-star scatter {scatter:.0f}%), elongation pattern "
        f"{corner_e:.2f} at most (1 - minor/major); no tilt, curvature, coma or off-centre "
        "pattern stands out"
    )
    evidence = {
        "fwhm_median_px": fwhm.median,
        "fwhm_variation_percent": variation,
        "fwhm_scatter_percent": scatter,
        "elongation_pattern": corner_e,
    }
    return Finding("uniform", summary, evidence)


# --- helpers --------------------------------------------------------------------------------


def _merge_same_kind(findings: list[Finding]) -> list[Finding]:
    """One finding per kind: summaries joined, evidence merged (the keys differ by design)."""
    merged: dict[str, Finding] = {}
    for finding in findings:
        first = merged.get(finding.kind)
        if first is None:
            merged[finding.kind] = finding
        else:
            merged[finding.kind] = Finding(
                finding.kind,
                f"{first.summary}; {finding.summary}",
                {**first.evidence, **finding.evidence},
            )
    return list(merged.values())


def _sigmas(z: float) -> str:
    """A significance for people: noise-free data make it astronomically large."""
    return f"{z:.0f} sigma" if z < 100 else "over 100 sigma"


def _degrees(y: float, x: float) -> float:
    """The direction of (x, y) in degrees from +x toward +y, in [0, 360) once rounded."""
    degrees = math.degrees(math.atan2(y, x)) % 360
    return 0.0 if degrees >= 359.5 else degrees


def _direction_words(degrees: float) -> str:
    """'right', 'upper-right', 'top', ... for an angle from +x toward +y (y up)."""
    return _WORDS[int(((degrees % 360) + 22.5) // 45) % 8]


def _corner_words(u: float, v: float) -> str:
    return f"{'upper' if v > 0 else 'lower'}-{'right' if u > 0 else 'left'}"


def _json_numbers(evidence: dict) -> dict:
    """Plain Python numbers, non-finite ones as None (JSON has no NaN)."""
    out = {}
    for key, value in evidence.items():
        if isinstance(value, (bool, np.bool_)):
            out[key] = bool(value)
        elif isinstance(value, (int, np.integer)):
            out[key] = int(value)
        else:
            number = float(value)
            out[key] = number if math.isfinite(number) else None
    return out
