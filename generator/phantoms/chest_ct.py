"""Chest CT phantom: one axial slice at the level of the carina, displayed in lung window.

Anatomy model. Everything is drawn in Hounsfield units (HU) on a millimetre grid and only
then windowed (W1500/L-600) to grey levels, so relative brightness is physical: air and
trachea dark, lung parenchyma dark grey, fat light grey, muscle, vessels and fluid
near-white, bone white. The body is a superellipse (rounded front, flatter back) lying on a
curved scanner table; inside the skin lie subcutaneous fat, chest-wall muscle with a fat
plane, the sternum, rib segments cut obliquely (costal cartilage anteriorly), scapulae
posterolaterally and the thoracic vertebra with its posterior arch and the paraspinal
muscles. The thoracic cavity is a second superellipse indented by the spine. The
mediastinum at carina level holds the ascending aorta, superior vena cava, pulmonary trunk
with right and left pulmonary arteries, the carina with both main bronchi, the oesophagus,
azygos vein and descending aorta, embedded in mediastinal fat. The lungs are the cavity
minus mediastinum and spine; each is split by its major (oblique) fissure into the upper
lobe (anterior) and the superior segment of the lower lobe (posterior), the only lobes cut
at this level. Pulmonary vessels are branching trees from each hilum plus vessels seen end
on as dots, thinning towards the periphery; parenchyma is denser in dependent (posterior)
lung. CT noise is spatially correlated Gaussian noise in HU.

Findings are layers on the lung: pleural findings (effusion, pneumothorax) first claim the
pleural space, then parenchymal findings are placed in the remaining aerated lung, so every
combination composes and every bbox marks something visible. Ground-glass opacity raises
attenuation but leaves vessels visible; consolidation reaches soft-tissue density, hides
vessels and keeps air bronchograms; emphysema punches wall-less (centrilobular) or
subpleural thin-walled (paraseptal) lucencies, upper-lobe predominant.

Conventions. Standard axial display seen from the feet: anterior at the top, the patient's
back at the bottom, patient's right on the viewer's left. Field of view: the square image is
the reconstruction field, sized to the patient (about 1.15x the body width, typically
330-420 mm); ``Rendered.measurements`` gives ``fov_mm`` and ``pixel_spacing_mm``.
Measurements: ``diameter_mm`` (nodule: mean diameter; mass: long axis), ``effusion_depth_mm``
and ``pneumothorax_depth_mm`` (largest thickness perpendicular to the pleura),
``emphysema_fraction`` (share of the involved lung's pixels on this slice that are
emphysematous), ``affected_lung_fraction`` for ground glass (share of the involved lung),
``area_cm2`` and ``lobe_fraction`` for consolidation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from ..errors import UserError
from .base import Finding, FindingSpec, PhantomSpec, Rendered, bbox_of

WINDOW_LEVEL_HU = -600.0
WINDOW_WIDTH_HU = 1500.0
HU_AIR, HU_LUNG, HU_FAT, HU_MUSCLE, HU_SOFT = -1000.0, -860.0, -100.0, 50.0, 40.0
HU_FLUID, HU_BONE, HU_CARTILAGE = 12.0, 650.0, 130.0
HU_GGO, HU_CONSOLIDATION, HU_EMPHYSEMA = -500.0, 35.0, -985.0

LOBES = ("right_upper_lobe", "right_lower_lobe", "left_upper_lobe", "left_lower_lobe")
SEVERITIES = ("mild", "moderate", "severe")
SIGN = {"right": -1.0, "left": 1.0}  # patient's right lies on the viewer's left (x < 0)


# ----------------------------------------------------------------------------- grid helpers
class _Grid:
    """Square millimetre grid, origin at the image centre, x to the viewer's right, y posterior."""

    def __init__(self, n: int, fov_mm: float):
        self.n, self.fov, self.mm = n, fov_mm, fov_mm / n
        c = ((np.arange(n, dtype=np.float32) + 0.5) * self.mm - fov_mm / 2).astype(np.float32)
        self.x, self.y = c[None, :], c[:, None]

    def px(self, pts_mm) -> np.ndarray:
        """mm points -> fixed-point (shift 4) pixel coordinates for cv2 drawing."""
        p = (np.asarray(pts_mm, np.float32) + self.fov / 2) / self.mm - 0.5
        return np.round(p * 16).astype(np.int32)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 <= 1.0

    def dist_mm(self, mask: np.ndarray) -> np.ndarray:
        """Distance (mm) from every pixel inside ``mask`` to the nearest pixel outside it."""
        return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5) * self.mm

    def canvas(self) -> np.ndarray:
        return np.zeros((self.n, self.n), np.uint8)

    def line(self, img, p0, p1, width_mm: float) -> None:
        self.lines(img, np.asarray(p0, np.float32)[None], np.asarray(p1, np.float32)[None], [width_mm])

    def disc(self, img, centre, radius_mm: float, value: int = 255) -> None:
        self.dots(img, np.asarray(centre, np.float32)[None], np.array([radius_mm]), value)

    def lines(self, img, p0, p1, widths_mm) -> None:
        """Many antialiased segments in few cv2 calls, grouped by drawn width and partial volume."""
        w_px = np.asarray(widths_mm, np.float32) / self.mm
        thick = np.maximum(1, np.round(w_px)).astype(int)
        value = (np.round(8 * np.minimum(1.0, w_px)) * 31.875).astype(int)  # sub-pixel: fainter
        segs = np.stack([self.px(p0), self.px(p1)], 1)
        for t, v in set(zip(thick.tolist(), value.tolist())):
            sel = (thick == t) & (value == v)
            cv2.polylines(img, list(segs[sel]), False, v, t, cv2.LINE_AA, 4)

    def dots(self, img, centres, radii_mm, value: int = 255) -> None:
        """Many filled discs; a dot smaller than a pixel only tints its pixel (partial volume)."""
        centres = np.asarray(centres, np.float32).reshape(-1, 2)
        diameter = 2 * np.broadcast_to(np.asarray(radii_mm, np.float32), len(centres)) / self.mm
        small = diameter < 1.6
        ij = np.clip(np.round((centres[small] + self.fov / 2) / self.mm - 0.5).astype(int), 0, self.n - 1)
        np.maximum.at(img, (ij[:, 1], ij[:, 0]), np.round(value * np.minimum(1, 0.8 * diameter[small] ** 2)).astype(np.uint8))
        centre_px = self.px(centres[~small])
        thick = np.maximum(1, np.round(diameter[~small] - 1)).astype(int)  # AA adds about a pixel
        for t in set(thick.tolist()):
            sel = centre_px[thick == t]
            cv2.polylines(img, list(np.stack([sel, sel], 1)), False, value, t, cv2.LINE_AA, 4)

    def poly(self, img, pts_mm, value: int = 255) -> None:
        cv2.fillPoly(img, [self.px(pts_mm)], value, cv2.LINE_AA, 4)

    def disk_kernel(self, radius_mm: float) -> np.ndarray:
        r = max(1, int(round(radius_mm / self.mm)))
        return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _superellipse(g: _Grid, cx, cy, ax, ay_ant, ay_post, p_ant, p_post) -> np.ndarray:
    """Normalised radius of a superellipse with different anterior and posterior halves."""
    post = g.y >= cy
    ay = np.where(post, ay_post, ay_ant).astype(np.float32)
    p = np.where(post, p_post, p_ant).astype(np.float32)
    return (np.abs(g.x - cx) / ax) ** p + (np.abs(g.y - cy) / ay) ** p  # <= 1 inside


