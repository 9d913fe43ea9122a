"""Chest radiograph phantom: a frontal (PA) chest X-ray drawn from a seeded anatomy model.

Anatomy model. The image is built as a projected density map (bright = attenuating) at an
internal resolution of at least 256 px and area-downsampled to the requested size:

* soft tissue of the trunk, neck and shoulders, thicker in the middle (a cylinder profile),
  with optional breast shadows and a gastric air bubble under the left hemidiaphragm;
* two lung envelopes (the pleural cavities) with rounded apices, convex lateral walls, domed
  hemidiaphragms (the right usually higher) and sharp costophrenic angles; the mediastinum
  (with the aortic knob and pulmonary trunk on the patient's left) and an asymmetric,
  left-heavy heart are cut out of them. Aerated lung subtracts density in proportion to its
  depth (a distance transform), so the periphery and apices are paler than the mid lung;
* branching pulmonary vessels radiating from the hila, tapering towards the periphery;
* trachea and main bronchi (air columns), thoracic spine with pedicles, posterior ribs (bright
  cortex, curving laterally and downwards) and fainter anterior ribs, clavicles, scapulae and
  humeral heads;
* film-like grain, exposure and contrast variation.

Findings edit this model: geometry first (heart size, volume loss with mediastinal shift and
hemidiaphragm elevation), then lung content (fraction of air replaced by fluid or tissue,
nodules, lines), then pneumothorax (the lung content on that side shrinks towards the mediastinum
and the base, behind a visceral pleural line) and finally pleural fluid with a meniscus.

Conventions. Radiological convention: the patient's right is on the viewer's left. ``side``
values are the patient's side. Lobar locations (``right_upper_lobe`` ...) and zones
(``left_mid_zone`` ...) carry their side, so those findings have no ``sides``. Zones follow the
usual CXR division: upper zone above the anterior 2nd rib, mid zone to the 4th, lower zone below.

Field of view: the square image spans 380 mm (a 35 x 43 cm cassette cropped to its width), so
one normalised unit is 380 mm. The cardiothoracic ratio is (maximal right + maximal left
cardiac extent from the spine midline) / maximal internal thoracic diameter, measured on the
drawn masks; every study reports it in ``Rendered.measurements``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from .base import Finding, FindingSpec, PhantomSpec, Rendered, bbox_of

FOV_MM = 380.0  # width of the square field of view
AIR_DENSITY = 0.3  # density removed by a fully aerated lung
SIDES = ("right", "left")
LOBES = ("right_upper_lobe", "right_middle_lobe", "right_lower_lobe", "left_upper_lobe", "lingula", "left_lower_lobe")
ZONES = tuple(f"{s}_{z}_zone" for s in SIDES for z in ("upper", "mid", "lower"))
SEVERITY_INDEX = {"mild": 0, "moderate": 1, "severe": 2}
VESSEL_TRUNKS, VESSEL_LEVELS = 9, 4  # per hilum; each trunk branches into a binary tree


def _lateral(side: str) -> float:
    """+1 where the patient's side lies towards larger x (viewer's right), -1 otherwise."""
    return -1.0 if side == "right" else 1.0


def _side_of(location: str) -> str:
    return "right" if location.startswith("right") else "left"


def _sstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _severity(finding: Finding) -> int:
    return SEVERITY_INDEX.get(finding.severity or "moderate", 1)


@dataclass
class Anatomy:
    """Normalised geometry of one patient; per-side values are keyed by patient side."""

    midline: float  # spine and body midline
    mediastinum_x: float  # mediastinal centre (moves with volume loss)
    half_width: dict  # inner thoracic half-width from the midline
    apex_y: dict
    apex_d: dict  # lateral distance of the apical dome from the midline
    dome_y: dict  # hemidiaphragm dome height
    dome_d: dict
    cp_y: dict  # costophrenic angle height
    hilum_y: dict
    heart_right: float  # cardiac extent to the patient's right of the heart centre
    heart_left: float
    heart_cy: float
    heart_height: float
    heart_dx: float  # heart centre offset to the patient's left of the mediastinum
    knob: float  # aortic knob prominence
    carina_y: float
    rib_y0: float
    rib_dy: float
    clavicle_y: float
    vertebra: tuple  # (first endplate y, vertebral height, disc height)
    breasts: float  # 0 when absent
    gastric: tuple  # (dx, dy, rx, ry, depth) of the gastric bubble
    vessels: dict  # side -> (n, 7) array of (d0, y0, d_mid, y_mid, d1, y1, level) relative to the hilum
    exposure: tuple  # (gain, gamma, grain sigma)
    grain: np.ndarray = field(repr=False)  # output-sized film grain
    texture: np.ndarray = field(repr=False)  # coarse random grid for parenchymal mottling
    upper_vessel_scale: float = 0.75  # upper zone vessels relative to lower; >1: upper lobe blood diversion


def _vessel_tree(rng: np.random.Generator) -> np.ndarray:
    """Branching pulmonary vessels from one hilum, as curved segments (hilum-relative, lateral d)."""
    nodes = 2**VESSEL_LEVELS - 1
    r = rng.random((VESSEL_TRUNKS, nodes, 5))
    angle = np.zeros((VESSEL_TRUNKS, nodes))  # degrees from lateral, negative upwards
    length = np.zeros_like(angle)
    start = np.zeros((VESSEL_TRUNKS, nodes, 2))
    end = np.zeros_like(start)
    segments = np.zeros((VESSEL_TRUNKS, nodes, 7))
    for i in range(nodes):
        if i == 0:
            angle[:, 0] = np.linspace(-84.0, 76.0, VESSEL_TRUNKS) + (r[:, 0, 4] - 0.5) * 12
            length[:, 0] = 0.11 + 0.05 * r[:, 0, 2]
            start[:, 0] = np.stack([0.02 * r[:, 0, 1], angle[:, 0] / 90.0 * 0.035], 1)  # along the whole hilum
        else:
            parent, sign = (i - 1) // 2, (-1.0 if i % 2 else 1.0)
            angle[:, i] = angle[:, parent] + sign * (14 + 16 * r[:, parent, 0]) + (r[:, i, 1] - 0.5) * 12
            length[:, i] = length[:, parent] * (0.55 + 0.2 * r[:, i, 2])
            start[:, i] = end[:, parent]
        rad = np.deg2rad(np.clip(angle[:, i], -105, 100))
        direction = np.stack([np.cos(rad), np.sin(rad)], 1)
        end[:, i] = start[:, i] + length[:, i, None] * direction
        bend = ((r[:, i, 3] - 0.5) * 0.3 * length[:, i])[:, None] * np.stack([-direction[:, 1], direction[:, 0]], 1)
        segments[:, i, :2], segments[:, i, 4:6] = start[:, i], end[:, i]
        segments[:, i, 2:4] = (start[:, i] + end[:, i]) / 2 + bend
        segments[:, i, 6] = int(np.log2(i + 1))
    return segments.reshape(-1, 7)


def sample_anatomy(rng: np.random.Generator, size: int) -> Anatomy:
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    hw = u(0.33, 0.36)
    half_width = {"right": hw + u(-0.008, 0.008), "left": hw + u(-0.008, 0.008)}
    dome_r = u(0.655, 0.70)
    dome_y = {"right": dome_r, "left": dome_r + u(0.012, 0.035)}  # the right hemidiaphragm sits higher
    apex = u(0.105, 0.13)
    ctr = u(0.38, 0.45)  # ellipse widths; the drawn (sheared) heart measures about 0.02 more
    thorax = half_width["right"] + half_width["left"]
    right_share = u(0.36, 0.42)  # the heart lies mostly left of the midline
    midline = 0.5 + u(-0.012, 0.012)
    return Anatomy(
        midline=midline,
        mediastinum_x=midline + u(-0.004, 0.006),
        half_width=half_width,
        apex_y={s: apex + u(-0.006, 0.006) for s in SIDES},
        apex_d={s: u(0.16, 0.19) for s in SIDES},
        dome_y=dome_y,
        dome_d={s: u(0.15, 0.19) for s in SIDES},
        cp_y={s: dome_y[s] + u(0.065, 0.09) for s in SIDES},
        hilum_y={"right": u(0.43, 0.46), "left": u(0.41, 0.44)},  # the left hilum is higher
        heart_right=ctr * thorax * right_share,
        heart_left=ctr * thorax * (1 - right_share),
        heart_cy=dome_r - u(0.075, 0.095),
        heart_height=u(0.11, 0.13),
        heart_dx=u(0.015, 0.03),
        knob=u(0.025, 0.04),
        carina_y=u(0.31, 0.35),
        rib_y0=u(0.075, 0.095),
        rib_dy=u(0.062, 0.068),
        clavicle_y=u(0.15, 0.175),
        vertebra=(u(0.0, 0.05), u(0.046, 0.054), u(0.01, 0.013)),
        breasts=u(0.04, 0.08) if rng.random() < 0.4 else 0.0,
        gastric=(u(0.16, 0.22), u(0.04, 0.07), u(0.03, 0.055), u(0.018, 0.03), u(0.08, 0.16)),
        vessels={s: _vessel_tree(rng) for s in SIDES},
        exposure=(u(0.94, 1.04), u(0.9, 1.1), u(0.01, 0.018)),
        grain=rng.standard_normal((size, size)).astype(np.float32),
        texture=rng.standard_normal((56, 56)).astype(np.float32),
    )


# ---------------------------------------------------------------- geometry of one hemithorax
def _lateral_wall(an: Anatomy, side: str, y):
    """Lateral pleural border (distance from the midline) at height y: rounded apex, convex wall."""
    t = (y - an.apex_y[side]) / (an.cp_y[side] - an.apex_y[side])
    s = np.clip(t / 0.78, 0.0, 1.0)
    wall = an.apex_d[side] + (an.half_width[side] - an.apex_d[side]) * np.sqrt(1.0 - (1.0 - s) ** 2)
    return wall - 0.02 * np.clip((t - 0.78) / 0.22, 0.0, None) ** 2  # sweeps in to the costophrenic angle


def _medial_wall(an: Anatomy, side: str, y):
    s = np.clip((y - an.apex_y[side]) / 0.10, 0.0, 1.0)
    return an.apex_d[side] - (an.apex_d[side] - 0.02) * np.sqrt(1.0 - (1.0 - s) ** 2)


def _diaphragm(an: Anatomy, side: str, d):
    """Hemidiaphragm height at distance d from the midline: a dome falling to the costophrenic angle."""
    offset = d - an.dome_d[side]
    reach = np.clip(offset, 0, None) / (an.half_width[side] - an.dome_d[side])
    lateral_fall = (an.cp_y[side] + 0.01 - an.dome_y[side]) * reach**2
    medial_fall = 0.025 * (np.clip(-offset, 0, None) / an.dome_d[side]) ** 2  # into the cardiophrenic angle
    return an.dome_y[side] + lateral_fall + medial_fall


def _lung_point(an: Anatomy, side: str, u: float, v: float) -> tuple[float, float]:
    """Image (x, y) of lung coordinates u (0 medial .. 1 lateral wall) and v (0 apex .. 1 diaphragm)."""
    d = 0.07 + u * (an.half_width[side] - 0.07)
    for _ in range(5):
        y = an.apex_y[side] + v * (_diaphragm(an, side, d) - an.apex_y[side])
        d = 0.07 + u * (_lateral_wall(an, side, y) - 0.07)
    return an.midline + _lateral(side) * float(d), float(y)


@dataclass
class Canvas:
    """Per-pixel maps at the internal resolution. X is a (1, R) row, Y an (R, 1) column."""

    R: int
    X: np.ndarray
    Y: np.ndarray
    envelope: dict  # side -> bool pleural cavity
    u: dict  # side -> lung coordinate maps (0 medial .. 1 lateral wall; 0 apex .. 1 diaphragm)
    v: dict
    on_side: dict  # side -> bool (1, R), pixels on that side of the mediastinum
    cage: np.ndarray  # bool, inside the ribs and apices, ignoring diaphragm and mediastinum
    mediastinum: np.ndarray  # bool, mediastinal soft tissue
    heart: np.ndarray  # bool
    heart_depth: np.ndarray  # 0..1 thickness profile of the heart
    lung: np.ndarray  # bool aerated lung (envelopes minus mediastinum and heart)
    floor: np.ndarray  # hemidiaphragm height per column, (1, R)
    hilum: dict  # side -> hilum x
    mediastinum_x: float
    fill: np.ndarray = None  # fraction of lung air replaced by fluid or tissue
    markings: np.ndarray = None  # vessels, hila, lines (seen only in aerated lung)
    lung_extra: np.ndarray = None  # density living in the lung (nodules): moves with a collapsing lung
    extra: np.ndarray = None  # density fixed to the image

    def __post_init__(self) -> None:
        blank = np.zeros((self.R, self.R), np.float32)
        self.fill, self.markings, self.lung_extra, self.extra = (blank.copy() for _ in range(4))


def _build_canvas(an: Anatomy, R: int) -> Canvas:
    coords = (np.arange(R, dtype=np.float32) + 0.5) / R
    X, Y = coords[None, :], coords[:, None]
    envelope, u, v, on_side, floors = {}, {}, {}, {}, {}
    cage = np.zeros((R, R), bool)
    for side in SIDES:
        d = _lateral(side) * (X - an.midline)
        wall, floor = _lateral_wall(an, side, Y), _diaphragm(an, side, d)
        walls = (Y >= an.apex_y[side]) & (d >= _medial_wall(an, side, Y)) & (d <= wall)
        cage |= walls
        envelope[side] = walls & (Y <= floor)
        u[side] = (d - 0.07) / (wall - 0.07)
        v[side] = (Y - an.apex_y[side]) / np.maximum(floor - an.apex_y[side], 1e-3)
        on_side[side] = _lateral(side) * (X - an.mediastinum_x) > 0
        floors[side] = _diaphragm(an, side, np.minimum(d, an.half_width[side]))
    xm = X - an.mediastinum_x
    right_border = 0.062 + 0.012 * _sstep((Y - 0.2) / 0.2)  # brachiocephalic vein, then SVC
    left_border = 0.056 + an.knob * np.exp(-(((Y - 0.285) / 0.03) ** 2)) + 0.014 * np.exp(-(((Y - 0.37) / 0.03) ** 2))
    mediastinum = (xm > -right_border) & (xm < left_border)
    # heart: two half-ellipses (right atrium, left ventricle), sheared so the apex points down and left;
    # evaluated in a window around it
    cx = an.mediastinum_x + an.heart_dx
    rows = _window(an.heart_cy - 1.2 * an.heart_height, an.heart_cy + 0.03 + 1.2 * an.heart_height, R)
    cols = _window(cx - an.heart_right - 0.1, cx + an.heart_left + 0.1, R)
    Xw, Yw = X[:, cols], Y[rows]
    xh = Xw - cx - np.float32(0.3) * (Yw - an.heart_cy)
    left_half = xh >= 0
    f32 = np.float32
    extent = np.where(left_half, f32(an.heart_left), f32(an.heart_right))
    cy = np.where(left_half, f32(an.heart_cy + 0.025), f32(an.heart_cy))
    height = np.where(left_half, f32(an.heart_height * 1.1), f32(an.heart_height))
    heart_depth = np.zeros((R, R), np.float32)
    heart_depth[rows, cols] = np.sqrt(np.clip(1.0 - (xh / extent) ** 2 - ((Yw - cy) / height) ** 2, 0, 1))
    heart = heart_depth > 0
    lung = (envelope["right"] | envelope["left"]) & ~mediastinum & ~heart
    return Canvas(
        R, X, Y, envelope, u, v, on_side, cage, mediastinum, heart, heart_depth, lung,
        np.where(X < an.midline, floors["right"], floors["left"]),
        {s: _hilum_x(an, s) for s in SIDES}, an.mediastinum_x,
    )


def _window(lo: float, hi: float, R: int) -> slice:
    """Pixel slice covering normalised [lo, hi], clipped to the image."""
    return slice(max(0, int(lo * R) - 1), min(R, int(hi * R) + 2))


def _hilum_x(an: Anatomy, side: str) -> float:
    return an.mediastinum_x + _lateral(side) * 0.1


# ---------------------------------------------------------------- drawing helpers
def _polylines(img: np.ndarray, curves, width: float, value: float) -> None:
    """Anti-aliased open curves ((n, k, 2) normalised points); sub-pixel widths fade instead of thinning."""
    R = img.shape[0]
    pts = np.round(np.asarray(curves, np.float64) * (R * 16)).astype(np.int32)
    if pts.ndim == 2:
        pts = pts[None]
    w_px = width * R
    cv2.polylines(img, list(pts), False, float(value * min(1.0, w_px)), max(1, int(round(w_px))), cv2.LINE_AA, 4)


def _tubes(img: np.ndarray, curves, width: float, value: float, cortex: float = 0.45) -> None:
    """Bones seen side-on: bright cortical margins, paler medulla."""
    _polylines(img, curves, width, value)
    inner = width - 2.6 / img.shape[0]
    if inner > 0:
        _polylines(img, curves, inner, value * (1 - cortex))


def _smooth_field(grid: np.ndarray, R: int) -> np.ndarray:
    f = cv2.resize(np.ascontiguousarray(grid, np.float32), (R, R), interpolation=cv2.INTER_CUBIC)
    return (f - f.min()) / max(float(f.max() - f.min()), 1e-6)


def _blur(img: np.ndarray, sigma_norm: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), max(0.3, sigma_norm * img.shape[0]))


def _area_cm2(mask: np.ndarray) -> float:
    return float(mask.sum()) * (FOV_MM / mask.shape[0]) ** 2 / 100.0


# ---------------------------------------------------------------- normal anatomy
def _body(an: Anatomy, cv: Canvas) -> np.ndarray:
    X, Y = cv.X, cv.Y
    shoulders = 0.12 + 0.46 * np.sqrt(_sstep((Y + 0.01) / 0.16))
    trunk = 0.425 + 0.04 * np.sin(np.pi * np.clip((Y - 0.2) / 1.0, 0, 1))
    half = np.where(Y < 0.3, shoulders, shoulders + (trunk - shoulders) * _sstep((Y - 0.3) / 0.12))
    dx = np.abs(X - an.midline)
    body = _sstep((half - dx) / 0.014 + 0.5)  # soft skin edge
    profile = np.sqrt(np.clip(1.0 - (dx / 0.52) ** 2, 0.0, 1.0))  # a cylinder: thicker in the middle
    tissue = body * (0.2 + 0.25 * profile)
    abdomen = _sstep((Y - cv.floor) / 0.006 + 0.5) * _sstep((Y - cv.floor + 0.01) / 0.08)  # liver, spleen
    abdomen *= 0.5 + 0.5 * _sstep((max(an.half_width.values()) + 0.05 - dx) / 0.2)  # thinning towards the flanks
    central = _blur((cv.mediastinum | cv.heart).astype(np.float32), 0.004) * _sstep((Y - 0.08) / 0.1)
    central = 0.17 * central + 0.1 * cv.heart_depth
    tissue += body * np.maximum(0.27 * abdomen, central)
    if an.breasts:
        for side in SIDES:
            cx = an.midline + _lateral(side) * 0.25
            r = ((X - cx) / 0.17) ** 2 + ((Y - 0.69) / 0.13) ** 2
            tissue += an.breasts * _sstep((1 - r) / 0.25) * _sstep((Y - 0.58) / 0.08)
    dx_g, dy_g, rx, ry, depth = an.gastric
    gx, gy = an.midline + dx_g, an.dome_y["left"] + dy_g
    bubble = _sstep((1 - ((X - gx) / rx) ** 2 - ((Y - gy) / ry) ** 2) / 0.3) * _sstep((Y - cv.floor - 0.008) / 0.008)
    tissue -= depth * bubble
    return tissue


def _spine(an: Anatomy, cv: Canvas) -> np.ndarray:
    """Vertebral bodies with endplates, pedicle rings and spinous processes, faint behind the mediastinum."""
    y0, height, disc = an.vertebra
    period = height + disc
    phase = ((cv.Y - y0) % period) / period  # (R, 1): position within one vertebra
    local = phase * period
    dx = cv.X - an.midline
    body = (np.abs(dx) < 0.034) & (phase < height / period)
    endplate = body & ((local < 0.004) | (local > height - 0.004))
    pedicle = ((np.abs(np.abs(dx) - 0.027) / 0.007) ** 2 + ((local - 0.4 * height) / 0.011) ** 2)
    process = (dx / 0.005) ** 2 + ((local - 0.75 * height) / 0.01) ** 2 < 1
    spine = 0.5 * body + 0.25 * endplate + 0.35 * ((pedicle > 0.45) & (pedicle < 1)) + 0.25 * process
    return _blur(spine.astype(np.float32), 0.0015)


def _bones(an: Anatomy, cv: Canvas) -> np.ndarray:
    R, m = cv.R, an.midline
    bone = np.zeros((R, R), np.float32)
    faint = np.zeros((R, R), np.float32)
    posterior, anterior, clavicles, scapulae = [], [], [], []
    s, t = np.linspace(0, 1, 22), np.linspace(0, 1, 14)
    for side in SIDES:
        lat = _lateral(side)
        for k in range(11):
            yk = an.rib_y0 + k * an.rib_dy
            end = float(_lateral_wall(an, side, yk + 0.06)) + 0.03
            # posterior rib: from the spine, briefly up, then curving down along the lateral wall
            d = 0.035 + s * (end - 0.035)
            ys = yk - 0.028 * np.sin(np.pi * s * 0.8) + 0.12 * s**3 * (end / 0.37)
            posterior.append(np.stack([m + lat * d, ys], 1))
            # anterior rib: from the lateral wall, downwards and medially to the costal cartilage
            da = end - 0.01 - t * (end - 0.11)
            anterior.append(np.stack([m + lat * da, ys[-1] + 0.01 * np.sin(np.pi * t) + t * 0.1], 1))
        # clavicle: S-shaped from the sternal notch up to the acromion
        dc = 0.04 + s * 0.29
        yc = an.clavicle_y + 0.03 - 0.075 * s + 0.012 * np.sin(2 * np.pi * s)
        clavicles.append(np.stack([m + lat * dc, yc], 1))
        scapulae.append([[m + lat * 0.33, 0.14], [m + lat * 0.38, 0.26], [m + lat * 0.355, 0.40]])
        # humeral head, mostly out of the field
        centre = tuple(int(v) for v in np.round(np.array([m + lat * 0.52, 0.18]) * R * 16))
        cv2.circle(bone, centre, int(0.07 * R * 16), 0.1, -1, cv2.LINE_AA, 4)
        cv2.circle(bone, centre, int(0.07 * R * 16), 0.06, max(1, R // 150), cv2.LINE_AA, 4)
    _tubes(bone, posterior, 0.021, 0.1)
    _tubes(bone, clavicles, 0.026, 0.15, 0.35)
    _tubes(faint, anterior, 0.026, 0.3, 0.3)
    _polylines(faint, scapulae, 0.012, 0.25)
    return _blur(bone, 0.0012) + 0.11 * (_blur(faint, 0.002) + _spine(an, cv))


def _airways(an: Anatomy, cv: Canvas) -> np.ndarray:
    airway = np.zeros((cv.R, cv.R), np.float32)
    mx, cy = an.mediastinum_x, an.carina_y
    _polylines(airway, [[an.midline, 0.0], [mx - 0.004, 0.2], [mx - 0.006, 0.28], [mx, cy]], 0.034, 1.0)
    # the right main bronchus is shorter and steeper than the left
    _polylines(airway, [[mx, cy], [mx - 0.04, cy + 0.035], [mx - 0.065, cy + 0.075]], 0.02, 0.9)
    _polylines(airway, [[mx, cy], [mx + 0.045, cy + 0.03], [mx + 0.08, cy + 0.065]], 0.018, 0.9)
    return -0.2 * _blur(airway, 0.003)


def _draw_vessels(an: Anatomy, cv: Canvas) -> None:
    for side in SIDES:
        hx, hy, lat = cv.hilum[side], an.hilum_y[side], _lateral(side)
        seg = an.vessels[side]
        curves = np.stack([hx + lat * seg[:, 0:6:2], hy + seg[:, 1:6:2]], -1)  # (n, 3, 2)
        upper = seg[:, 5] < -0.06
        for level in range(VESSEL_LEVELS):
            width = 0.0095 * 0.6**level
            for is_upper in (False, True):
                pick = (seg[:, 6] == level) & (upper == is_upper)
                scale = an.upper_vessel_scale if is_upper else 1.0
                value = 0.1 * np.sqrt(width / 0.0095) * min(scale, 1.3)  # projected depth grows with calibre
                if pick.any():
                    _polylines(cv.markings, curves[pick], width * scale, value)
        r = ((cv.X - hx + lat * 0.01) / 0.03) ** 2 + ((cv.Y - hy) / 0.055) ** 2
        cv.markings += 0.12 * np.exp(-r)  # hilar vessels seen end-on
    cv.markings += 0.018 * cv2.resize(an.texture, (cv.R, cv.R), interpolation=cv2.INTER_CUBIC)


def _base_air(cv: Canvas) -> np.ndarray:
    """Depth of aerated lung: shallow at the lateral pleura and the apex, deepest in the mid and lower lung.

    Depth is measured from the rib cage only: the diaphragm and the heart meet the beam
    tangentially, so their borders with the lung stay sharp.
    """
    dist = cv2.distanceTransform(cv.cage.astype(np.uint8), cv2.DIST_L2, 5) / cv.R
    depth = (1.0 - np.exp(-dist / 0.035)) * (0.78 + 0.22 * _sstep((cv.Y - 0.12) / 0.35))
    return (depth * cv.lung).astype(np.float32)


# ---------------------------------------------------------------- findings
def _lobe_weight(location: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if location == "right_upper_lobe":  # bounded below by the horizontal fissure: a sharp edge
        return _sstep((0.40 - v) / 0.015)
    if location == "right_middle_lobe":  # horizontal fissure above, effaces the right heart border
        return _sstep((v - 0.40) / 0.015) * _sstep((0.9 - v) / 0.25) * _sstep((1.0 - u) / 0.6)
    if location == "lingula":  # no fissure on the left: ill-defined above, effaces the left heart border
        return _sstep((v - 0.35) / 0.12) * _sstep((0.9 - v) / 0.25) * _sstep((1.0 - u) / 0.6)
    if location == "left_upper_lobe":
        return _sstep((0.55 - v) / 0.2)
    return _sstep((v - 0.42) / 0.25)  # lower lobes: the lower zone down to the hemidiaphragm, which it effaces


def _consolidation(f: Finding, an: Anatomy, cv: Canvas, rnd: np.ndarray, grid: np.ndarray) -> np.ndarray:
    side = _side_of(f.location)
    weight = _lobe_weight(f.location, cv.u[side], cv.v[side]) * (cv.envelope[side] & cv.lung)
    score = weight * (0.45 + 0.55 * _smooth_field(grid, cv.R))
    top = float(score.max())
    threshold = (0.68, 0.5, 0.25)[_severity(f)] * top
    # soft margins where the lobe weight fades, a sharp one along a fissure
    opacity = 0.95 * _sstep((score - threshold) / (0.3 * top)) * (0.85 + 0.15 * _smooth_field(grid[::-1, :5], cv.R))
    opacity = _blur(opacity, 0.002)
    mask = opacity > 0.25
    ys, xs = np.nonzero(mask)
    if len(xs):  # air bronchograms: aerated bronchi branching through the airless lobe
        cx, cy = xs.mean() / cv.R, ys.mean() / cv.R
        hx, hy = cv.hilum[side], an.hilum_y[side]
        ex, ey = cx + (rnd[:3] - 0.5) * 0.12, cy + (rnd[3:6] - 0.5) * 0.12
        mx, my = (hx + ex) / 2 + (rnd[6:9] - 0.5) * 0.04, (hy + ey) / 2
        curves = np.stack([np.stack([np.full(3, hx), mx, ex], 1), np.stack([np.full(3, hy), my, ey], 1)], -1)
        lines = np.zeros_like(opacity)
        _polylines(lines, curves, 0.0055, 1.0)
        interior = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=max(1, cv.R // 128))
        opacity -= 0.3 * _blur(lines, 0.0015) * interior
    opacity = np.clip(opacity, 0, 1)
    cv.fill[:] = np.maximum(cv.fill, opacity)
    cv.lung_extra += 0.04 * opacity  # exudate is a little denser than the air it replaces is deep
    f.measurements["area_cm2"] = _area_cm2(mask)
    return mask


def _zone_uv(location: str, rnd: np.ndarray) -> tuple[float, float]:
    band = {"upper": (0.12, 0.28), "mid": (0.42, 0.58), "lower": (0.7, 0.82)}[location.split("_")[1]]
    return 0.38 + 0.34 * float(rnd[0]), band[0] + (band[1] - band[0]) * float(rnd[1])


def _nodule(f: Finding, an: Anatomy, cv: Canvas, rnd: np.ndarray, mass: bool) -> np.ndarray:
    side = _side_of(f.location)
    cx, cy = _lung_point(an, side, *_zone_uv(f.location, rnd))
    diameter_mm = 35 + 45 * float(rnd[2]) if mass else 10 + 18 * float(rnd[2])
    radius = diameter_mm / FOV_MM / 2
    rows = _window(cy - 1.3 * radius, cy + 1.3 * radius, cv.R)
    cols = _window(cx - 1.3 * radius, cx + 1.3 * radius, cv.R)
    dx, dy = cv.X[:, cols] - cx, cv.Y[rows] - cy
    angle = np.arctan2(dy, dx)
    if mass:  # lobulated outline
        radius_map = radius * (1 + 0.1 * np.sin(3 * angle + 6 * rnd[3]) + 0.06 * np.sin(5 * angle + 6 * rnd[4]))
    else:  # well-defined, nearly round
        radius_map = radius * (1 + 0.03 * np.sin(2 * angle + 6 * rnd[3]))
    r = np.sqrt(dx**2 + dy**2) / radius_map
    body = np.sqrt(np.clip(1 - r**2, 0, 1)) * (0.45 + 0.55 * _sstep((1 - r) / 0.25))  # a solid sphere
    cv.lung_extra[rows, cols] += (0.3 if mass else 0.24) * body
    mask = np.zeros_like(cv.lung)
    mask[rows, cols] = r < 1
    f.measurements["diameter_mm"] = round(diameter_mm, 1)
    return mask & cv.envelope[side]


def _oedema(f: Finding, an: Anatomy, cv: Canvas, rnd: np.ndarray, grid: np.ndarray) -> np.ndarray:
    sev = _severity(f)
    amplitude, spread, n_lines = (0.2, 0.42, 0.72)[sev], (0.8, 1.0, 1.25)[sev], (5, 7, 9)[sev]
    haze = np.zeros_like(cv.fill)
    lines = np.zeros_like(cv.fill)
    for i, side in enumerate(SIDES):
        hx, hy = cv.hilum[side], an.hilum_y[side]
        r = ((cv.X - hx) / (0.11 * spread)) ** 2 + ((cv.Y - hy - 0.02) / (0.15 * spread)) ** 2
        haze += amplitude * np.exp(-(r**1.5)) * cv.on_side[side]  # perihilar "bat wing", sparing the periphery
        kerley = []  # Kerley B lines: short horizontal lines reaching the pleura at the lateral bases
        for k in range(n_lines):
            v = 0.66 + 0.27 * float(rnd[8 * i + k % 8]) * (k + 1) / 9
            x0, y0 = _lung_point(an, side, 1.0, min(v, 0.95))
            kerley.append([[x0, y0], [x0 - _lateral(side) * (0.018 + 0.016 * float(rnd[20 + k])), y0]])
        _polylines(lines, kerley, 0.0035, 1.0)
    haze *= (0.7 + 0.3 * _smooth_field(grid, cv.R)) * cv.lung
    cv.fill[:] = np.maximum(cv.fill, haze)
    lines *= cv.lung
    cv.markings += 0.16 * lines
    f.measurements["opacified_lung_fraction"] = float(((haze > 0.15) & cv.lung).sum()) / max(int(cv.lung.sum()), 1)
    f.measurements["kerley_b_lines"] = float(2 * n_lines)
    return (haze > 0.1) | (lines > 0.3)


def _atelectasis_shape(location: str, u: np.ndarray, v: np.ndarray, extent: float) -> np.ndarray:
    """Region of a (partially) collapsed lobe in lung coordinates; extent 1 is lobar collapse."""
    if location == "right_upper_lobe":  # elevated horizontal fissure, lobe against the mediastinum
        return (v < extent * (0.42 - 0.32 * np.clip(u, 0, 1))) & (u > -0.3)
    if location in ("right_middle_lobe", "lingula"):  # wedge effacing the heart border
        return (np.abs(v - 0.6) < extent * 0.15 * (1 - np.clip(u, 0, None) / 0.6)) & (u > -0.3)
    if location == "left_upper_lobe":  # veil-like haze, densest medially
        return (v < 0.3 + 0.45 * extent) & (u < 0.35 + 0.5 * extent) & (u > -0.3)
    # lower lobes: a triangle along the spine, apex at the hilum, base on the medial hemidiaphragm
    return (v > 0.3) & (v < 1) & (u > -0.45) & (u < extent * (v - 0.3))


PLATE_LEVEL = {"right_upper_lobe": 0.3, "left_upper_lobe": 0.38, "right_middle_lobe": 0.62, "lingula": 0.62}


def _atelectasis(f: Finding, an: Anatomy, cv: Canvas, rnd: np.ndarray) -> np.ndarray:
    side, sev = _side_of(f.location), _severity(f)
    if sev == 0:  # plate-like: a thin band, slightly oblique, in the lobe's lower part
        v0 = PLATE_LEVEL.get(f.location, 0.8) + 0.06 * float(rnd[1])
        for lift in (0.0, 0.08, 0.16, 0.24, 0.32):  # an enlarged heart can cover a lower lobe's band: draw it higher
            x0, y0 = _lung_point(an, side, 0.3 + 0.15 * float(rnd[0]), v0 - lift)
            x1, y1 = _lung_point(an, side, 0.75 + 0.15 * float(rnd[2]), v0 - lift + 0.05 * (float(rnd[3]) - 0.5))
            band = np.zeros_like(cv.fill)
            _polylines(band, [[x0, y0], [(x0 + x1) / 2, (y0 + y1) / 2 + 0.004], [x1, y1]], 0.009, 1.0)
            mask = (band > 0.3) & cv.lung
            if mask.any():
                break
        cv.fill[:] = np.maximum(cv.fill, 0.75 * _blur(band, 0.0015) * cv.lung)
    else:
        region = _atelectasis_shape(f.location, cv.u[side], cv.v[side], (0.7, 1.0)[sev - 1]) & cv.on_side[side]
        region &= (cv.envelope[side] | cv.heart) & (cv.Y < cv.floor)
        soft = _blur(region.astype(np.float32), 0.002 if f.location != "left_upper_lobe" else 0.03)
        density = (0.65, 0.85)[sev - 1] * (0.85 if f.location == "left_upper_lobe" else 1.0)
        cv.fill[:] = np.maximum(cv.fill, density * soft * cv.lung)
        cv.extra += 0.06 * density * soft * cv.lung  # the airless lobe is crowded into a smaller volume
        cv.extra += 0.1 * soft * cv.heart  # seen through the heart: the retrocardiac "sail"
        mask = region & (cv.lung | cv.heart)
    f.measurements["area_cm2"] = _area_cm2(mask)
    return mask


def _volume_loss(f: Finding, an: Anatomy) -> None:
    """Atelectasis pulls the mediastinum towards its side and raises that hemidiaphragm."""
    side, sev = _side_of(f.location), _severity(f)
    lobar = {"right_middle_lobe": 0.3, "lingula": 0.3}.get(f.location, 1.0)  # small lobes pull little
    lower = "lower" in f.location
    shift = (0.0, 0.008, 0.022)[sev] * lobar
    elevation = (0.0, 0.012, 0.03 if lower else 0.016)[sev] * lobar
    an.mediastinum_x += _lateral(side) * shift
    an.dome_y[side] -= elevation
    an.cp_y[side] -= elevation
    if sev == 2:  # the hilum follows the collapsing lobe
        an.hilum_y[side] += 0.02 if lower else -0.02 if "upper" in f.location else 0.0
    f.measurements["mediastinal_shift_mm"] = shift * FOV_MM


def _collapse(cv: Canvas, side: str, fraction: float, base_y: float, arrays: list) -> list:
    """Shrink lung content on one side towards the mediastinum and the base: erect, the air rises to the apex."""
    cx, cy = cv.mediastinum_x, base_y
    sx, sy = 1 - fraction, 1 - 0.8 * fraction
    shape = (cv.R, cv.R)
    map_x = np.ascontiguousarray(np.broadcast_to((cx + (cv.X - cx) / sx) * cv.R - 0.5, shape), np.float32)
    map_y = np.ascontiguousarray(np.broadcast_to((cy + (cv.Y - cy) / sy) * cv.R - 0.5, shape), np.float32)
    sel = cv.on_side[side]
    out = []
    for a in arrays:
        a = a.astype(np.float32)
        out.append(np.where(sel, cv2.remap(a, map_x, map_y, cv2.INTER_LINEAR, borderValue=0), a))
    return out


def _pneumothorax(f: Finding, an: Anatomy, cv: Canvas, masks: dict, rnd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Collapse the lung on one side, draw the visceral pleural line; returns (pleural air, extra air depth)."""
    side = f.side if f.side in SIDES else "right"
    fraction = (0.11, 0.26, 0.48)[_severity(f)] * (0.92 + 0.16 * float(rnd[0]))
    keys = sorted(masks)
    content = [cv.fill, cv.markings, cv.lung_extra, cv.envelope[side]] + [masks[k] for k in keys]
    warped = _collapse(cv, side, fraction, an.dome_y[side], content)
    cv.fill, cv.markings, cv.lung_extra = warped[:3]
    for k, m in zip(keys, warped[4:]):
        masks[k] = m > 0.5
    collapsed = (warped[3] > 0.5) & cv.lung
    space = cv.lung & cv.on_side[side] & ~collapsed
    cv.markings *= ~space  # no lung markings beyond the pleural line
    cv.fill = np.where(collapsed, np.maximum(cv.fill, 0.12), cv.fill)  # the collapsed lung is denser
    kernel = np.ones((3, 3), np.uint8)
    edge = collapsed & ~cv2.erode(collapsed.astype(np.uint8), kernel).astype(bool)
    interior = cv2.erode(cv.lung.astype(np.uint8), kernel, iterations=2).astype(bool)
    cv.extra += 0.2 * _blur((edge & interior & cv.on_side[side]).astype(np.float32), 0.0012)
    R = cv.R
    f.measurements["rim_width_mm"] = float(space[int(an.hilum_y[side] * R)].sum()) / R * FOV_MM
    apex_col = int((an.midline + _lateral(side) * an.apex_d[side]) * R)
    f.measurements["apical_distance_mm"] = float(space[:, apex_col].sum()) / R * FOV_MM
    return space, 0.12 * space  # pleural air is darker than aerated lung


