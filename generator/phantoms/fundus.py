"""Colour fundus photograph phantom: posterior pole of one eye, 45-degree field.

Anatomy model. A circular field of view (radius 0.46 of the image width, black outside) spans
about 12.2-13.8 mm of retina, so the image width is ~14 mm and the optic disc (vertical diameter
1.7-2.0 mm, slightly vertically oval) is about 1/8 of the image. All geometry is built in a
retinal millimetre frame centred on the fovea (+x nasal, +y superior): the disc centre lies
4.3-4.9 mm nasal to and 0.2-0.7 mm above the fovea; the view is macula-centred or shifted
towards a disc-and-macula view per study. The fundus albedo is orange-red (varying with
pigmentation), with ridged-noise choroidal (tigroid) texture, RPE mottling, a darker macula and
fovea with a small foveal reflex, a yellow-pink disc with a paler temporally decentred cup
(vertical cup-to-disc ratio 0.2-0.45 in normals), and arteries (thinner, lighter) and veins
(wider, darker) leaving the disc as four arcades that taper and branch, the temporal arcades
arching around the macula and their branches stopping short of the foveal avascular zone.
Vignetting, uneven illumination and per-channel camera noise are applied last. Thin
structures are drawn at 4x supersampling and downsampled with area interpolation.

Conventions. Images are shown as the fundus camera records them: superior retina at the top.
The eye is drawn from the study's rng; ``Rendered.measurements["eye_is_right"]`` is 1.0 for a
right eye (OD), whose disc lies on the viewer's RIGHT, and 0.0 for a left eye (OS), disc on the
viewer's left. Temporal is therefore the viewer's left for a right eye and the viewer's right for
a left eye. Quadrants are fovea-centred (the vertical meridian through the fovea divides nasal
from temporal retina, the horizontal raphe superior from inferior) and exclude the macula,
which is the disc of radius 2.75 mm around the fovea; "disc" is the optic nerve head. Findings
carry no ``side``: one photograph shows one eye.

Findings (severity by count and size, all measured from what was drawn: count, area_mm2, ...):
microaneurysms (sharp dark-red dots), retinal haemorrhages (deep dot and blot plus superficial
flame-shaped ones along the nerve fibres; at least one of each type), hard exudates (sharp
yellow flecks, clustered or in a circinate ring; always a ring at the macula), cotton wool
spots (fluffy white, beside the arcade vessels), neovascularisation (cartwheel fronds at the
disc or on a major vein; extent in disc areas), drusen (yellow deposits at the macula; AREDS
sizes: small < 63 um, medium 63-125 um, large > 125 um; small ones are drawn at a 70 um visible
minimum), enlarged_cup (vertical cup-to-disc ratio 0.62-0.9, vertically elongated cup) and
papilloedema (swollen, striated disc tissue hiding the cup and the vessels at the margin;
peripapillary flame haemorrhages when severe). Deep lesions are drawn beneath the retinal
vessels, nerve fibre layer lesions over them.

Randomness. The study rng seeds independent streams for the anatomy, the camera noise and each
finding, so adding a finding never moves the anatomy, the noise or another finding.

Study-level measurements: eye_is_right, cup_to_disc_ratio (vertical, as drawn; with
papilloedema the cup is partly or wholly hidden by the swollen tissue), disc_diameter_mm,
disc_to_fovea_mm, field_of_view_mm, pixel_size_um, and the centres of the fovea and the disc
in normalised image coordinates (fovea_x, fovea_y, disc_x, disc_y; x to the viewer's right,
y down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import UserError
from .base import Finding, FindingSpec, PhantomSpec, Rendered, bbox_of

SUPERSAMPLE = 4
SHIFT = 4  # cv2 sub-pixel bits: coordinates are passed multiplied by 16
FOV_RADIUS = 0.46  # field-of-view circle radius as a fraction of the image width
MACULA_RADIUS_MM = 2.75
QUADRANTS = ("superotemporal", "inferotemporal", "superonasal", "inferonasal")
SEVERITIES = ("mild", "moderate", "severe")

# blend colours (albedo, before illumination) of the vessels and lesions
VEIN = (0.46, 0.07, 0.06)
ARTERY = (0.80, 0.27, 0.14)
MA_RED = (0.42, 0.05, 0.04)
BLOT_RED = (0.45, 0.06, 0.04)
FLAME_RED = (0.58, 0.09, 0.06)
EXUDATE_YELLOW = (1.0, 0.92, 0.45)
CWS_WHITE = (0.96, 0.93, 0.86)
DRUSEN_YELLOW = (0.97, 0.82, 0.50)
NV_RED = (0.66, 0.10, 0.08)
SWOLLEN_DISC = (0.95, 0.72, 0.58)


@dataclass
class _Eye:
    """Study geometry: the retinal mm frame (origin fovea, +x nasal, +y superior) and the disc."""

    size: int
    is_right: bool
    image_mm: float  # retinal width of the whole image
    fovea_uv: tuple[float, float]
    disc: tuple[float, float]  # disc centre, mm
    disc_a: float  # horizontal disc radius, mm
    disc_b: float  # vertical disc radius, mm
    cdr: float  # vertical cup-to-disc ratio
    cup_aspect: float  # horizontal / vertical cup radius
    fov_centre: tuple[float, float] = (0.0, 0.0)  # image centre in the mm frame

    @property
    def nasal(self) -> float:
        return 1.0 if self.is_right else -1.0

    @property
    def px_per_mm(self) -> float:
        return self.size / self.image_mm

    def to_uv(self, pts: np.ndarray) -> np.ndarray:
        pts = np.asarray(pts, dtype=np.float64)
        u = self.fovea_uv[0] + self.nasal * pts[..., 0] / self.image_mm
        v = self.fovea_uv[1] - pts[..., 1] / self.image_mm
        return np.stack([u, v], axis=-1)

    def to_mm(self, uv: np.ndarray) -> np.ndarray:
        uv = np.asarray(uv, dtype=np.float64)
        x = (uv[..., 0] - self.fovea_uv[0]) * self.image_mm * self.nasal
        y = (self.fovea_uv[1] - uv[..., 1]) * self.image_mm
        return np.stack([x, y], axis=-1)

    def to_ss(self, pts: np.ndarray) -> np.ndarray:
        """Supersampled-canvas pixel coordinates (pixel centres at integers)."""
        return self.to_uv(pts) * (self.size * SUPERSAMPLE) - 0.5

    def in_fov(self, pts: np.ndarray, margin_mm: float = 0.0) -> np.ndarray:
        uv = self.to_uv(pts)
        return np.hypot(uv[..., 0] - 0.5, uv[..., 1] - 0.5) < FOV_RADIUS - margin_mm / self.image_mm

    def disc_distance(self, pts: np.ndarray) -> np.ndarray:
        """Elliptical distance from the disc centre in disc radii."""
        pts = np.asarray(pts, dtype=np.float64)
        return np.hypot((pts[..., 0] - self.disc[0]) / self.disc_a, (pts[..., 1] - self.disc[1]) / self.disc_b)


@dataclass
class _Vessel:
    points: np.ndarray  # (M, 2) mm
    widths: np.ndarray  # (M,) mm
    kind: str  # "artery" or "vein"
    main: bool  # one of the eight arcade trunks (not a branch)


@dataclass
class _Scene:
    """What painters may need besides the eye: the vessel tree and the mm coordinates of each pixel."""

    vessels: list[_Vessel]
    X: np.ndarray
    Y: np.ndarray


# --------------------------------------------------------------------------- helpers


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _fix(v: float) -> int:
    return int(round(v * (1 << SHIFT)))


def _canvas(eye: _Eye) -> np.ndarray:
    s = eye.size * SUPERSAMPLE
    return np.zeros((s, s), np.uint8)


def _coverage(canvas: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _area_mm2(canvas: np.ndarray, eye: _Eye) -> float:
    return float(np.count_nonzero(canvas > 127)) / (eye.px_per_mm * SUPERSAMPLE) ** 2


def _ellipse(canvas: np.ndarray, eye: _Eye, centre_mm, half_len_mm: float, half_wid_mm: float,
             direction_mm=(1.0, 0.0), value: int = 255) -> None:
    """Filled ellipse whose long axis follows ``direction_mm`` (a retinal direction)."""
    c = eye.to_ss(np.asarray(centre_mm))
    scale = eye.px_per_mm * SUPERSAMPLE
    angle = math.degrees(math.atan2(-direction_mm[1], eye.nasal * direction_mm[0]))  # image y points down
    axes = (max(1, _fix(half_len_mm * scale)), max(1, _fix(half_wid_mm * scale)))
    cv2.ellipse(canvas, (_fix(c[0]), _fix(c[1])), axes, angle, 0, 360, value, -1, cv2.LINE_AA, SHIFT)


def _blend(albedo: np.ndarray, alpha: np.ndarray, colour) -> None:
    a = alpha[..., None]
    albedo *= 1.0 - a
    albedo += a * np.asarray(colour, np.float32)


def _smooth_noise(rng: np.random.Generator, cells: int, size: int, blur: float) -> np.ndarray:
    """Zero-mean, unit-std noise field with features of ~``blur`` cells, resized to ``size``."""
    n = rng.standard_normal((cells, cells)).astype(np.float32)
    n = cv2.GaussianBlur(n, (0, 0), blur, borderType=cv2.BORDER_REFLECT)
    n = (n - n.mean()) / (n.std() + 1e-6)
    return cv2.resize(n, (size, size), interpolation=cv2.INTER_CUBIC)


def _catmull_rom(ctrl: np.ndarray, step_mm: float = 0.1) -> np.ndarray:
    """Dense points of a Catmull-Rom spline through the control points, ~``step_mm`` apart."""
    p = np.vstack([2 * ctrl[0] - ctrl[1], ctrl, 2 * ctrl[-1] - ctrl[-2]])
    n = np.maximum(2, np.ceil(np.hypot(*(p[2:-1] - p[1:-2]).T) / step_mm).astype(int))
    seg = np.repeat(np.arange(len(n)), n)
    t = ((np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) / n[seg])[:, None]
    p0, p1, p2, p3 = p[:-3][seg], p[1:-2][seg], p[2:-1][seg], p[3:][seg]
    pts = 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3)
    return np.vstack([pts, ctrl[-1:]])


def _nfl_direction(eye: _Eye, p) -> tuple[float, float]:
    """Nerve fibre direction at a point, approximated as radial from the disc."""
    dx, dy = p[0] - eye.disc[0], p[1] - eye.disc[1]
    n = math.hypot(dx, dy) + 1e-9
    return dx / n, dy / n


def _in_location(eye: _Eye, pts: np.ndarray, location: str, inset: float = 0.0) -> np.ndarray:
    x, y = pts[..., 0], pts[..., 1]
    r = np.hypot(x, y)
    ok = eye.in_fov(pts, 0.35 + inset) & (eye.disc_distance(pts) > 1.3)
    if location == "macular":
        return ok & (r < MACULA_RADIUS_MM - inset)
    sx = -1.0 if "temporal" in location else 1.0
    sy = 1.0 if location.startswith("supero") else -1.0
    return ok & (x * sx > inset) & (y * sy > inset) & (r > MACULA_RADIUS_MM + inset)


def _sample_points(eye: _Eye, location: str, n: int, rng: np.random.Generator, inset: float = 0.0,
                   min_r: float = 0.0) -> np.ndarray:
    """``n`` uniform points of a location (rejection sampling within the field of view)."""
    found: list[np.ndarray] = []
    have = 0
    for _ in range(60):
        ang = rng.uniform(0, 2 * math.pi, 256)
        rad = FOV_RADIUS * np.sqrt(rng.uniform(0, 1, 256))
        pts = eye.to_mm(np.stack([0.5 + rad * np.cos(ang), 0.5 + rad * np.sin(ang)], -1))
        pts = pts[_in_location(eye, pts, location, inset) & (np.hypot(pts[:, 0], pts[:, 1]) > min_r)]
        found.append(pts)
        have += len(pts)
        if have >= n:
            break
    pts = np.vstack(found)
    if len(pts) == 0:  # degenerate geometry: fall back to the macula edge
        pts = np.array([[0.0, 1.5]])
    return pts[np.arange(n) % len(pts)]


# --------------------------------------------------------------------------- anatomy


def _sample_eye(size: int, rng: np.random.Generator) -> _Eye:
    is_right = bool(rng.random() < 0.5)
    disc = (rng.uniform(4.3, 4.9), rng.uniform(0.2, 0.7))
    disc_b = rng.uniform(0.85, 1.0)
    disc_a = disc_b / rng.uniform(1.04, 1.12)
    image_mm = rng.uniform(12.2, 13.8) / (2 * FOV_RADIUS)
    t = rng.uniform(0.0, 0.45)  # 0: macula-centred; 0.5 would be centred between disc and fovea
    nasal = 1.0 if is_right else -1.0
    fu = 0.5 - nasal * t * disc[0] / image_mm + rng.normal(0, 0.01)
    fv = 0.5 + t * disc[1] / image_mm + rng.normal(0, 0.01)
    eye = _Eye(size, is_right, image_mm, (fu, fv), disc, disc_a, disc_b,
               cdr=rng.uniform(0.2, 0.45), cup_aspect=rng.uniform(0.95, 1.1))
    eye.fov_centre = tuple(eye.to_mm(np.array([0.5, 0.5])))
    return eye


def _grow(eye: _Eye, start, heading: float, w0: float, length: float, rng: np.random.Generator,
          to_fovea: bool, kind: str) -> _Vessel:
    """A branch as a random walk of the heading, optionally drawn towards the fovea."""
    step = 0.1
    n = max(3, int(length / step))
    turns = rng.normal(0.0, 0.09, n)
    stop_r = rng.uniform(0.55, 0.9)  # vessels end at the edge of the foveal avascular zone
    x, y = float(start[0]), float(start[1])
    pts = [(x, y)]
    half_fov = FOV_RADIUS * eye.image_mm + 0.6
    cx, cy = eye.fov_centre
    for k in range(n):
        if to_fovea:
            want = math.atan2(-y, -x)
            heading += 0.07 * ((want - heading + math.pi) % (2 * math.pi) - math.pi)
        heading += turns[k]
        x, y = x + step * math.cos(heading), y + step * math.sin(heading)
        if math.hypot(x, y) < stop_r or math.hypot(x - cx, y - cy) > half_fov:
            break
        pts.append((x, y))
    p = np.array(pts)
    return _Vessel(p, np.linspace(w0, max(0.022, w0 * 0.4), len(p)), kind, False)


def _branches(eye: _Eye, parent: _Vessel, count: int, rng: np.random.Generator, depth: int) -> list[_Vessel]:
    out: list[_Vessel] = []
    m = len(parent.points)
    if m < 8:
        return out
    for s in np.sort(rng.uniform(0.15, 0.9, count)):
        i = int(np.clip(s * m, 2, m - 3))
        p = parent.points[i]
        if math.hypot((p[0] - eye.disc[0]) / eye.disc_a, (p[1] - eye.disc[1]) / eye.disc_b) < 1.4:
            continue
        tx, ty = parent.points[i + 2] - parent.points[i - 2]
        tangent = math.atan2(ty, tx)
        heading = tangent + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.1)
        inward = math.cos(heading) * -p[0] + math.sin(heading) * -p[1] > 0 and math.hypot(*p) < 6.0
        length = rng.uniform(1.5, 3.5) if depth == 0 else rng.uniform(0.8, 2.0)
        w0 = parent.widths[i] * rng.uniform(0.5, 0.72)
        child = _grow(eye, p, heading, w0, length, rng, inward, parent.kind)
        out.append(child)
        if depth == 0 and w0 > 0.05:
            out += _branches(eye, child, int(rng.integers(0, 3)), rng, depth + 1)
    return out


def _vessel_tree(eye: _Eye, rng: np.random.Generator) -> list[_Vessel]:
    dx, dy = eye.disc
    vessels: list[_Vessel] = []
    for sgn in (1.0, -1.0):
        arcade_h = rng.uniform(3.2, 4.1)
        for kind, w0, dh, off in (("vein", rng.uniform(0.13, 0.15), rng.uniform(-0.2, 0.4), -0.06),
                                  ("artery", rng.uniform(0.095, 0.11), rng.uniform(-0.4, 0.2), 0.08)):
            # temporal arcade: a quarter ellipse from the disc up (or down) to its apex near the
            # fovea's meridian, then a slow descent towards the horizontal raphe
            h, apex = arcade_h + dh, rng.uniform(-0.5, 0.8)
            t = np.array([0.25, 0.55, 0.8, 1.0]) * (math.pi / 2)
            rise = np.stack([apex + (dx - apex) * np.cos(t), dy + (sgn * h - dy) * np.sin(t)], -1)
            temporal = np.vstack([[(dx + off, dy + sgn * 0.05)], rise,
                                  [(-2.8, sgn * h * 0.92), (-5.2, sgn * h * 0.75), (-7.6, sgn * h * 0.55)]])
            temporal[1:] += rng.normal(0, 0.12, (7, 2))
            nasal = np.array([
                (dx + off + 0.05, dy + sgn * 0.05), (dx + 0.35, dy + sgn * 0.9), (dx + 1.2, dy + sgn * 2.3),
                (dx + 2.2, dy + sgn * 3.7), (dx + 3.3, dy + sgn * 5.3)])
            nasal[2:] += rng.normal(0, 0.25, (3, 2))
            for ctrl, w in ((temporal, w0), (nasal, w0 * 0.85)):
                pts = _catmull_rom(ctrl)
                s = np.r_[0, np.cumsum(np.hypot(*np.diff(pts, axis=0).T))]
                vessel = _Vessel(pts, w * (1.0 - 0.55 * s / s[-1]), kind, True)
                vessels.append(vessel)
                vessels += _branches(eye, vessel, int(rng.integers(4, 7)), rng, 0)
    # small papillomacular and nasal-horizontal vessels leaving the disc margin
    for _ in range(int(rng.integers(2, 4))):
        start = (dx - eye.disc_a * 0.8, dy + rng.uniform(-0.5, 0.5))
        heading = math.atan2(-start[1], -start[0]) + rng.normal(0, 0.2)
        vessels.append(_grow(eye, start, heading, rng.uniform(0.035, 0.05), rng.uniform(2.0, 3.5), rng, True,
                             str(rng.choice(["artery", "vein"]))))
    for _ in range(int(rng.integers(1, 3))):
        start = (dx + eye.disc_a * 0.8, dy + rng.uniform(-0.4, 0.4))
        vessels.append(_grow(eye, start, rng.normal(0, 0.3), rng.uniform(0.04, 0.06), rng.uniform(2.0, 4.0), rng,
                             False, str(rng.choice(["artery", "vein"]))))
    return vessels


def _draw_vessels(eye: _Eye, vessels: list[_Vessel], kind: str) -> np.ndarray:
    """Vessel coverage on the supersampled canvas; sub-pixel widths are drawn fainter."""
    canvas = _canvas(eye)
    scale = eye.px_per_mm * SUPERSAMPLE
    segs, widths = [], []
    for v in vessels:
        if v.kind != kind or len(v.points) < 2:
            continue
        p = np.round(eye.to_ss(v.points) * (1 << SHIFT)).astype(np.int32)
        segs.append(np.stack([p[:-1], p[1:]], axis=1))
        widths.append(0.5 * (v.widths[:-1] + v.widths[1:]) * scale)
    segs_all, w_all = np.concatenate(segs), np.concatenate(widths)
    thick = np.maximum(1, np.round(w_all)).astype(np.int32)
    level = np.clip(np.round(w_all / thick * 4), 1, 4).astype(np.int32)  # quarters of full intensity
    key = thick * 16 + level
    for k in np.unique(key):  # ascending: thick, opaque vessels are drawn last and stay continuous
        sel = segs_all[key == k]
        cv2.polylines(canvas, list(sel), False, int(255 * (k % 16) / 4), int(k // 16), cv2.LINE_AA, SHIFT)
    return canvas


def _cup_distance(eye: _Eye, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Elliptical distance from the cup centre in cup radii (vertical radius = cdr * disc radius)."""
    cup_b = eye.cdr * eye.disc_b
    cup_a = min(cup_b * eye.cup_aspect, 0.92 * eye.disc_a)
    return np.hypot((X - eye.disc[0] + 0.12 * eye.disc_a) / cup_a, (Y - eye.disc[1]) / cup_b)