def _outline(shape: dict, t: np.ndarray, side: float) -> np.ndarray:
    """Boundary points of a superellipse, t from -90 deg (anterior) to 90 deg (posterior)."""
    s, c = np.sin(t), np.abs(np.cos(t))
    post = s >= 0
    p = np.where(post, shape["p_post"], shape["p_ant"])
    ay = np.where(post, shape["ay_post"], shape["ay_ant"])
    x = side * shape["ax"] * c ** (2 / p)
    y = shape["cy"] + ay * np.sign(s) * np.abs(s) ** (2 / p)
    return np.stack([x, y], 1)


def _offset(pts: np.ndarray, d_mm: float, centre_y: float) -> np.ndarray:
    """Move outline points ``d_mm`` along their outward normal."""
    tan = np.gradient(pts, axis=0)
    nrm = np.stack([tan[:, 1], -tan[:, 0]], 1)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True) + 1e-9
    outward = np.sign(np.sum(nrm * (pts - [0.0, centre_y]), axis=1, keepdims=True))
    return pts + outward * nrm * d_mm


def _smooth_noise(rng: np.random.Generator, g: _Grid, sigma_mm: float) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ``sigma_mm``."""
    field_ = cv2.GaussianBlur(rng.standard_normal((g.n, g.n), dtype=np.float32), (0, 0), sigma_mm / g.mm)
    return field_ / (field_.std() + 1e-6)


# ----------------------------------------------------------------------------- normal anatomy
@dataclass
class _Thorax:
    g: _Grid
    hu: np.ndarray  # body wall, mediastinum, table and air in HU
    lung: dict[str, np.ndarray]  # "right"/"left" -> bool mask
    lobes: dict[str, np.ndarray]
    hilum: dict[str, tuple[float, float]]
    cavity: np.ndarray
    vessels: np.ndarray  # vessel occupancy 0..1 inside lung
    parenchyma: np.ndarray  # lung HU before vessels
    measurements: dict[str, float] = field(default_factory=dict)


def _build_thorax(n: int, rng: np.random.Generator) -> _Thorax:
    u = rng.uniform
    half_width = u(150, 182)
    fov = 2 * half_width * u(1.1, 1.2)
    g = _Grid(n, fov)
    mm = g.mm

    # Body and its layers; "obesity" couples the fat thicknesses.
    obesity = u(0, 1)
    body = dict(ax=half_width, cy=-u(15, 25), p_ant=u(2.0, 2.3), p_post=u(2.7, 3.3))
    body["ay_ant"] = half_width * u(0.62, 0.72)
    body["ay_post"] = body["ay_ant"] * u(1.0, 1.1)
    fat_ant, fat_lat, fat_post = 5 + 12 * obesity, 7 + 20 * obesity, 6 + 10 * obesity
    inner = dict(body, ax=body["ax"] - fat_lat, ay_ant=body["ay_ant"] - fat_ant, ay_post=body["ay_post"] - fat_post)
    top, bottom = body["cy"] - body["ay_ant"], body["cy"] + body["ay_post"]
    cav_top = top + fat_ant + u(12, 18)
    cav_bottom = bottom - fat_post - u(30, 37)
    cav_cy = cav_top + 0.48 * (cav_bottom - cav_top)
    cavity_shape = dict(ax=inner["ax"] - u(13, 19), cy=cav_cy, ay_ant=cav_cy - cav_top, ay_post=cav_bottom - cav_cy,
                        p_ant=u(2.1, 2.4), p_post=u(2.6, 3.0))

    def shape_mask(s: dict) -> np.ndarray:
        return _superellipse(g, 0.0, s["cy"], s["ax"], s["ay_ant"], s["ay_post"], s["p_ant"], s["p_post"]) <= 1.0

    hu = np.full((n, n), HU_AIR, np.float32)
    # Curved carbon-fibre table (bright shells, foam core) under the patient's back.
    table_top = bottom + u(0.5, 3) - 0.0006 * g.x**2
    depth = g.y - table_top

    def band(a: float, b: float) -> np.ndarray:  # pixel coverage of a thin layer: no aliasing
        return np.clip(np.minimum(depth - a, b - depth) / mm + 0.5, 0, 1)

    hu += band(0, 12) * (-700.0 - hu)
    hu += np.maximum(band(0, 2), band(10, 12)) * (60.0 - hu)

    body_mask = shape_mask(body)
    inner_mask = shape_mask(inner)
    cavity = shape_mask(cavity_shape)
    hu[body_mask] = HU_FAT + 10 * u(-1, 1)
    hu[inner_mask] = HU_MUSCLE
    skin = body_mask & ~cv2.erode(body_mask.astype(np.uint8), g.disk_kernel(1.5)).astype(bool)
    hu[skin] = HU_SOFT
    # Fat plane between the pectoral / chest-wall muscle layers, anterior half only.
    out_dist = g.dist_mm(~cavity)
    plane = u(8, 13)
    hu[inner_mask & (np.abs(out_dist - plane) < 0.8) & (g.y < cav_cy)] = HU_FAT

    # Spine: vertebral body, canal, posterior arch, transverse and spinous processes.
    vb_r = u(15, 19)
    vb_y = cav_bottom - u(28, 35)
    canal_y, canal_r = vb_y + vb_r + 8, u(7, 9)
    spine_block = g.ellipse(0, vb_y + 40, u(36, 40), 30) | g.ellipse(0, vb_y, vb_r + 3, vb_r + 3)
    erector = np.abs((g.x / 50) ** 2 + ((g.y - vb_y - 46) / 32) ** 2 - 1) < 0.06
    hu[inner_mask & erector & (g.y > vb_y + 20)] = HU_FAT  # fat plane around the erector spinae
    hu[cavity] = HU_LUNG
    hu[spine_block & inner_mask] = HU_MUSCLE
    bone = g.canvas()
    arch_y = canal_y + canal_r + 3
    for sx in (-1, 1):  # pedicle and lamina around the canal, transverse process out to the rib
        pedicle = (sx * (canal_r + 2.5), canal_y - 2)
        g.line(bone, (sx * vb_r * 0.55, vb_y + vb_r * 0.7), pedicle, 5)
        g.line(bone, pedicle, (0, arch_y), 4.5)
        g.line(bone, pedicle, (sx * u(28, 33), canal_y + u(-2, 4)), 5.5)
    g.line(bone, (0, arch_y), (0, arch_y + u(22, 30)), 5)  # spinous process
    g.disc(bone, (0, vb_y), vb_r)

    # Sternum and ribs: oblique rib segments just outside the cavity, cartilage anteriorly.
    sternum_y = cav_top - 7
    g.poly(bone, np.stack([u(12, 16) * np.cos(np.linspace(0, 2 * np.pi, 24)),
                           sternum_y + 6 * np.sin(np.linspace(0, 2 * np.pi, 24))], 1))
    cartilage = g.canvas()
    for side in (-1.0, 1.0):
        t = np.radians(u(72, 80))
        while t > np.radians(-72):
            span = np.radians(u(13, 21))
            ts = np.linspace(t - span, t, 10)
            pts = _outline(cavity_shape, ts, side)
            thick = u(6, 9)
            ring = np.concatenate([_offset(pts, 1.5, cav_cy), _offset(pts, 1.5 + thick, cav_cy)[::-1]])
            g.poly(cartilage if t - span / 2 < np.radians(-48) else bone, ring)
            t -= span + np.radians(u(9, 16))
        # Scapula: a thin bony bar lying on the posterolateral ribs.
        ts = np.radians(np.linspace(u(35, 42), u(62, 70), 8))
        scap = _offset(_outline(cavity_shape, ts, side), u(15, 20), cav_cy)
        scap_img = g.canvas()
        cv2.polylines(scap_img, [g.px(scap)], False, 255, max(1, int(round(4 / mm))), cv2.LINE_AA, 4)
        bone = np.maximum(bone, scap_img * inner_mask)
    hu += (cartilage / 255.0) * (HU_CARTILAGE - hu)
    hu += (bone / 255.0) * (HU_BONE - hu)
    hu[g.ellipse(0, canal_y, canal_r, canal_r * 0.9)] = 15.0  # thecal sac

    # Mediastinum at carina level, positions relative to the carina.
    cx0, cy0 = u(-3, 3), vb_y - vb_r - u(11, 16)

    def at(dx, dy):
        return cx0 + dx, cy0 + dy

    vessel_img = g.canvas()
    structures = [((-14, -34), u(14, 18)), ((14, -30), u(12, 15)), ((25, 21), u(11, 14)), ((-12, 14), 4.5),
                  ((7, 12), 6.5)]  # ascending aorta, pulmonary trunk, descending aorta, azygos, oesophagus
    for (dx, dy), r in structures:
        g.disc(vessel_img, at(dx, dy), r)
    g.poly(vessel_img, np.array(at(-36, -24)) + np.stack([9 * np.cos(np.linspace(0, 6.28, 16)),
                                                          11 * np.sin(np.linspace(0, 6.28, 16))], 1))  # SVC
    g.line(vessel_img, at(18, -24), at(40, -6), 16)  # left pulmonary artery
    g.line(vessel_img, at(0, -16), at(-36, -12), 14)  # right pulmonary artery
    bronchi = [(at(-10, 1), u(7, 8)), (at(10, 2), u(6.5, 7.5))]
    for c, r in bronchi:
        g.disc(vessel_img, c, r + 1.8)
    med = cv2.dilate(vessel_img, g.disk_kernel(u(3, 5)))
    g.poly(med, [at(-16, cav_top - cy0), at(16, cav_top - cy0), at(28, -40), at(-30, -40)])  # anterior fat
    g.poly(med, [at(-6, cav_top - cy0), at(6, cav_top - cy0), (6, vb_y), (-6, vb_y)])  # midline junction
    med = cv2.morphologyEx(med, cv2.MORPH_CLOSE, g.disk_kernel(9)) > 127
    med &= cavity
    hu[med] = HU_FAT + 15
    hu += (vessel_img / 255.0) * (HU_SOFT - hu) * med
    lumen = g.canvas()
    for c, r in bronchi:
        g.disc(lumen, c, r)
    hu += (lumen / 255.0) * (HU_AIR + 20 - hu)

    lung_mask = cavity & ~med & ~spine_block & (bone < 128)
    lungs = {"right": lung_mask & (g.x < cx0), "left": lung_mask & (g.x >= cx0)}
    hilum = {"right": at(-44, -6), "left": at(46, -3)}

    # Major fissures: upper lobe anterior, superior segment of the lower lobe posterior.
    lobes, fissure = {}, g.canvas()
    for side, sx in SIGN.items():
        medial = np.array([cx0 + sx * u(24, 32), cy0 + u(2, 10)])
        lateral = _outline(cavity_shape, np.radians([u(12, 30)]), sx)[0]
        bow = u(6, 14)
        tt = np.clip((g.x - medial[0]) / (lateral[0] - medial[0]), 0, 1)
        y_fissure = medial[1] + tt * (lateral[1] - medial[1]) - bow * 4 * tt * (1 - tt)
        lower = lungs[side] & (g.y > y_fissure)
        lobes[f"{side}_upper_lobe"], lobes[f"{side}_lower_lobe"] = lungs[side] & ~lower, lower
        ts = np.linspace(0, 1, 12)
        pts = np.stack([medial[0] + ts * (lateral[0] - medial[0]),
                        medial[1] + ts * (lateral[1] - medial[1]) - bow * 4 * ts * (1 - ts)], 1)
        cv2.polylines(fissure, [g.px(pts)], False, int(255 * min(1, 0.7 / mm)), 1, cv2.LINE_AA, 4)

    vessels = np.maximum(_vessel_trees(g, rng, lungs, hilum), fissure / 255.0 * 0.35) * lung_mask
    cav_span = cavity_shape["ay_ant"] + cavity_shape["ay_post"]
    gravity = (g.y - (cav_cy - cavity_shape["ay_ant"])) / cav_span  # 0 anterior .. 1 posterior
    parenchyma = HU_LUNG + u(-25, 25) + 70 * np.clip(gravity, 0, 1) ** 2 + 12 * _smooth_noise(rng, g, 1.5)
    measurements = {
        "fov_mm": fov,
        "thorax_transverse_diameter_mm": 2 * cavity_shape["ax"],
        "thorax_ap_diameter_mm": cav_span,
        "lung_area_cm2": float(lung_mask.sum()) * mm * mm / 100,
    }
    return _Thorax(g, hu, lungs, lobes, hilum, cavity, vessels.astype(np.float32), parenchyma.astype(np.float32),
                   measurements)


def _vessel_trees(g: _Grid, rng: np.random.Generator, lungs: dict, hilum: dict):
    """Vessel occupancy: branching trees from each hilum, cut in and out of plane, plus end-on dots."""
    img = g.canvas()
    for side, sx in SIGN.items():
        base = np.pi if sx < 0 else 0.0
        k = int(rng.integers(5, 8))
        ang = base + sx * (np.linspace(-1.9, 1.9, k) + rng.uniform(-0.15, 0.15, k))
        p = np.repeat(np.asarray(hilum[side], np.float32)[None], k, 0)
        length, radius = rng.uniform(18, 28, k), rng.uniform(2.0, 2.8, k)
        segments, dots = [], []
        while len(p):  # one generation at a time; only part of the tree lies in the slice plane
            bend = ang + rng.uniform(-0.25, 0.25, len(p))  # gently curving, tapering vessels
            mid = p + 0.5 * length[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1)
            q = mid + 0.5 * length[:, None] * np.stack([np.cos(bend), np.sin(bend)], 1)
            in_plane = (radius > 1.3) | (rng.random(len(p)) < 0.45)
            segments += [(p[in_plane], mid[in_plane], 2 * radius[in_plane]),
                         (mid[in_plane], q[in_plane], 1.7 * radius[in_plane])]
            dots.append((q[~in_plane], radius[~in_plane] * rng.uniform(0.9, 1.3, (~in_plane).sum())))
            grow = radius > 0.5
            m = int(grow.sum())
            turn = np.concatenate([-np.ones(m), np.ones(m)])
            p, bend = np.concatenate([q[grow]] * 2), np.concatenate([bend[grow]] * 2)
            ang = bend + turn * rng.uniform(0.2, 0.55, 2 * m)
            length = np.concatenate([length[grow]] * 2) * rng.uniform(0.8, 1.0, 2 * m)
            radius = np.concatenate([radius[grow]] * 2) * rng.uniform(0.64, 0.76, 2 * m)
        g.lines(img, *(np.concatenate(parts) for parts in zip(*segments)))
        g.dots(img, *(np.concatenate(parts) for parts in zip(*dots)))
        # Small peripheral vessels seen end on: faint dots.
        ys, xs = np.nonzero(lungs[side])
        if len(xs) == 0:
            continue
        count = int(len(xs) * g.mm * g.mm / 120)
        pick = rng.integers(0, len(xs), count)
        g.dots(img, np.stack([g.x[0, xs[pick]], g.y[ys[pick], 0]], 1), rng.uniform(0.4, 1.0, count))
    return img / 255.0 * (lungs["right"] | lungs["left"])


# ----------------------------------------------------------------------------- findings
@dataclass
class _Layers:
    """Per-pixel finding layers over the lung, composed in a fixed physical order."""

    n: int

    def __post_init__(self):
        zeros = lambda: np.zeros((self.n, self.n), np.float32)  # noqa: E731
        self.ggo, self.consolidation, self.bronchogram = zeros(), zeros(), zeros()
        self.emphysema, self.bulla_walls, self.solid = zeros(), zeros(), zeros()
        self.atelectasis, self.pleural_line, self.density = zeros(), zeros(), zeros()
        self.fluid = np.zeros((self.n, self.n), bool)
        self.air = np.zeros((self.n, self.n), bool)
        self.reserved = np.zeros((self.n, self.n), bool)  # lobe cores kept aerated for requested lesions


def _sides(side: str) -> list[str]:
    return ["right", "left"] if side == "bilateral" else [side]


def _lung_rows(g: _Grid, mask: np.ndarray) -> tuple[float, float]:
    rows = np.nonzero(mask.any(1))[0]
    return float(g.y[rows[0], 0]), float(g.y[rows[-1], 0])


def _pick_pixels(g: _Grid, rng: np.random.Generator, weight: np.ndarray, count: int = 1) -> np.ndarray:
    """``count`` pixel centres (mm) drawn with probability proportional to ``weight``."""
    cdf = np.cumsum(weight.ravel(), dtype=np.float64)
    idx = np.minimum(np.searchsorted(cdf, rng.random(count) * cdf[-1], side="right"), cdf.size - 1)
    return np.stack([g.x[0, idx % g.n], g.y[idx // g.n, 0]], 1)


def _pleural_collection(th, lay, aerated, f, rng, *, fluid: bool) -> tuple[np.ndarray, float]:
    """Effusion layers dependently (posterior); pneumothorax air rises anteriorly (supine)."""
    g, mask, thickest = th.g, np.zeros((th.g.n, th.g.n), bool), 0.0
    level = {"mild": 0.35, "moderate": 0.55, "severe": 0.8}[f.severity]
    depths = {"mild": (12, 17), "moderate": (22, 32), "severe": (42, 55)} if fluid else \
             {"mild": (12, 16), "moderate": (19, 26), "severe": (32, 42)}
    for side in _sides(f.side):
        lung = th.lung[side] & ~lay.fluid & ~lay.air & ~lay.reserved
        dist = g.dist_mm(th.lung[side] if fluid else th.cavity)  # air hugs the chest wall
        y_top, y_bottom = _lung_rows(g, th.lung[side])
        extent = level * (y_bottom - y_top)
        rise = (g.y - (y_bottom - extent)) if fluid else ((y_top + extent) - g.y)
        reach = rng.uniform(*depths[f.severity]) * np.clip(rise / extent, 0, 1) ** 0.5
        collection = lung & (dist < reach)
        if not collection.any():
            continue
        thickest = max(thickest, float(dist[collection].max()))
        mask |= collection
        aerated[side] &= ~collection
        beside = g.dist_mm(~collection)  # distance of lung pixels from the collection
        rim = lung & ~collection & (beside < 2.5 * g.mm)
        if fluid:  # compressive atelectasis of the lung floating on the fluid
            band = 2.0 + 0.12 * thickest
            lay.fluid |= collection
            lay.atelectasis = np.maximum(lay.atelectasis, np.clip(1 - beside / band, 0, 1) * 0.85 * (lung & ~collection))
        else:  # visceral pleural line and a slightly denser, partly collapsed lung
            lay.air |= collection
            lay.pleural_line = np.maximum(lay.pleural_line, rim * 0.55)
            lay.density += (lung & ~collection) * {"mild": 0.0, "moderate": 40.0, "severe": 90.0}[f.severity]
    return mask, float(round(thickest))  # whole millimetres, as reported


def _pleural_effusion(th, lay, aerated, f, rng):
    mask, depth = _pleural_collection(th, lay, aerated, f, rng, fluid=True)
    return mask, {"effusion_depth_mm": depth}


def _pneumothorax(th, lay, aerated, f, rng):
    mask, depth = _pleural_collection(th, lay, aerated, f, rng, fluid=False)
    return mask, {"pneumothorax_depth_mm": depth}


def _ground_glass(th, lay, aerated, f, rng):
    g = th.g
    share = {"mild": 0.08, "moderate": 0.22, "severe": 0.45}[f.severity]
    pattern = _smooth_noise(rng, g, 7.0)
    haze = 0.75 + 0.12 * _smooth_noise(rng, g, 3.0)
    mask, involved = np.zeros((g.n, g.n), bool), 0
    for side in _sides(f.side):
        lung = aerated[side]
        if not lung.any():
            continue
        if f.location == "peripheral":
            prior = -g.dist_mm(th.cavity) / 10.0
        else:
            prior = -np.hypot(g.x - th.hilum[side][0], g.y - th.hilum[side][1]) / 30.0
        score = pattern + prior
        threshold = np.quantile(score[lung], 1 - share)
        opacity = np.clip((score - threshold) / 0.4 + 0.5, 0, 1) * lung
        lay.ggo = np.maximum(lay.ggo, opacity * haze)
        mask |= opacity >= 0.5
        involved += int(lung.sum())
    return mask, {"affected_lung_fraction": round(float(mask.sum()) / max(involved, 1), 4)}


def _consolidation(th, lay, aerated, f, rng):
    g, lobe = th.g, aerated[f.location]
    side = f.location.split("_")[0]
    share = {"mild": 0.2, "moderate": 0.5, "severe": 0.94}[f.severity]
    seed = _pick_pixels(g, rng, np.minimum(g.dist_mm(lobe), 15.0) ** 2)[0]
    reach = np.sqrt(lobe.sum()) * g.mm
    score = 0.4 * _smooth_noise(rng, g, 9.0) - np.hypot(g.x - seed[0], g.y - seed[1]) / (0.35 * reach)
    threshold = np.quantile(score[lobe], 1 - share)
    mask = cv2.morphologyEx((score >= threshold).astype(np.uint8), cv2.MORPH_CLOSE, g.disk_kernel(5.0)) > 0
    mask &= lobe
    opacity = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.8) * lobe
    lay.consolidation = np.maximum(lay.consolidation, opacity)
    # Air bronchograms: airways branching away from the hilum through the consolidated lung.
    tubes, hilum = g.canvas(), np.array(th.hilum[side])
    inside = cv2.erode(mask.astype(np.uint8), g.disk_kernel(2.5)).astype(bool)
    ys, xs = np.nonzero(inside)
    if len(xs):
        k = int(np.argmin(np.hypot(g.x[0, xs] - hilum[0], g.y[ys, 0] - hilum[1])))
        start = np.array([g.x[0, xs[k]], g.y[ys[k], 0]])
        stack = [(start, float(np.arctan2(*(start - hilum)[::-1])) + rng.uniform(-0.3, 0.3), rng.uniform(2.2, 3.0))]
        while stack:
            p, ang, width = stack.pop()
            q = p + rng.uniform(7, 13) * np.array([np.cos(ang), np.sin(ang)])
            g.line(tubes, p, q, width)
            if width > 1.1:
                stack += [(q, ang + turn * rng.uniform(0.15, 0.5), width * 0.8) for turn in (-1, 1) if rng.random() < 0.8]
    lay.bronchogram = np.maximum(lay.bronchogram, tubes / 255.0 * inside)
    area = float(mask.sum()) * g.mm**2 / 100
    return mask, {"area_cm2": round(area, 1), "lobe_fraction": round(float(mask.sum()) / max(lobe.sum(), 1), 3)}


def _emphysema(th, lay, aerated, f, rng):
    g = th.g
    paraseptal = f.location == "paraseptal"
    if paraseptal:  # a single row of subpleural lucencies with thin walls
        share = {"mild": (0.025, 0.04), "moderate": (0.06, 0.08), "severe": (0.1, 0.13)}[f.severity]
        radius = {"mild": (3.0, 5.0), "moderate": (3.5, 7.5), "severe": (5.0, 11.0)}[f.severity]
    else:  # wall-less centrilobular lucencies, confluent when severe
        share = {"mild": (0.04, 0.07), "moderate": (0.13, 0.18), "severe": (0.28, 0.35)}[f.severity]
        radius = {"mild": (1.5, 3.5), "moderate": (2.0, 5.0), "severe": (3.0, 7.5)}[f.severity]
    lung = np.zeros((g.n, g.n), bool)
    upper = np.zeros((g.n, g.n), bool)
    for side in _sides(f.side):
        lung |= aerated[side]
        upper |= aerated[side] & th.lobes[f"{side}_upper_lobe"]
    weight = np.where(upper, 1.0, 0.3) * lung  # upper-lobe predominant
    if paraseptal:
        weight *= np.abs(g.dist_mm(lung) - 4.5) < 2.0  # along the (visceral) pleura
    holes, walls = g.canvas(), g.canvas()
    target = rng.uniform(*share) * lung.sum()
    mean_area = np.pi * np.mean(radius) ** 2 / g.mm**2
    for _ in range(60):
        missing = target - (holes[lung] >= 128).sum()
        if missing <= 0 or weight.sum() == 0:
            break
        batch = int(np.clip(missing / mean_area / 2, 1, 16))  # small batches near the target: no overshoot
        centres, radii = _pick_pixels(g, rng, weight, batch), rng.uniform(*radius, batch)
        if paraseptal:  # keep paraseptal lucencies separate, in a row, each with a thin wall
            ij = np.clip(np.round((centres + g.fov / 2) / g.mm - 0.5).astype(int), 0, g.n - 1)
            gap = np.hypot(*(centres[:, None] - centres[None]).transpose(2, 0, 1)) - radii[:, None] - radii[None]
            crowded = np.triu(gap < 0, 1).any(0)
            keep = (holes[ij[:, 1], ij[:, 0]] == 0) & ~crowded
            centres, radii = centres[keep], radii[keep]
            for c, r in zip(g.px(centres), radii):
                cv2.circle(walls, tuple(c), int((r + 0.5) / g.mm * 16), 140, 1, cv2.LINE_AA, 4)
        g.dots(holes, centres, radii)
    emph = holes / 255.0 * lung
    mask = (holes >= 128) & lung
    lay.emphysema = np.maximum(lay.emphysema, emph)
    lay.bulla_walls = np.maximum(lay.bulla_walls, walls / 255.0 * lung * (holes < 250))
    return mask, {"emphysema_fraction": round(float(mask.sum()) / max(lung.sum(), 1), 4)}


def _lesion_outline(centre, radius, rng, lobulation: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 6):
        r += lobulation * rng.uniform(0.3, 1.0) * np.cos(k * t + rng.uniform(0, 2 * np.pi)) / (k - 1)
    return centre + radius * r[:, None] * np.stack([np.cos(t), np.sin(t)], 1)


def _place(g, lay, rng, region, radius):
    """A centre where a disc of ``radius`` fits inside ``region``, clear of consolidation if possible."""
    clear = region & (lay.consolidation < 0.5)
    room = g.dist_mm(clear if clear.sum() > 0.3 * region.sum() else region)
    fits = room >= radius + 1.5
    if not fits.any():
        fits = room >= 0.8 * room.max()
    return _pick_pixels(g, rng, fits & region)[0]


def _nodule(th, lay, aerated, f, rng):
    g, side = th.g, f.location.split("_")[0]
    diameter = float(round(rng.uniform(10, 28)))
    centre = _place(g, lay, rng, aerated[f.location], diameter / 2)
    img = g.canvas()
    g.poly(img, _lesion_outline(centre, diameter / 2, rng, 0.04))
    opacity = img / 255.0 * aerated[side]
    lay.solid = np.maximum(lay.solid, opacity)
    return opacity >= 0.5, {"diameter_mm": diameter}


def _mass(th, lay, aerated, f, rng):
    g, side = th.g, f.location.split("_")[0]
    region = aerated[side]
    diameter = rng.uniform(34, 65)
    centre = _place(g, lay, rng, aerated[f.location], min(diameter / 2, 0.9 * g.dist_mm(aerated[f.location]).max()))
    for _ in range(4):  # grow until the part inside the lung is truly > 30 mm
        core = g.canvas()
        g.poly(core, _lesion_outline(centre, diameter / 2, rng, 0.12))
        core_mask = (core >= 128) & region
        pts = cv2.findNonZero(core_mask.astype(np.uint8))
        long_axis = max(cv2.minAreaRect(pts)[1]) * g.mm if pts is not None else 0.0
        if long_axis > 31:
            break
        diameter *= 1.15
    img = core.copy()
    for a in rng.uniform(0, 2 * np.pi, int(rng.integers(10, 18))):  # spiculae: thin tapering strands
        tip_r = diameter / 2 * rng.uniform(1.15, 1.45)
        base = centre + diameter / 2 * 0.9 * np.array([np.cos(a), np.sin(a)])
        tip = centre + tip_r * np.array([np.cos(a), np.sin(a)])
        side_v = np.array([-np.sin(a), np.cos(a)]) * rng.uniform(0.8, 1.5)
        g.poly(img, np.stack([base - side_v, base + side_v, tip]), 200)
    opacity = img / 255.0 * region
    lay.solid = np.maximum(lay.solid, opacity)
    return opacity >= 0.5, {"diameter_mm": float(round(long_axis))}


DRAW = {
    "nodule": _nodule,
    "mass": _mass,
    "ground_glass_opacity": _ground_glass,
    "consolidation": _consolidation,
    "pleural_effusion": _pleural_effusion,
    "emphysema": _emphysema,
    "pneumothorax": _pneumothorax,
}
PLEURAL = ("pleural_effusion", "pneumothorax")
# Pleural collections claim the pleural space first; focal lesions come last and avoid consolidation.
DRAW_ORDER = {"pleural_effusion": 0, "pneumothorax": 0, "consolidation": 1}


# ----------------------------------------------------------------------------- compose
def _compose(th: _Thorax, lay: _Layers) -> np.ndarray:
    lung = th.lung["right"] | th.lung["left"]
    h = th.parenchyma + lay.density
    h += lay.ggo * (HU_GGO - h)
    h += lay.emphysema * (HU_EMPHYSEMA - h)
    vessels = np.maximum(th.vessels * (1 - lay.emphysema), lay.bulla_walls * 0.5)
    h += vessels * (HU_SOFT - h)
    h += lay.consolidation * (HU_CONSOLIDATION - h)
    h += lay.bronchogram * (-900.0 - h)
    h += lay.solid * (HU_SOFT - h)
    h += lay.atelectasis * (-60.0 - h)
    h[lay.fluid] = HU_FLUID
    h[lay.air] = HU_AIR
    h += lay.pleural_line * (-250.0 - h)
    return np.where(lung, h, th.hu)


def _resolve(f: Finding, rng: np.random.Generator) -> Finding:
    """Fill unset side/location/severity from what the finding allows; reject impossible ones."""
    spec = SPEC.finding(f.name)
    changes = {}
    for attr, options in (("side", spec.sides), ("location", spec.locations), ("severity", spec.severities)):
        value = getattr(f, attr)
        if options and value is None:
            changes[attr] = str(options[rng.integers(len(options))])
        elif value is not None and value not in options:
            raise UserError(f"chest_ct {f.name}: {attr} {value!r} not in {options}")
    return f.copy(**changes)


def render(findings: list[Finding], size: int, rng: np.random.Generator) -> Rendered:
    """Draw one axial lung-window slice with the given findings; see the module docstring."""
    n = max(size, min(2 * size, 192))  # supersample small images, then area-downsample
    anatomy_rng, noise_rng, finding_rng = (np.random.default_rng(int(s)) for s in rng.integers(0, 2**62, 3))
    th = _build_thorax(n, anatomy_rng)
    g = th.g
    noise_sd = noise_rng.uniform(12, 30)
    noise = cv2.GaussianBlur(noise_rng.standard_normal((n, n), dtype=np.float32), (0, 0), 0.45 / g.mm * 1.5)
    noise *= noise_sd / (noise.std() + 1e-6)

    lay = _Layers(n)
    aerated = {side: th.lung[side].copy() for side in SIGN} | {lobe: th.lobes[lobe].copy() for lobe in LOBES}
    resolved = [_resolve(f, finding_rng) for f in findings]
    for f in resolved:  # a lesion's lobe keeps an aerated core however large the collection
        if f.location in LOBES:
            room = g.dist_mm(th.lobes[f.location])
            lay.reserved |= room >= 0.5 * room.max()
    drawn: dict[int, Finding] = {}
    for i in sorted(range(len(resolved)), key=lambda i: DRAW_ORDER.get(resolved[i].name, 2)):
        f = resolved[i]
        mask, measurements = DRAW[f.name](th, lay, aerated, f, finding_rng)
        if f.name in PLEURAL:
            for lobe in LOBES:
                aerated[lobe] &= aerated[lobe.split("_")[0]]
        drawn[i] = f.copy(bbox=bbox_of(mask))
        drawn[i].measurements.update({k: float(v) for k, v in measurements.items()})

    hu = _compose(th, lay) + noise
    hu = cv2.GaussianBlur(hu, (0, 0), 0.6)  # scanner point-spread function
    low = WINDOW_LEVEL_HU - WINDOW_WIDTH_HU / 2
    grey = np.clip((hu - low) / WINDOW_WIDTH_HU * 255.0, 0, 255)
    if n != size:
        grey = cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA)
    image = np.round(grey).astype(np.uint8)
    measurements = dict(th.measurements, pixel_spacing_mm=g.fov / size, noise_sd_hu=noise_sd,
                        window_level_hu=WINDOW_LEVEL_HU, window_width_hu=WINDOW_WIDTH_HU)
    return Rendered(image, [drawn[i] for i in range(len(resolved))], {k: round(float(v), 3) for k, v in measurements.items()})


# ----------------------------------------------------------------------------- report vocabulary
_LOBE_WORDS = {
    "right_upper_lobe": ("right upper lobe", "RUL"),
    "right_lower_lobe": ("right lower lobe", "RLL"),
    "left_upper_lobe": ("left upper lobe", "LUL"),
    "left_lower_lobe": ("left lower lobe", "LLL"),
}

FINDINGS = {
    spec.name: spec
    for spec in (
        FindingSpec(
            name="nodule",
            terms=("pulmonary nodule", "solid pulmonary nodule", "lung nodule", "solid nodule"),
            templates=("{diameter_mm} mm {term} in the {location}", "{term} in the {location} measuring {diameter_mm} mm",
                       "{location} {term}, {diameter_mm} mm", "{term} in the {location}"),
            locations=LOBES,
            location_words=_LOBE_WORDS,
        ),
        FindingSpec(
            name="mass",
            terms=("pulmonary mass", "lung mass", "mass"),
            templates=("lobulated, spiculated {term} in the {location} measuring {diameter_mm} mm",
                       "spiculated {location} {term}, {diameter_mm} mm in long axis",
                       "{diameter_mm} mm {term} with spiculated margins in the {location}",
                       "spiculated {term} in the {location}"),
            locations=LOBES,
            location_words=_LOBE_WORDS,
        ),
        FindingSpec(
            name="ground_glass_opacity",
            terms=("ground-glass opacity", "ground-glass opacification", "GGO", "ground-glass attenuation"),
            templates=("{severity} {side} {location} {term}",
                       "{severity} {term} in a {side} {location} distribution",
                       "{severity} {side} {location} {term} without obscuration of the underlying vessels",
                       "{severity} {side} {term} with a {location} predominance"),
            sides=("right", "left", "bilateral"),
            locations=("peripheral", "central"),
            severities=SEVERITIES,
            severity_words={"mild": ("mild", "minimal", "subtle"), "moderate": ("moderate", "patchy"),
                            "severe": ("extensive", "widespread", "severe")},
            location_words={"peripheral": ("peripheral", "subpleural"),
                            "central": ("central", "perihilar", "peribronchovascular")},
        ),
        FindingSpec(
            name="consolidation",
            terms=("consolidation", "airspace consolidation", "airspace opacification"),
            templates=("{severity} {term} in the {location}", "{severity} {term} in the {location} with air bronchograms",
                       "{severity} {location} {term}", "{severity} {location} {term} containing air bronchograms"),
            locations=LOBES,
            severities=SEVERITIES,
            severity_words={"mild": ("small", "focal", "patchy"), "moderate": ("moderate",),
                            "severe": ("extensive", "dense lobar")},
            location_words=_LOBE_WORDS,
        ),
        FindingSpec(
            name="pleural_effusion",
            terms=("pleural effusion", "effusion"),
            bilateral_terms=("pleural effusions", "effusions"),
            templates=("{severity} {side} {term}", "{severity} {side} {term} layering dependently",
                       "{severity} {side} {term}, maximal depth {effusion_depth_mm} mm",
                       "{severity} dependent {side} {term} measuring {effusion_depth_mm} mm in depth"),
            sides=("right", "left", "bilateral"),
            severities=SEVERITIES,
            severity_words={"mild": ("small", "small-volume"), "moderate": ("moderate", "moderate-sized"),
                            "severe": ("large", "large-volume")},
        ),
        FindingSpec(
            name="emphysema",
            terms=("emphysema", "emphysematous changes", "pulmonary emphysema"),
            templates=("{severity} {side} {location} {term}", "{severity} {location} {term}, {side}, upper lobe predominant",
                       "{severity} upper lobe predominant {location} {term}, {side}",
                       "{severity} {location} {term} ({side})"),
            sides=("bilateral", "right", "left"),
            locations=("centrilobular", "paraseptal"),
            severities=SEVERITIES,
            severity_words={"mild": ("mild",), "moderate": ("moderate",), "severe": ("severe", "advanced")},
            location_words={"centrilobular": ("centrilobular", "centriacinar"), "paraseptal": ("paraseptal", "distal acinar")},
        ),
        FindingSpec(
            name="pneumothorax",
            terms=("pneumothorax", "PTX"),
            templates=("{severity} {side} {term}", "{severity} {side} anterior {term}",
                       "{severity} {side} {term} with a maximal depth of {pneumothorax_depth_mm} mm",
                       "{side} {term}, {severity}, collecting anteriorly"),
            sides=("right", "left"),
            severities=SEVERITIES,
            severity_words={"mild": ("small",), "moderate": ("moderate", "moderate-sized"), "severe": ("large",)},
        ),
    )
}

SPEC = PhantomSpec(
    name="chest_ct",
    channels=1,
    findings=FINDINGS,
    render=render,
    techniques=(
        "CT chest without contrast, axial image in lung window.",
        "Non-contrast CT of the chest (NCCT), lung window (W1500/L-600).",
        "Axial CT thorax at the level of the carina, lung window.",
        "Unenhanced chest CT, axial slice, lung windows.",
        "CT thorax, axial, lung window settings.",
    ),
    normal_statements=(
        "The lungs are clear.",
        "Lungs are well aerated without focal consolidation, nodule or mass.",
        "No pulmonary nodule, consolidation or ground-glass opacity. The central airways are patent.",
        "Normal lung parenchyma; no pleural effusion or pneumothorax.",
        "Clear lungs with normal pulmonary vasculature; the pleural spaces are clear.",
    ),
    impression_normal=(
        "No acute pulmonary abnormality.",
        "Normal CT appearance of the lungs.",
        "Unremarkable lungs at this level.",
        "No acute intrathoracic abnormality on lung windows.",
    ),
)