def _effusion(f: Finding, an: Anatomy, cv: Canvas, rnd: np.ndarray) -> np.ndarray:
    sev = _severity(f)
    sides = SIDES if f.side == "bilateral" else (f.side if f.side in SIDES else "right",)
    mask = np.zeros_like(cv.lung)
    heights = []
    for i, side in enumerate(sides):
        height = (0.065, 0.17, 0.33)[sev] * (0.9 + 0.2 * float(rnd[i]))  # fluid top above the angle, laterally
        meniscus = (0.035, 0.08, 0.1)[sev]
        top = an.cp_y[side] - height + meniscus * (1 - np.clip(cv.u[side], 0, 1) ** 2.5)  # climbs the lateral wall
        fluid = _sstep((cv.Y - top) / 0.02) * cv.envelope[side]
        side_mask = (fluid > 0.3) & cv.lung
        cv.fill[:] = np.maximum(cv.fill, fluid)
        cv.extra += 0.04 * fluid * cv.lung + 0.05 * _sstep((cv.Y - top) / 0.08) * cv.envelope[side] * cv.heart
        mask |= side_mask
        ys = np.nonzero(side_mask.any(axis=1))[0]
        heights.append((ys.max() - ys.min() + 1) / cv.R * FOV_MM if len(ys) else 0.0)
    f.measurements["fluid_height_mm"] = float(max(heights))
    return mask