def _base_albedo(eye: _Eye, X: np.ndarray, Y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fundus albedo without vessels: choroid, macula, disc and cup."""
    n = eye.size
    pigment = rng.uniform(0, 1)
    base = np.array([0.90 - 0.10 * pigment, 0.38 - 0.11 * pigment, 0.15 - 0.05 * pigment], np.float32)
    r_fovea = np.hypot(X, Y)
    blotch = _smooth_noise(rng, 12, n, 1.2)
    choroid = _smooth_noise(rng, 64, n, 1.4)
    mottle = _smooth_noise(rng, 160, n, 0.8)
    # tigroid choroid: orange choroidal vessels (ridges of the noise) between darker pigment,
    # hidden by the denser pigment of the macula
    ridge = np.exp(-(choroid / 0.6) ** 2)
    tigroid = (0.03 + 0.09 * pigment) * (ridge - 0.5) * _smoothstep(1.5, 4.0, r_fovea)
    shade = 1.0 + 0.05 * blotch + 0.025 * mottle
    albedo = (base * shade[..., None] * (1.0 + tigroid[..., None] * np.array([1.0, 1.3, 0.8], np.float32)))
    albedo = albedo.astype(np.float32)

    # macula and fovea darker (macular pigment absorbs blue-green), small foveal reflex
    macula = rng.uniform(0.25, 0.38) * np.exp(-(r_fovea**2) / (2 * rng.uniform(1.2, 1.6) ** 2))
    fovea = rng.uniform(0.15, 0.25) * np.exp(-(r_fovea**2) / (2 * 0.35**2))
    albedo *= 1.0 - (macula + fovea)[..., None] * np.array([0.45, 1.0, 1.0], np.float32)
    reflex_mm = max(0.04, 0.45 / eye.px_per_mm)
    _blend(albedo, 0.45 * np.exp(-(r_fovea**2) / (2 * reflex_mm**2)), (1.0, 0.95, 0.85))
    if rng.random() < 0.5:  # young-eye macular ring reflex
        ring = np.exp(-((r_fovea - rng.uniform(1.5, 2.0)) ** 2) / (2 * 0.08**2))
        _blend(albedo, 0.035 * ring, (1.0, 0.9, 0.8))

    # optic disc: rim pinker nasally, paler temporally; optional temporal scleral ring or crescent
    dxm, dym = X - eye.disc[0], Y - eye.disc[1]
    d = np.hypot(dxm / eye.disc_a, dym / eye.disc_b)
    edge = max(0.05, 1.0 / (eye.disc_a * eye.px_per_mm))
    temporal_side = np.clip(0.5 - 0.5 * dxm / eye.disc_a, 0, 1)[..., None]
    if rng.random() < 0.6:
        crescent = _smoothstep(0.9, 1.02, d) * _smoothstep(1.2, 1.06, d) * temporal_side[..., 0] ** 2
        colour = (0.95, 0.82, 0.68) if rng.random() < 0.7 else (0.35, 0.18, 0.10)
        _blend(albedo, 0.5 * crescent, colour)
    pink = np.array([0.98, 0.60, 0.40], np.float32)
    pale = np.array([1.0, 0.74, 0.50], np.float32)
    disc_alpha = 0.97 * _smoothstep(1.0 + edge, 1.0 - edge, d)
    a = disc_alpha[..., None]
    albedo *= 1.0 - a
    albedo += a * (pink + (pale - pink) * temporal_side)
    # pale cup, decentred temporally, its sloping wall fading between 0.8 and 1.2 cup radii
    _blend(albedo, 0.95 * disc_alpha * _smoothstep(1.2, 0.8, _cup_distance(eye, X, Y)), (1.0, 0.90, 0.68))
    return albedo


# --------------------------------------------------------------------------- findings
# Each painter returns (layers, measurements, bbox mask); a layer is (alpha, colour, stage) with
# stage "under" (beneath the retinal vessels) or "over" (in the nerve fibre layer, above them).


def _microaneurysms(eye, f, rng, k, scene):
    count = int(rng.integers(*[(4, 9), (12, 21), (28, 46)][k]))
    pts = _sample_points(eye, f.location, count, rng, min_r=0.4)
    canvas = _canvas(eye)
    for p, r in zip(eye.to_ss(pts), rng.uniform(0.035, 0.06, count) * eye.px_per_mm * SUPERSAMPLE):
        cv2.circle(canvas, (_fix(p[0]), _fix(p[1])), max(1, _fix(r)), 255, -1, cv2.LINE_AA, SHIFT)
    cov = _coverage(canvas, eye.size)
    return [(cov, MA_RED, "under")], {"count": float(count), "area_mm2": _area_mm2(canvas, eye)}, cov > 0.02


def _haemorrhage_shapes(eye, pts, scale, flame_fraction, rng):
    """Dot/blot haemorrhages (deep, round) and flame haemorrhages (superficial, along the NFL)."""
    deep, flame = _canvas(eye), _canvas(eye)
    # the first three are one flame, one blot and one dot haemorrhage, so every type named is drawn
    kinds = ["flame", "blot", "dot"] if flame_fraction < 1 else []
    kinds += [str(k) for k in rng.choice(["flame", "blot", "dot"], size=max(0, len(pts) - len(kinds)),
                                         p=[flame_fraction, (1 - flame_fraction) / 2, (1 - flame_fraction) / 2])]
    for p, kind in zip(pts, kinds):
        if kind == "flame":
            length = rng.uniform(0.22, 0.55) * scale
            _ellipse(flame, eye, p, length, length * rng.uniform(0.22, 0.35), _nfl_direction(eye, p))
            _ellipse(flame, eye, p, length * 1.35, length * 0.14, _nfl_direction(eye, p), 150)  # feathered ends
        else:
            r = rng.uniform(0.06, 0.11) * scale if kind == "dot" else rng.uniform(0.12, 0.22) * scale
            for _ in range(int(rng.integers(1, 4))):  # blots are irregular
                c = p + rng.normal(0, 0.35 * r, 2)
                _ellipse(deep, eye, c, r * rng.uniform(0.8, 1.2), r * rng.uniform(0.7, 1.0),
                         (math.cos(a := rng.uniform(0, math.pi)), math.sin(a)))
    cov_deep = _coverage(deep, eye.size)
    cov_flame = cv2.GaussianBlur(_coverage(flame, eye.size), (0, 0), 0.6)
    area = _area_mm2(np.maximum(deep, flame), eye)
    return cov_deep, cov_flame, area


def _retinal_hemorrhage(eye, f, rng, k, scene):
    count = int(rng.integers(*[(3, 6), (7, 12), (16, 26)][k]))
    pts = _sample_points(eye, f.location, count, rng, inset=0.3, min_r=0.5)
    deep, flame, area = _haemorrhage_shapes(eye, pts, (1.0, 1.2, 1.45)[k], 0.4, rng)
    layers = [(deep, BLOT_RED, "under"), (flame, FLAME_RED, "over")]
    return layers, {"count": float(count), "area_mm2": area}, (deep > 0.02) | (flame > 0.05)


def _hard_exudates(eye, f, rng, k, scene):
    ring_r = (0.45, 0.7, 1.0)[k] * rng.uniform(0.85, 1.15)
    if f.location == "macular":
        ang = rng.uniform(0, 2 * math.pi)
        centre = rng.uniform(0.4, 1.2) * np.array([math.cos(ang), math.sin(ang)])
    else:
        centre = _sample_points(eye, f.location, 1, rng, inset=ring_r + 0.3)[0]
    count = int(rng.integers(*[(6, 11), (16, 28), (36, 60)][k]))
    if f.location == "macular" or k == 2 or rng.random() < 0.5:  # circinate (partial) ring
        span = (1.1, 1.5, 2.0)[k] * math.pi
        ang = rng.uniform(0, 2 * math.pi) + rng.uniform(0, span, count)
        rad = ring_r + rng.normal(0, 0.08, count)
        pts = centre + np.stack([rad * np.cos(ang), rad * np.sin(ang)], -1)
    else:
        pts = centre + rng.normal(0, 0.5 * ring_r, (count, 2))
    canvas = _canvas(eye)
    sizes = rng.uniform(0.025, 0.06, count) * (1.0, 1.2, 1.4)[k]
    if k == 2:
        sizes[: count // 8] = rng.uniform(0.1, 0.18, count // 8)  # coalescent plaques
    for p, s in zip(pts, sizes):  # sharp-edged irregular flecks
        a = rng.uniform(0, math.pi)
        _ellipse(canvas, eye, p, s, s * rng.uniform(0.5, 1.0), (math.cos(a), math.sin(a)))
    cov = _coverage(canvas, eye.size)
    return [(cov * 0.95, EXUDATE_YELLOW, "under")], {"count": float(count), "area_mm2": _area_mm2(canvas, eye)}, cov > 0.02


def _cotton_wool_spots(eye, f, rng, k, scene):
    count = int(rng.integers(*[(2, 3), (3, 5), (6, 9)][k]))
    along = np.vstack([v.points for v in scene.vessels if v.main])
    along = along[_in_location(eye, along, f.location, 0.4)]
    if len(along) == 0:
        along = _sample_points(eye, f.location, 8, rng, inset=0.4)
    canvas = _canvas(eye)
    for i in rng.integers(0, len(along), count):  # beside the arcades, long axis along the fibres
        j = min(i + 1, len(along) - 1)
        t = along[j] - along[max(i - 1, 0)]
        t = t / (np.linalg.norm(t) + 1e-9)
        p = along[i] + np.array([-t[1], t[0]]) * rng.choice([-1, 1]) * rng.uniform(0.15, 0.4)
        half = rng.uniform(0.18, 0.32) * (1.0, 1.15, 1.3)[k]
        _ellipse(canvas, eye, p, half, half * rng.uniform(0.55, 0.8), t)
    cov = _coverage(canvas, eye.size)
    sigma = max(0.6, 0.07 * eye.px_per_mm)
    fluff = 0.7 + 0.3 * np.clip(_smooth_noise(rng, 96, eye.size, 0.8), -1, 1)
    cov = np.clip(cv2.GaussianBlur(cov, (0, 0), sigma) * 1.4, 0, 1) * fluff
    return [(cov * 0.85, CWS_WHITE, "over")], {"count": float(count), "area_mm2": _area_mm2(canvas, eye)}, cov > 0.05


def _drusen(eye, f, rng, k, scene):
    count = int(rng.integers(*[(12, 20), (18, 30), (25, 40)][k]))
    lo, hi = [(40.0, 63.0), (63.0, 125.0), (125.0, 260.0)][k]  # diameter, um
    diam = rng.uniform(lo, hi, count)
    ang = rng.uniform(0, 2 * math.pi, count)
    rad = 2.2 * rng.uniform(0, 1, count) ** 0.9  # clustered at the central macula
    pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], -1)
    canvas = _canvas(eye)
    for p, dm in zip(pts, diam):
        r_draw = max(dm, 70.0) / 2000.0  # sub-resolution drusen drawn at the visible minimum
        _ellipse(canvas, eye, p, r_draw, r_draw * rng.uniform(0.8, 1.0), (1.0, 0.0))
    cov = _coverage(canvas, eye.size)
    cov = cv2.GaussianBlur(cov, (0, 0), max(0.5, (0.0, 0.01, 0.03)[k] * eye.px_per_mm))  # large drusen are soft
    op = (0.85, 0.75, 0.65)[k]
    return ([(np.clip(cov * 1.2, 0, 1) * op, DRUSEN_YELLOW, "under")],
            {"count": float(count), "max_diameter_um": float(diam.max()), "area_mm2": _area_mm2(canvas, eye)},
            cov > 0.03)


def _frond(eye, root, radius, rng, lines, fill) -> None:
    """A cartwheel of fine new vessels: spokes from a root joined by loops at the rim."""
    m = int(rng.integers(6, 11))
    phi = rng.uniform(0, 2 * math.pi) + np.sort(rng.uniform(0, 2 * math.pi, m))
    rim = root + (radius * rng.uniform(0.6, 1.0, m))[:, None] * np.stack([np.cos(phi), np.sin(phi)], -1)
    curves = []
    for q in rim:
        mid = (root + q) / 2 + rng.normal(0, 0.12 * radius, 2)
        curves.append(_catmull_rom(np.array([root, mid, q]), 0.03))
    for q0, q1 in zip(rim, np.roll(rim, -1, axis=0)):
        bulge = (q0 + q1) / 2 - root
        mid = root + bulge * rng.uniform(1.1, 1.35)
        curves.append(_catmull_rom(np.array([q0, mid, q1]), 0.03))
    thick = max(1, int(round(0.022 * eye.px_per_mm * SUPERSAMPLE)))
    cv2.polylines(lines, [np.round(eye.to_ss(c) * (1 << SHIFT)).astype(np.int32) for c in curves], False, 255,
                  thick, cv2.LINE_AA, SHIFT)
    hull = cv2.convexHull(np.round(eye.to_ss(np.vstack([rim, root[None]])) * (1 << SHIFT)).astype(np.int32))
    cv2.fillConvexPoly(fill, hull, 255, cv2.LINE_AA, SHIFT)


def _neovascularization(eye, f, rng, k, scene):
    n_fronds, (r_lo, r_hi) = [(1, (0.3, 0.4)), (2, (0.4, 0.5)), (3, (0.55, 0.7))][k]
    if f.location == "disc":
        roots = np.array(eye.disc) + rng.normal(0, 0.35, (n_fronds, 2)) * (eye.disc_a, eye.disc_b)
    else:
        veins = np.vstack([v.points for v in scene.vessels if v.main and v.kind == "vein"])
        veins = veins[_in_location(eye, veins, f.location, 0.8)]
        if len(veins) == 0:
            veins = _sample_points(eye, f.location, 4, rng, inset=0.8)
        first = veins[int(rng.integers(len(veins)))]
        roots = [first]
        for _ in range(n_fronds - 1):  # further fronds along the same vein
            near = veins[np.hypot(*(veins - first).T) < 1.6]
            roots.append(near[int(rng.integers(len(near)))])
        roots = np.array(roots)
    lines, fill = _canvas(eye), _canvas(eye)
    for root in roots:
        _frond(eye, root, rng.uniform(r_lo, r_hi), rng, lines, fill)
    cov_lines, cov_fill = _coverage(lines, eye.size), _coverage(fill, eye.size)
    disc_area = math.pi * eye.disc_a * eye.disc_b
    extent = _area_mm2(fill, eye) / disc_area
    layers = [(0.18 * cov_fill, NV_RED, "over"), (np.clip(1.6 * cov_lines, 0, 1) * 0.7, NV_RED, "over")]
    return layers, {"extent_disc_areas": extent, "area_mm2": _area_mm2(fill, eye)}, cov_fill > 0.05


def _enlarged_cup(eye, f, rng, k, scene):
    # the cup itself is drawn with the disc (eye.cdr was set before drawing); this is its mask
    return [], {"cup_to_disc_ratio": eye.cdr}, _cup_distance(eye, scene.X, scene.Y) < 1.15


def _papilledema(eye, f, rng, k, scene):
    X, Y = scene.X, scene.Y
    swell = (0.3, 0.6, 0.95)[k] * rng.uniform(0.9, 1.1)  # outward spread of the swelling, disc radii
    opacity = (0.55, 0.75, 0.92)[k]
    d = eye.disc_distance(np.stack([X, Y], -1))
    theta = np.arctan2(Y - eye.disc[1], X - eye.disc[0])
    # irregular radial striations of the swollen nerve fibre layer, feathered outer edge
    wave = sum(np.cos(n * theta + ph) for n, ph in zip(rng.integers(5, 24, 6), rng.uniform(0, 6.3, 6))) / 2.45
    striae = 0.8 + 0.2 * np.tanh(wave)
    outer = _smoothstep(1.0 + swell * (1.0 + 0.12 * wave), 0.85, d)
    margin = outer * (0.45 + 0.55 * _smoothstep(0.25, 0.85, d))  # densest at the margin, hides the vessels
    alpha = opacity * margin * np.where(d > 1.0, striae, 1.0)
    layers = [(alpha.astype(np.float32), SWOLLEN_DISC, "over")]
    mask = alpha > 0.08
    count = int(rng.integers(*[(0, 1), (0, 3), (4, 8)][k]))
    if count:  # peripapillary flame haemorrhages at the edge of the swelling
        ang = rng.uniform(0, 2 * math.pi, count)
        rr = 1.0 + swell * rng.uniform(0.5, 1.0, count)
        pts = np.stack([eye.disc[0] + rr * eye.disc_a * np.cos(ang), eye.disc[1] + rr * eye.disc_b * np.sin(ang)], -1)
        _, flame, _ = _haemorrhage_shapes(eye, pts, 1.0, 1.0, rng)
        layers.append((flame, FLAME_RED, "over"))
        mask |= flame > 0.05
    apparent = 2 * eye.disc_b * (1.0 + 0.55 * swell)
    return layers, {"apparent_disc_diameter_mm": apparent, "peripapillary_haemorrhage_count": float(count)}, mask


# --------------------------------------------------------------------------- render


def _camera(albedo: np.ndarray, uu: np.ndarray, vv: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Vignetting, uneven illumination, the circular aperture and per-channel sensor noise."""
    size = albedo.shape[0]
    rho = np.hypot(uu - 0.5, vv - 0.5) / FOV_RADIUS
    tilt = rng.uniform(0, 2 * math.pi)
    gradient = (uu - 0.5) * math.cos(tilt) + (vv - 0.5) * math.sin(tilt)
    illum = (1.0 - rng.uniform(0.4, 0.55) * rho**2.2) * (1.0 + rng.uniform(0.0, 0.25) * gradient)
    illum *= 1.0 - 0.35 * _smoothstep(0.82, 1.0, rho)
    fov = _smoothstep(1.0 + 0.7 / (FOV_RADIUS * size), 1.0 - 0.7 / (FOV_RADIUS * size), rho)
    img = albedo * (illum * fov)[..., None] * rng.uniform(0.88, 1.0)
    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * np.array([0.008, 0.011, 0.015], np.float32)
    img += noise * fov[..., None]
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def render(findings: list[Finding], size: int, rng: np.random.Generator) -> Rendered:
    """Draw one fundus photograph with every requested finding; see the module docstring."""
    streams = rng.integers(0, 2**63 - 1, size=2 + len(FINDINGS))
    anatomy_rng = np.random.Generator(np.random.PCG64(int(streams[0])))
    noise_rng = np.random.Generator(np.random.PCG64(int(streams[1])))
    finding_rngs = {name: np.random.Generator(np.random.PCG64(int(s))) for name, s in zip(FINDINGS, streams[2:])}

    eye = _sample_eye(size, anatomy_rng)
    vessels = _vessel_tree(eye, anatomy_rng)

    resolved: list[Finding] = []
    for f in findings:  # fill unset attributes from the finding's own stream, check the rest
        spec, frng = SPEC.finding(f.name), finding_rngs[f.name]
        sev = f.severity or (str(spec.severities[frng.integers(len(spec.severities))]) if spec.severities else None)
        loc = f.location or (str(spec.locations[frng.integers(len(spec.locations))]) if spec.locations else None)
        if sev is not None and sev not in spec.severities or loc is not None and loc not in spec.locations:
            raise UserError(f"fundus: {f.name} does not allow severity {sev!r} / location {loc!r}")
        resolved.append(f.copy(severity=sev, location=loc))
    for f in resolved:
        if f.name == "enlarged_cup":  # glaucomatous cup: larger and vertically elongated
            k = SEVERITIES.index(f.severity)
            eye.cdr = finding_rngs[f.name].uniform(*[(0.62, 0.7), (0.72, 0.8), (0.82, 0.9)][k])
            eye.cup_aspect = finding_rngs[f.name].uniform(0.8, 0.92)

    u = (np.arange(size, dtype=np.float32) + 0.5) / size
    uu, vv = np.meshgrid(u, u)
    X = ((uu - eye.fovea_uv[0]) * eye.image_mm * eye.nasal).astype(np.float32)
    Y = ((eye.fovea_uv[1] - vv) * eye.image_mm).astype(np.float32)
    albedo = _base_albedo(eye, X, Y, anatomy_rng)
    scene = _Scene(vessels, X, Y)

    layers: list[tuple[np.ndarray, tuple, str]] = []
    out: list[Finding] = []
    for f in resolved:
        frng, k = finding_rngs[f.name], SEVERITIES.index(f.severity) if f.severity else 0
        lay, meas, mask = PAINTERS[f.name](eye, f, frng, k, scene)
        layers += lay
        done = f.copy(bbox=bbox_of(mask))
        done.measurements.update({key: round(float(v), 4) for key, v in meas.items()})
        out.append(done)

    for alpha, colour, stage in layers:
        if stage == "under":
            _blend(albedo, alpha, colour)
    # vessels: veins darker and wider; the green channel carries most of the contrast
    veins = _coverage(_draw_vessels(eye, vessels, "vein"), size)[..., None]
    arteries = _coverage(_draw_vessels(eye, vessels, "artery"), size)[..., None]
    vessel_alpha = np.maximum(veins * 0.92, arteries * 0.85)[..., 0]
    vessel_colour = np.where(veins >= arteries, np.array(VEIN, np.float32), np.array(ARTERY, np.float32))
    albedo *= 1.0 - vessel_alpha[..., None]
    albedo += vessel_alpha[..., None] * vessel_colour
    for alpha, colour, stage in layers:
        if stage == "over":
            _blend(albedo, alpha, colour)

    image = _camera(albedo, uu, vv, noise_rng)

    disc_uv = eye.to_uv(np.array(eye.disc))
    measurements = {
        "eye_is_right": 1.0 if eye.is_right else 0.0,
        "cup_to_disc_ratio": round(eye.cdr, 4),
        "disc_diameter_mm": round(2 * eye.disc_b, 4),
        "disc_to_fovea_mm": round(math.hypot(*eye.disc), 4),
        "field_of_view_mm": round(2 * FOV_RADIUS * eye.image_mm, 4),
        "pixel_size_um": round(1000.0 * eye.image_mm / size, 4),
        "fovea_x": round(float(eye.fovea_uv[0]), 4),
        "fovea_y": round(float(eye.fovea_uv[1]), 4),
        "disc_x": round(float(disc_uv[0]), 4),
        "disc_y": round(float(disc_uv[1]), 4),
    }
    eye_words = ("right eye", "right eye (OD)", "OD") if eye.is_right else ("left eye", "left eye (OS)", "OS")
    return Rendered(image=image, findings=out, measurements=measurements, report_words={"eye": eye_words})


PAINTERS = {
    "microaneurysms": _microaneurysms,
    "retinal_hemorrhage": _retinal_hemorrhage,
    "hard_exudates": _hard_exudates,
    "cotton_wool_spots": _cotton_wool_spots,
    "neovascularization": _neovascularization,
    "drusen": _drusen,
    "enlarged_cup": _enlarged_cup,
    "papilledema": _papilledema,
}

# --------------------------------------------------------------------------- report vocabulary

QUADRANT_WORDS = {
    "superotemporal": ("in the superotemporal quadrant", "superotemporally", "in the superotemporal retina"),
    "inferotemporal": ("in the inferotemporal quadrant", "inferotemporally", "in the inferotemporal retina"),
    "superonasal": ("in the superonasal quadrant", "superonasally", "in the superonasal retina"),
    "inferonasal": ("in the inferonasal quadrant", "inferonasally", "in the inferonasal retina"),
    "macular": ("at the macula", "in the macula", "within the macula", "in the macular region"),
    "disc": ("at the disc", "at the optic disc", "on the optic disc"),
}
LESION_LOCATIONS = QUADRANTS + ("macular",)
FEW_MANY = {"mild": ("a few", "scattered", "occasional"), "moderate": ("several", "multiple"),
            "severe": ("numerous", "many", "extensive")}
LESION_TEMPLATES = ("{severity} {term} {location}", "{severity} {term} are seen {location}",
                    "{severity} {term} are present {location}")


def _words(locations: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return {loc: QUADRANT_WORDS[loc] for loc in locations}


FINDINGS: dict[str, FindingSpec] = {
    spec.name: spec
    for spec in (
        FindingSpec(
            name="microaneurysms",
            terms=("microaneurysms", "retinal microaneurysms", "MAs"),
            templates=LESION_TEMPLATES,
            locations=LESION_LOCATIONS, severities=SEVERITIES,
            severity_words=FEW_MANY, location_words=_words(LESION_LOCATIONS),
        ),
        FindingSpec(
            name="retinal_hemorrhage",
            terms=("retinal haemorrhages", "intraretinal haemorrhages", "dot, blot and flame haemorrhages"),
            templates=LESION_TEMPLATES + ("{severity} {term} {location}, including flame-shaped haemorrhages",),
            locations=LESION_LOCATIONS, severities=SEVERITIES,
            severity_words={"mild": ("a few", "scattered"), "moderate": ("several", "multiple"),
                            "severe": ("numerous", "extensive", "widespread")},
            location_words=_words(LESION_LOCATIONS),
        ),
        FindingSpec(
            name="hard_exudates",
            terms=("hard exudates", "lipid exudates", "intraretinal hard exudates"),
            templates=LESION_TEMPLATES,
            locations=LESION_LOCATIONS, severities=SEVERITIES,
            severity_words={"mild": ("a few", "scattered"), "moderate": ("several", "clusters of"),
                            "severe": ("extensive", "numerous", "confluent")},
            location_words=_words(LESION_LOCATIONS),
        ),
        FindingSpec(
            name="cotton_wool_spots",
            terms=("cotton wool spots", "CWS", "soft exudates", "nerve fibre layer infarcts"),
            templates=LESION_TEMPLATES + ("{severity} {term} adjacent to the vessels {location}",),
            locations=QUADRANTS, severities=SEVERITIES,
            severity_words={"mild": ("a few", "occasional"), "moderate": ("several", "multiple"),
                            "severe": ("numerous", "many")},
            location_words=_words(QUADRANTS),
        ),
        FindingSpec(
            name="neovascularization",
            terms=("neovascularisation", "new vessels", "retinal neovascularisation", "NV"),
            templates=("{severity} {term} {location}", "{severity} {term} noted {location}",
                       "{severity} {term} {location}, in keeping with proliferative retinopathy"),
            locations=("disc",) + QUADRANTS, severities=SEVERITIES,
            severity_words={"mild": ("a small frond of", "a single small frond of"),
                            "moderate": ("several fronds of", "multiple fronds of"),
                            "severe": ("extensive", "florid", "large fronds of")},
            location_words=_words(("disc",) + QUADRANTS),
        ),
        FindingSpec(
            name="drusen",
            terms=("drusen", "macular drusen"),
            templates=("{severity} {term}", "{severity} {term} are present", "there are {severity} {term}"),
            severities=SEVERITIES,
            severity_words={"mild": ("a few small", "scattered small"),
                            "moderate": ("multiple medium-sized", "several intermediate-size"),
                            "severe": ("numerous large", "multiple large, partly confluent", "extensive large")},
        ),
        FindingSpec(
            name="enlarged_cup",
            terms=("glaucomatous cupping", "glaucomatous optic disc cupping", "optic disc cupping",
                   "cupping of the optic disc"),
            templates=("{severity} {term}", "{severity} {term} with a vertical cup-to-disc ratio of {cup_to_disc_ratio}",
                       "{severity} {term} (CDR {cup_to_disc_ratio})",
                       "{severity} {term}, vertical cup-to-disc ratio {cup_to_disc_ratio}"),
            severities=SEVERITIES,
            severity_words={"mild": ("mild", "early"), "moderate": ("moderate",), "severe": ("advanced", "marked", "severe")},
            excludes=("papilledema",),
        ),
        FindingSpec(
            name="papilledema",
            terms=("papilloedema", "optic disc swelling", "optic disc oedema", "disc swelling", "papilledema"),
            templates=("{severity} {term}", "{severity} {term} with blurred disc margins",
                       "{severity} {term}; the disc margins are indistinct"),
            severities=SEVERITIES,
            severity_words={"mild": ("mild", "early"), "moderate": ("moderate", "established"),
                            "severe": ("severe", "marked")},
            excludes=("enlarged_cup",),
        ),
    )
}

SPEC = PhantomSpec(
    name="fundus",
    channels=3,
    findings=FINDINGS,
    render=render,
    techniques=(
        "Colour fundus photograph of the posterior pole",
        "Colour fundus photography (CFP), 45-degree field, posterior pole",
        "Digital colour retinal photograph, single 45-degree field",
        "Fundus photograph (colour), posterior pole view",
        "CFP, 45° field centred on the posterior pole",
        "Colour fundus photograph, {eye}, posterior pole",
        "CFP {eye}, 45-degree field",
        "Digital colour retinal photograph, {eye}, single 45-degree field",
    ),
    normal_statements=(
        "The optic disc is pink with well-defined margins and a healthy neuroretinal rim. The macula, vessels and "
        "background retina are normal.",
        "Healthy optic disc with a normal cup. Normal calibre retinal vessels. Normal macula with a foveal reflex.",
        "Normal fundus appearance: disc, macula and vessels are unremarkable.",
        "The disc, macula, vessels and background retina within the photographed field are normal.",
        "No retinopathy. The optic disc and macula are normal.",
    ),
    impression_normal=("Normal fundus photograph.", "No retinopathy.", "Normal study.", "No abnormality detected."),
)