# ---------------------------------------------------------------- rendering
def _cardiothoracic_ratio(an: Anatomy, cv: Canvas) -> tuple[float, float, float]:
    """(MRD + MLD) / maximal internal thoracic diameter, from the drawn masks; also both widths in mm."""
    heart_cols = np.nonzero((cv.heart & (cv.Y < cv.floor)).any(axis=0))[0]
    mid = an.midline * cv.R - 0.5
    cardiac = float((mid - heart_cols.min()) + (heart_cols.max() - mid) + 1)
    thorax = cv.envelope["right"] | cv.envelope["left"]
    cols = np.arange(cv.R)[None, :]
    rows = thorax.any(axis=1)
    widths = np.where(thorax, cols, -1).max(axis=1) - np.where(thorax, cols, cv.R).min(axis=1) + 1
    internal = float(widths[rows].max())
    return cardiac / internal, cardiac / cv.R * FOV_MM, internal / cv.R * FOV_MM


def _enlarge_heart(f: Finding, an: Anatomy, rnd: np.ndarray) -> None:
    target = (0.51, 0.565, 0.625)[_severity(f)] + 0.04 * float(rnd[0])  # drawn CTR is about 0.02 higher
    scale = target * (an.half_width["right"] + an.half_width["left"]) / (an.heart_right + an.heart_left)
    an.heart_right *= scale
    an.heart_left *= scale
    an.heart_height *= 1 + 0.4 * (scale - 1)
    an.heart_cy -= 0.02 * (scale - 1)


def render(findings: list[Finding], size: int, rng: np.random.Generator) -> Rendered:
    """Draw a PA chest radiograph with the given findings; returns them with bbox and measurements."""
    an = sample_anatomy(rng, size)
    R = max(256, 3 * size // 2 // 16 * 16)  # supersampled: smooth edges, fine lines
    draws = [(rng.random(32), rng.random((12, 12))) for _ in findings]  # same amount whatever the attributes
    out = [f.copy() for f in findings]

    for (rnd, _), f in zip(draws, out):  # geometry first
        if f.name == "cardiomegaly":
            _enlarge_heart(f, an, rnd)
        elif f.name == "atelectasis":
            _volume_loss(f, an)
        elif f.name == "pulmonary_edema":
            an.upper_vessel_scale = (1.25, 1.35, 1.35)[_severity(f)]

    cv = _build_canvas(an, R)
    _draw_vessels(an, cv)
    masks: dict[int, np.ndarray] = {}
    for i, ((rnd, grid), f) in enumerate(zip(draws, out)):  # then lung content
        if f.name == "consolidation":
            masks[i] = _consolidation(f, an, cv, rnd, grid)
        elif f.name in ("nodule", "mass"):
            masks[i] = _nodule(f, an, cv, rnd, f.name == "mass")
        elif f.name == "pulmonary_edema":
            masks[i] = _oedema(f, an, cv, rnd, grid)
        elif f.name == "atelectasis":
            masks[i] = _atelectasis(f, an, cv, rnd)
    air = _base_air(cv)
    pleural_air = np.zeros_like(air)
    for i, ((rnd, _), f) in enumerate(zip(draws, out)):  # then the pleural space
        if f.name == "pneumothorax":
            masks[i], more_air = _pneumothorax(f, an, cv, masks, rnd)
            pleural_air += more_air
    for i, ((rnd, _), f) in enumerate(zip(draws, out)):
        if f.name == "pleural_effusion":
            masks[i] = _effusion(f, an, cv, rnd)
    ctr, cardiac_mm, thoracic_mm = _cardiothoracic_ratio(an, cv)
    for i, f in enumerate(out):
        if f.name == "cardiomegaly":
            masks[i] = cv.heart & (cv.Y < cv.floor)
            f.measurements.update(cardiothoracic_ratio=ctr, cardiac_width_mm=cardiac_mm)

    # projected density, then the film
    lung_soft = _blur(cv.lung.astype(np.float32), 0.002)
    fill = np.clip(cv.fill, 0, 1)
    density = _body(an, cv) + _bones(an, cv) + _airways(an, cv) * (1 - lung_soft) + cv.extra
    density -= (AIR_DENSITY * _blur(air, 0.0015) + pleural_air) * (1 - fill) * lung_soft
    density += (_blur(cv.markings, 0.0012) * (1 - fill) + cv.lung_extra) * lung_soft
    gain, gamma, sigma = an.exposure
    sigma *= float(np.clip(np.sqrt(size / 256), 0.5, 1.0))  # a downsampled film shows less grain
    small = np.clip(cv2.resize(density, (size, size), interpolation=cv2.INTER_AREA) * gain, 0, None)
    small = ((1.0 - np.exp(-2.0 * small)) / (1.0 - np.exp(-2.0))) ** (1.4 * gamma)  # film curve: toe and shoulder
    grain = cv2.GaussianBlur(an.grain, (0, 0), 0.6) * 1.6 + an.grain * 0.4
    image = np.clip((0.03 + 0.95 * small + sigma * grain) * 255.0, 0, 255).astype(np.uint8)

    for i, f in enumerate(out):
        f.bbox = bbox_of(masks[i]) if i in masks else None
    measurements = {"cardiothoracic_ratio": ctr, "cardiac_width_mm": cardiac_mm, "thoracic_width_mm": thoracic_mm}
    return Rendered(image=image, findings=out, measurements=measurements)


# ---------------------------------------------------------------- report vocabulary
LOBE_WORDS = {
    "right_upper_lobe": ("right upper lobe", "RUL"),
    "right_middle_lobe": ("right middle lobe", "RML"),
    "right_lower_lobe": ("right lower lobe", "RLL"),
    "left_upper_lobe": ("left upper lobe", "LUL"),
    "lingula": ("lingula",),
    "left_lower_lobe": ("left lower lobe", "LLL"),
}
ZONE_WORDS = {z: (z.replace("_", " "), z.replace("_zone", " lung zone").replace("_", " ")) for z in ZONES}

FINDINGS = {
    spec.name: spec
    for spec in (
        FindingSpec(
            name="cardiomegaly",
            terms=("cardiomegaly", "cardiac enlargement", "enlargement of the cardiac silhouette"),
            templates=(
                "{severity} {term}",
                "{severity} {term}, cardiothoracic ratio {cardiothoracic_ratio}",
                "{severity} {term} (CTR {cardiothoracic_ratio})",
                "{severity} {term} with a cardiothoracic ratio of {cardiothoracic_ratio}",
            ),
            severities=("mild", "moderate", "severe"),
            severity_words={"mild": ("mild",), "moderate": ("moderate",), "severe": ("marked", "severe")},
        ),
        FindingSpec(
            name="pleural_effusion",
            terms=("pleural effusion", "effusion"),
            bilateral_terms=("pleural effusions", "effusions"),
            templates=(
                "{severity} {side} {term}",
                "{side} {term}, {severity} in size",
                "{severity} {side} {term} with a meniscus",
                "{severity} {side} {term} with a meniscus sign",
            ),
            sides=("left", "right", "bilateral"),
            severities=("mild", "moderate", "severe"),
            severity_words={"mild": ("small",), "moderate": ("moderate",), "severe": ("large",)},
            excludes=("pneumothorax",),  # together they would be a hydropneumothorax, drawn differently
        ),
        FindingSpec(
            name="consolidation",
            terms=("consolidation", "airspace consolidation", "airspace opacity"),
            templates=(
                "{severity} {term} in the {location}",
                "{severity} {term} within the {location}",
                "{severity} {term} in the {location} with air bronchograms",
            ),
            locations=LOBES,
            severities=("mild", "moderate", "severe"),
            severity_words={"mild": ("patchy", "mild"), "moderate": ("moderate",), "severe": ("extensive", "dense")},
            location_words=LOBE_WORDS,
        ),
        FindingSpec(
            name="nodule",
            terms=("pulmonary nodule", "nodule", "nodular opacity"),
            templates=(
                "{term} in the {location}",
                "{diameter_mm} mm {term} in the {location}",
                "well-defined {term} in the {location}, measuring {diameter_mm} mm",
                "{term} measuring {diameter_mm} mm in the {location}",
            ),
            locations=ZONES,
            location_words=ZONE_WORDS,
        ),
        FindingSpec(
            name="mass",
            terms=("mass", "pulmonary mass", "lung mass"),
            templates=(
                "{term} in the {location}",
                "{diameter_mm} mm {term} in the {location}",
                "lobulated {term} in the {location} measuring {diameter_mm} mm",
                "{term} in the {location}, {diameter_mm} mm in diameter",
            ),
            locations=ZONES,
            location_words=ZONE_WORDS,
        ),
        FindingSpec(
            name="pneumothorax",
            terms=("pneumothorax", "PTX"),
            templates=(
                "{severity} {side} {term}",
                "{side} {term}, {severity} in size",
                "{severity} {side} {term} with a visible visceral pleural line",
                "{severity} {side} {term}, interpleural distance {rim_width_mm} mm at the level of the hilum",
            ),
            sides=("left", "right"),
            severities=("mild", "moderate", "severe"),
            severity_words={"mild": ("small",), "moderate": ("moderate",), "severe": ("large",)},
            excludes=("pleural_effusion",),
        ),
        FindingSpec(
            name="pulmonary_edema",
            terms=("pulmonary oedema", "pulmonary edema"),
            templates=(
                "{severity} {term}",
                "{severity} {term} with Kerley B lines",
                "{severity} {term} with upper lobe blood diversion",
                "{severity} bilateral {term}",
            ),
            severities=("mild", "moderate", "severe"),
            severity_words={
                "mild": ("mild", "mild interstitial"),
                "moderate": ("moderate",),
                "severe": ("severe", "florid"),
            },
        ),
        FindingSpec(
            name="atelectasis",
            terms=("atelectasis", "atelectatic change"),
            templates=(
                "{severity} {term} in the {location}",
                "{severity} {term} within the {location}",
                "{severity} {term} involving the {location}",
            ),
            locations=LOBES,
            severities=("mild", "moderate", "severe"),
            severity_words={
                "mild": ("plate-like", "linear", "discoid"),
                "moderate": ("segmental",),
                "severe": ("lobar", "complete lobar"),
            },
            location_words=LOBE_WORDS,
        ),
    )
}

SPEC = PhantomSpec(
    name="cxr",
    channels=1,
    findings=FINDINGS,
    render=render,
    techniques=(
        "Chest radiograph, PA view.",
        "PA chest X-ray.",
        "CXR PA.",
        "Frontal chest radiograph (PA projection).",
        "Chest X-ray, posteroanterior erect.",
    ),
    normal_statements=(
        "The lungs are clear. Heart size is normal. No pleural effusion or pneumothorax.",
        "Clear lungs. Normal cardiomediastinal contours. Costophrenic angles are sharp.",
        "Heart size and mediastinal contours are within normal limits. The lungs are clear.",
        "No focal airspace opacity, effusion or pneumothorax. Cardiac size is normal.",
    ),
    impression_normal=(
        "Normal chest radiograph.",
        "No acute cardiopulmonary abnormality.",
        "No active disease in the chest.",
        "Normal study.",
    ),
)
