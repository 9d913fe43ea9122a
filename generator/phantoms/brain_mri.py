"""Brain MRI phantom: one axial T2-weighted FLAIR slice at the level of the lateral ventricles.

Weighting: T2-FLAIR (fluid-attenuated inversion recovery). Free water is nulled, so CSF in the
ventricles, sulci and fissures is dark; cortical grey matter is brighter than white matter and
the deep grey nuclei lie in between; scalp fat and diploic marrow are bright, the cortical tables
of the skull and the air around the head are dark. Tissue with more bound water (vasogenic
oedema, infarct, demyelinating plaques) is bright. A haematoma is drawn in the acute
(deoxyhaemoglobin) stage: heterogeneous low signal with a darker peripheral rim, inside a bright
halo of perihaematomal oedema.

Anatomy model: the head outline is a slightly egg-shaped closed curve (wider posteriorly);
scalp (skin, fat, temporalis muscle laterally), outer table, diploe, inner table and the
subarachnoid space are inward offsets of that curve. The convexity is folded by evenly spaced
sulci of random depth, bent by smooth noise, some gyri with a shallow secondary sulcus; medial
sulci branch off the interhemispheric fissure (falx), which runs in front of the genu and behind
the splenium, and the Sylvian fissures reach the insula. The cortex is the band of tissue within
~2.5 mm of any CSF surface (so it lines every sulcus); white matter lies deeper. Deep structures:
frontal horns of the lateral ventricles (butterfly shape around the septum pellucidum, lateral
walls indented by the caudate heads), third ventricle between the thalami, atria and occipital
horns with choroid plexus, lentiform nuclei lateral to the internal capsules. The slice is drawn
on a supersampled grid as a label map, warped by any mass effect, converted to FLAIR grey levels,
area-downsampled (partial volume), then given a smooth bias field and Rician noise (the magnitude
of complex Gaussian noise). Findings use their own generators, drawn after those of the normal
anatomy and the noise, so a finding passed with its attributes set leaves the rest of the study
of the same seed as it was (apart from the mass effect it causes).

Conventions: radiological, anterior at the top and the patient's right on the viewer's left.
Field of view 220 mm square, so the pixel spacing is 220/size mm. Lobes and vascular territories
are placed in the hemisphere named by ``side``. A mass (tumour, haematoma) pushes the midline
away from itself by an amount that grows with its diameter; ``midline_shift`` ``side`` is the
side towards which the septum pellucidum is displaced (a "left midline shift" moves it towards
the patient's left), measured at the septum against the line joining the falx attachments.
A requested ``midline_shift`` sets the size of the shift (its severity); when a mass is also
present the shift is drawn away from the mass, and the returned finding states that direction
even if the request named the other side. A mass that shifts the midline by 1 mm or more without
a requested ``midline_shift`` gets one appended to ``Rendered.findings``, so the report never
says "no midline shift" over a shifted midline (mild masses cause none).

Measurements: ``diameter_mm`` (longest diameter of the drawn outline), ``volume_ml`` (ABC/2),
``area_cm2`` (in-plane infarct area), ``lesion_count`` and ``max_diameter_mm`` (visible plaques),
``evans_index`` (widest frontal-horn span / widest inner skull diameter; normal < 0.3),
``midline_shift_mm``. ``Rendered.measurements`` carries the study's Evans index and midline shift
and the field of view and pixel spacing.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .base import Finding, FindingSpec, PhantomSpec, Rendered, bbox_of

FOV_MM = 220.0
SEVERITIES = ("mild", "moderate", "severe")
LOBES = ("frontal", "parietal", "temporal", "occipital")

# labels of the intracranial label map (0 = outside the inner table)
CSF, GM, WM, DEEP_GM, VENTRICLE, CHOROID, SEPTUM, INFARCT = 1, 2, 3, 4, 5, 6, 7, 8
MS_FIRST = 10  # MS lesion i carries label MS_FIRST + i, so visible plaques can be counted
SEPTUM_V = -0.2  # brain v-coordinate where the midline shift is measured (septum pellucidum)


def _chaikin(points: list[tuple[float, float]], rounds: int = 2) -> np.ndarray:
    """Corner-cutting smoothing of a closed polygon."""
    pts = np.asarray(points, dtype=np.float64)
    for _ in range(rounds):
        nxt = np.roll(pts, -1, axis=0)
        pts = np.stack([0.75 * pts + 0.25 * nxt, 0.25 * pts + 0.75 * nxt], axis=1).reshape(-1, 2)
    return pts


# Deep anatomy in brain coordinates (u, v): u = 1 at the lateral brain surface, v = -1 at the
# frontal pole, v = +1 at the occipital pole; drawn for u > 0 (patient's left) and mirrored.
FRONTAL_HORN = _chaikin([(0.012, -0.06), (0.012, -0.2), (0.015, -0.31), (0.045, -0.37), (0.1, -0.385),
                         (0.17, -0.35), (0.225, -0.305), (0.235, -0.265), (0.19, -0.235), (0.14, -0.19),
                         (0.1, -0.13), (0.07, -0.08), (0.04, -0.05)])
ATRIUM = _chaikin([(0.1, 0.22), (0.17, 0.2), (0.25, 0.26), (0.28, 0.34), (0.25, 0.46), (0.19, 0.58),
                   (0.15, 0.61), (0.135, 0.55), (0.18, 0.44), (0.175, 0.34), (0.12, 0.28)])
LENTIFORM = _chaikin([(0.3, -0.22), (0.4, -0.17), (0.47, -0.06), (0.47, 0.1), (0.41, 0.16), (0.33, 0.12),
                      (0.3, 0.0), (0.28, -0.12)])
TUMOUR_CENTRES = {"frontal": (0.42, -0.58), "parietal": (0.5, 0.4), "temporal": (0.74, 0.12), "occipital": (0.3, 0.78)}
BLEED_CENTRES = {"basal_ganglia": (0.38, -0.02), "thalamus": (0.13, 0.1), "frontal": (0.38, -0.5),
                 "parietal": (0.48, 0.35), "temporal": (0.7, 0.12), "occipital": (0.28, 0.72)}
# vascular territories: wedge apex (u, v) and angular span in degrees (0 = lateral, -90 = anterior)
TERRITORIES = {"mca": ((0.2, -0.02), (-68.0, 62.0)), "aca": ((0.05, -0.3), (-102.0, -58.0)),
               "pca": ((0.08, 0.4), (48.0, 100.0))}

TUMOUR_DIAMETER_MM = {"mild": (12.0, 20.0), "moderate": (25.0, 35.0), "severe": (42.0, 55.0)}
BLEED_DIAMETER_MM = {"mild": (15.0, 22.0), "moderate": (28.0, 36.0), "severe": (42.0, 52.0)}
DEEP_BLEED_DIAMETER_MM = {"mild": (12.0, 18.0), "moderate": (22.0, 30.0), "severe": (34.0, 42.0)}
INFARCT_FRACTION = {"mild": 0.35, "moderate": 0.65, "severe": 1.0}  # share of the territory's arc
SHIFT_MM = {"mild": (2.5, 4.5), "moderate": (5.5, 9.0), "severe": (10.5, 15.0)}
MS_COUNT = {"mild": (3, 5), "moderate": (8, 12), "severe": (16, 24)}
# atrophy: ventricular width factor, sulcal width, extra subarachnoid space, extra fissure width (mm)
ATROPHY = {None: (1.0, 0.5, 0.0, 0.0), "mild": (1.38, 1.5, 0.8, 0.8),
           "moderate": (1.6, 2.3, 1.6, 1.6), "severe": (1.85, 3.2, 2.6, 2.6)}


def _child(rng: np.random.Generator) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(int(rng.integers(2**63))))


def _smooth_field(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth random field: coarse Gaussian noise, cubic-upsampled."""
    return cv2.resize(rng.standard_normal((n, n)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)


def _fill(img: np.ndarray, pts: np.ndarray, value: float) -> None:
    cv2.fillPoly(img, [np.round(pts * 16).astype(np.int32)], value, cv2.LINE_8, 4)


def _lines(img: np.ndarray, lines: list[np.ndarray], value: float, thickness: int) -> None:
    if lines:
        cv2.polylines(img, [np.round(p * 16).astype(np.int32) for p in lines], False, value, thickness, cv2.LINE_8, 4)


def _feret(pts: np.ndarray) -> tuple[float, float]:
    """Longest diameter of a polygon and its width perpendicular to that diameter (pixels)."""
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    i, j = np.unravel_index(np.argmax(d), d.shape)
    axis = (pts[j] - pts[i]) / max(d[i, j], 1e-9)
    across = pts @ np.array([-axis[1], axis[0]])
    return float(d[i, j]), float(across.max() - across.min())


class _Head:
    """Sampled normal anatomy and its mapping to pixels of the supersampled grid."""

    def __init__(self, rng: np.random.Generator, work: int, atrophy: str | None):
        u = rng.uniform
        self.work, self.mm = work, FOV_MM / work  # mm per work pixel
        self.cx, self.cy = 0.5 + u(-0.012, 0.012), 0.5 + u(-0.01, 0.01)
        self.hx, self.hy, self.egg = u(0.345, 0.372), u(0.425, 0.445), u(0.02, 0.07)
        self.bump_amp, self.bump_phase = u(0.0, 0.008, 3), u(0, 2 * np.pi, 3)
        self.scalp_mm, self.skull_mm, self.muscle_mm = u(4.0, 6.5), u(5.5, 7.5), u(3.0, 6.0)
        self.sas_mm, self.gm_mm = u(0.8, 1.5), u(2.3, 2.9)
        self.vent_scale = u(0.93, 1.07) * np.array([1 + u(-0.04, 0.04), 1 + u(-0.04, 0.04)])
        self.intensity = dict(gm=u(134, 148), wm=u(94, 106), csf=u(14, 26), fat=u(175, 205), skin=u(95, 120),
                              muscle=u(60, 80), bone=u(8, 16), marrow=u(100, 150), lesion=u(198, 218),
                              choroid=u(55, 80))
        self.intensity["deep"] = self.intensity["wm"] + u(0.3, 0.5) * (self.intensity["gm"] - self.intensity["wm"])
        self.noise_sigma, self.bias = u(4.5, 7.5), u(-0.1, 0.1, 2).tolist() + [u(0.0, 0.15)]
        self.texture = _smooth_field(rng, 14, work)
        self.sulcus_draws = rng.uniform(size=(24, 16))  # fixed count: the draws never depend on findings
        n_gyri = int(rng.integers(40, 48))
        self.sulcal_phase, self.sulcal_warp = u(0, 1), _smooth_field(rng, 24, work)
        self.sulcal_depth = 7 + 15 * rng.uniform(size=n_gyri) ** 0.8  # mm
        self.sulcal_dimple = np.where(rng.uniform(size=n_gyri) < 0.55, u(2, 7, n_gyri), 0.0)
        centre_turns = (np.arange(n_gyri) - self.sulcal_phase) / n_gyri  # where each sulcus meets the surface
        angle = 2 * np.pi * centre_turns
        sylvian = (np.abs(np.sin(angle) + 0.08) < 0.1) & (np.abs(np.cos(angle)) > 0.9)
        near_fissure = (np.abs(np.cos(angle)) < 0.12) | sylvian
        self.sulcal_depth[near_fissure] = 0.0
        self.sulcal_dimple[near_fissure] = 0.0
        self.fissure_wiggle = u(-0.012, 0.012, 8)
        vent_factor, self.sulcus_mm, sas_extra, self.fissure_extra_mm = ATROPHY[atrophy]
        self.vent_scale = self.vent_scale * vent_factor
        self.sas_mm += sas_extra
        self.gm_mm *= 1.0 - 0.05 * sas_extra
        self.ic_mm = self.scalp_mm + self.skull_mm  # depth of the inner table below the skin
        self.bx = self.hx - (self.ic_mm + self.sas_mm) / FOV_MM
        self.by = self.hy - (self.ic_mm + self.sas_mm) / FOV_MM

        t = np.linspace(0, 2 * np.pi, 360, endpoint=False)
        self.t = t
        radial = 1 + sum(a * np.cos((k + 2) * t + p) for k, (a, p) in enumerate(zip(self.bump_amp, self.bump_phase)))
        outline = np.stack([self.hx * np.cos(t) * (1 + self.egg * np.sin(t)) * radial, self.hy * np.sin(t) * radial], 1)
        self.outline = (outline + [self.cx, self.cy]) * work
        tangent = np.roll(self.outline, -1, 0) - np.roll(self.outline, 1, 0)
        normal = np.stack([tangent[:, 1], -tangent[:, 0]], 1)
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        centre = np.array([self.cx, self.cy]) * work
        if np.sum((centre - self.outline) * normal) < 0:
            normal = -normal
        self.normal = normal  # inward unit normals

    def curve(self, depth_mm: np.ndarray | float) -> np.ndarray:
        """The head outline moved inwards by depth_mm (scalar or one value per outline point)."""
        return self.outline + self.normal * (np.asarray(depth_mm, dtype=np.float64) / self.mm)[..., None]

    def px(self, uv: np.ndarray, side: int = 1) -> np.ndarray:
        """Brain coordinates (u, v) to work-grid pixels; side=-1 mirrors to the patient's right."""
        uv = np.asarray(uv, dtype=np.float64)
        x, y = self.cx + side * uv[..., 0] * self.bx, self.cy + uv[..., 1] * self.by
        return np.stack([x, y], -1) * self.work


def _extracranial(head: _Head) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scalp and skull grey levels, the intracranial mask and the brain-surface contour."""
    w, t, inten = head.work, head.t, head.intensity
    ext = np.zeros((w, w), np.float32)
    skull = head.skull_mm * (0.8 + 0.35 * np.sin(t) ** 2)  # thicker frontally and occipitally
    scalp = head.scalp_mm + np.zeros_like(t)
    muscle = head.muscle_mm * np.clip((np.abs(np.cos(t)) - 0.6) / 0.3, 0, 1)  # temporalis, lateral only
    _fill(ext, head.curve(0.0), inten["skin"])
    _fill(ext, head.curve(0.7), inten["fat"])
    _fill(ext, head.curve(scalp - muscle), inten["muscle"])
    _fill(ext, head.curve(scalp), inten["bone"])
    table = np.minimum(1.8, skull / 3)  # diploe thins out where the skull is thin (temporal squama)
    _fill(ext, head.curve(scalp + table), inten["marrow"])
    _fill(ext, head.curve(scalp + skull - table), inten["bone"])
    ext *= 1 + 0.12 * head.texture  # patchy marrow and fat
    inner = head.curve(scalp + skull)
    ic = np.zeros((w, w), np.uint8)
    _fill(ic, inner, 1)
    brain_outline = head.curve(scalp + skull + head.sas_mm)
    return ext, ic, brain_outline


def _convexity_sulci(head: _Head, brain: np.ndarray, width_mm: float) -> np.ndarray:
    """Convexity sulci as a field: evenly spaced radial clefts of random depth, bent by smooth noise.

    The gyral coordinate g counts sulci around the brain (angle in brain coordinates times the
    number of gyri); a pixel lies in sulcus k when it is within half a sulcal width of g = k
    tangentially and shallower than that sulcus's depth. Half-integer g gives shallow secondary
    sulci (dimples) on some gyri.
    """
    w, mm, n = head.work, head.mm, len(head.sulcal_depth)
    depth = cv2.distanceTransform(brain, cv2.DIST_L2, 3) * mm
    xs = (np.arange(w, dtype=np.float32) + 0.5) / w - head.cx
    ys = (np.arange(w, dtype=np.float32)[:, None] + 0.5) / w - head.cy
    turns = np.arctan2(ys / head.by, xs / head.bx) / (2 * np.pi)
    g = turns * n + head.sulcal_phase + 0.22 * head.sulcal_warp
    per_turn = 2 * np.pi * np.sqrt(xs ** 2 + ys ** 2) * FOV_MM / n  # mm of cortex per unit of g
    half = max(width_mm, 1.2 * mm) / 2
    k = np.floor(g + 0.5)
    primary = (np.abs(g - k) * per_turn < half) & (depth < head.sulcal_depth[k.astype(int) % n])
    j = np.floor(g)
    secondary = (np.abs(g - j - 0.5) * per_turn < half) & (depth < head.sulcal_dimple[j.astype(int) % n])
    return (primary | secondary) & (brain > 0)


def _wander(start: np.ndarray, angle: float, length: float, d: np.ndarray, segments: int = 6) -> np.ndarray:
    """A random-walk polyline: persistent curvature plus per-segment jitter (d: uniforms)."""
    pts, p, turn = [start], start, 0.5 * (d[0] - 0.5)
    for s in range(segments):
        angle += turn + 0.8 * (d[1 + s] - 0.5)
        p = p + length / segments * np.array([np.cos(angle), np.sin(angle)])
        pts.append(p)
    return np.array(pts)


def _sulci(head: _Head) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Explicit folds as polylines (pixels): thin medial and insular sulci, and the wider fissures
    (interhemispheric, Sylvian stems). The convexity sulci come from :func:`_convexity_sulci`."""
    mm, draws = head.mm, head.sulcus_draws
    sulci: list[np.ndarray] = []
    # interhemispheric fissure: frontal pole to the genu, splenium to the occipital pole
    front_end = min(-0.47, -0.06 - 0.33 * head.vent_scale.max() * 0.95 - 0.08)
    wig = head.fissure_wiggle
    fissures = [head.px(np.stack([wig[:4] * np.array([1, 1, 0.5, 0.2]), np.linspace(-1.2, front_end, 4)], 1)),
                head.px(np.stack([wig[4:] * np.array([0.2, 0.5, 1, 1]), np.linspace(0.5, 1.2, 4)], 1))]
    # medial sulci off the fissure
    for k in range(14):
        d = draws[k]
        side = 1 if k % 2 else -1
        v = (-0.97 + (front_end + 0.9) * d[0]) if k < 8 else (0.6 + 0.35 * d[0])
        a = (d[1] - 0.5) * 1.0 + (0 if side > 0 else np.pi)
        sulci.append(_wander(head.px(np.array([0.0, v])), a, (5 + 9 * d[2]) / mm, d[3:7], 3))
    # Sylvian fissure: stem from the lateral surface to the insula, insular cistern, opercular rami
    for i, side in enumerate((1, -1)):
        d = draws[14 + 4 * i: 18 + 4 * i]
        jig = 0.06 * (d[0, :6] - 0.5)
        stem = np.array([(1.15, -0.1), (0.92, -0.08 + jig[0]), (0.78, -0.05 + jig[1]), (0.66, -0.02 + jig[2])])
        fissures.append(head.px(stem, side))
        cistern = np.array([(0.64, -0.28), (0.6, -0.15 + jig[3]), (0.595, 0.0), (0.605, 0.12 + jig[4]), (0.64, 0.24)])
        sulci.append(head.px(cistern, side))
        for j in range(3):
            base = head.px(stem[1 + j % 2], side)
            a = np.arctan2(-1 if j != 1 else 1, side * (0.4 if j else -0.3))
            sulci.append(_wander(base, float(a), (6 + 8 * d[1 + j, 0]) / mm, d[1 + j, 1:5], 3))
        for j in range(3):  # short sulci between the insular gyri
            base = head.px(cistern[1 + j], side)
            sulci.append(_wander(base, 0.0 if side < 0 else np.pi, (3 + 3 * d[3, 5 + j]) / mm, d[3, 8:12], 2))
    return sulci, fissures


def _territory_mask(head: _Head, lab: np.ndarray, finding: Finding, rng: np.random.Generator) -> np.ndarray:
    """Wedge of a vascular territory: apex towards the ventricle, base on the cortex."""
    w = head.work
    sgn = 1 if finding.side == "left" else -1
    (u0, v0), (a0, a1) = TERRITORIES[finding.location or "mca"]
    severity = finding.severity or "moderate"
    span = (a1 - a0) * INFARCT_FRACTION[severity]
    start = a0 + rng.uniform(0, (a1 - a0) - span)
    lo, hi = np.radians(start), np.radians(start + span)
    r_min = {"mild": 0.32, "moderate": 0.17, "severe": 0.06}[severity]
    wobble_full = _smooth_field(rng, 16, w)
    # work on the named hemisphere only
    c0, c1 = (int(head.cx * w), w) if sgn > 0 else (0, int(head.cx * w) + 1)
    au = sgn * ((np.arange(c0, c1) + 0.5) / w - head.cx) / head.bx
    v = ((np.arange(w) + 0.5) / w - head.cy)[:, None] / head.by
    wobble = 0.09 * wobble_full[:, c0:c1]
    angle = np.arctan2(v - v0, au[None, :] - u0)
    radius = np.hypot(v - v0, au[None, :] - u0)
    wedge = np.zeros((w, w), bool)
    wedge[:, c0:c1] = (angle > lo + wobble) & (angle < hi - wobble) & (radius > r_min * (1 + wobble)) & (au > 0.02)
    return wedge & np.isin(lab, (GM, WM, DEEP_GM, SEPTUM))


def _ms_lesions(head: _Head, lab: np.ndarray, ventricles: list[np.ndarray], severity: str,
                rng: np.random.Generator) -> list[float]:
    """Ovoid periventricular plaques perpendicular to the ventricular wall, a few in deep white matter."""
    lo, hi = MS_COUNT[severity]
    count, w = int(rng.integers(lo, hi + 1)), head.work
    plaques = np.zeros_like(lab)
    long_axes: list[float] = []
    for i in range(count):
        for _ in range(30):
            half_long, half_short = rng.uniform(1.5, 5.0) / head.mm, rng.uniform(1.0, 2.2) / head.mm
            if i % 4 != 3:  # three in four periventricular: on a ventricle wall, long axis along its normal
                poly = ventricles[int(rng.integers(len(ventricles)))]
                j = int(rng.integers(len(poly)))
                a, b = poly[j], poly[(j + 1) % len(poly)]
                p = a + rng.random() * (b - a)
                nrm = np.array([b[1] - a[1], a[0] - b[0]]) / max(np.linalg.norm(b - a), 1e-9)
                if cv2.pointPolygonTest(poly.astype(np.float32), tuple(map(float, p + 2 * nrm)), False) > 0:
                    nrm = -nrm
                centre = p + nrm * (half_long + rng.uniform(0.3, 2.0) / head.mm)
                angle = np.degrees(np.arctan2(nrm[1], nrm[0]))
            else:  # deep or juxtacortical white matter, any orientation
                uv = np.array([rng.uniform(0.2, 0.8) * (1 if rng.random() < 0.5 else -1), rng.uniform(-0.75, 0.75)])
                centre, angle = head.px(uv), rng.uniform(0, 180)
            cx, cy = int(centre[0]), int(centre[1])
            if 0 <= cx < w and 0 <= cy < w and lab[cy, cx] == WM:
                break
        cv2.ellipse(plaques, (int(centre[0] * 16), int(centre[1] * 16)), (int(half_long * 16), int(half_short * 16)),
                    angle, 0, 360, MS_FIRST + i, -1, cv2.LINE_8, 4)
        long_axes.append(2 * half_long * head.mm)
    np.copyto(lab, plaques, where=(plaques > 0) & (lab == WM))
    return long_axes


def _place(head: _Head, brain: np.ndarray, uv: tuple[float, float], sgn: int, radius: float,
           rng: np.random.Generator, min_mid: float) -> np.ndarray:
    """Centre for a round lesion of the given radius (px): jittered, then moved until it fits the hemisphere."""
    c = head.px(np.array([uv[0] + rng.uniform(-0.04, 0.04), uv[1] + rng.uniform(-0.04, 0.04)]), sgn)
    target = head.px(np.array([0.4, 0.0]), sgn)
    mid = head.cx * head.work
    for _ in range(60):
        inside = cv2.pointPolygonTest(brain, (float(c[0]), float(c[1])), True)
        if inside >= radius + 2.5 / head.mm and sgn * (c[0] - mid) >= min_mid:
            break
        step = target - c
        c = c + step / max(np.linalg.norm(step), 1e-9) * min(1.5 / head.mm, np.linalg.norm(step))
    return c


def _blob(centre: np.ndarray, radius: float, rng: np.random.Generator, aspect: float = 1.0,
          tilt: float = 0.0, amp: float = 0.08) -> np.ndarray:
    """Lobulated closed curve around centre (pixels)."""
    th = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    r = 1 + sum(rng.uniform(0, amp) / np.sqrt(k) * np.cos(k * th + rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
    x, y = radius * r * np.cos(th), radius * aspect * r * np.sin(th)
    c, s = np.cos(tilt), np.sin(tilt)
    return centre + np.stack([c * x - s * y, s * x + c * y], 1)


def _push(grid_x: np.ndarray, grid_y: np.ndarray, centre: np.ndarray, radius: float, reach: float,
          taper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Displacement of a mass inserted at centre: area-preserving near it, fading over `reach`."""
    dx, dy = grid_x - centre[0], grid_y - centre[1]
    rho = np.sqrt(dx * dx + dy * dy) + 1e-3
    fade = np.exp(-np.maximum(rho - radius, 0) / reach)
    keep = np.sqrt(np.maximum(rho * rho - radius * radius * fade, 0)) / rho
    moved = (1 - keep) * taper
    return dx * moved, dy * moved


def _shift_side(sign: float) -> str:
    return "left" if sign > 0 else "right"  # +x on the image is the patient's left


@dataclass
class _Mass:
    """A space-occupying lesion placed on the brain before the mass effect is applied."""

    name: str
    outline: np.ndarray  # closed curve, work-grid pixels
    centre: np.ndarray
    diameter_mm: float
    push: int  # +1: pushes the midline towards the image right (the patient's left)

    @property
    def induced_shift_mm(self) -> float:  # shift of the septum this mass causes on its own
        return self.push * ((self.diameter_mm - 22) * 0.3 if self.diameter_mm > 27 else 0.0)


def _normal_labels(head: _Head) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
    """Scalp/skull grey levels, intracranial mask, brain mask, label map, ventricle outlines, brain contour."""
    w, mm = head.work, head.mm
    ext, ic, brain_outline = _extracranial(head)
    brain = np.zeros((w, w), np.uint8)
    _fill(brain, brain_outline, 1)
    brain &= ic
    sulci, fissures = _sulci(head)
    folds = np.zeros((w, w), np.uint8)
    _lines(folds, sulci, 1, max(1, round(head.sulcus_mm / mm)))
    folds[_convexity_sulci(head, brain, head.sulcus_mm)] = 1
    _lines(folds, fissures, 1, max(1, round((1.6 + head.fissure_extra_mm) / mm)))
    tissue = brain & (1 - folds)
    depth = cv2.distanceTransform(tissue, cv2.DIST_L2, 3)  # cortex: tissue near any CSF surface
    lab = ic * np.uint8(CSF)
    lab[tissue > 0] = WM
    lab[(tissue > 0) & (depth <= head.gm_mm / mm)] = GM

    def ellipse(uv: tuple[float, float], axes: tuple[float, float], side: int, tilt: float, value: int) -> None:
        c = head.px(np.array(uv), side)
        half_axes = (int(axes[0] * head.bx * w * 16), int(axes[1] * head.by * w * 16))
        cv2.ellipse(lab, (int(c[0] * 16), int(c[1] * 16)), half_axes, side * tilt, 0, 360, value, -1, cv2.LINE_8, 4)

    for side in (1, -1):
        ellipse((0.235, -0.17), (0.08, 0.11), side, 0, DEEP_GM)  # caudate head
        _fill(lab, head.px(LENTIFORM, side), DEEP_GM)
        ellipse((0.115, 0.1), (0.1, 0.14), side, 8, DEEP_GM)  # thalamus
    septum = head.px(np.array([[0.0, -0.43 * head.vent_scale.max()], [0.0, -0.03]]))
    _lines(lab, [septum], SEPTUM, max(1, round(2 * 0.012 * head.bx * w)))
    ventricles = []
    for s, side in zip(head.vent_scale, (1, -1)):
        # frontal horns widen laterally from the septum; they lengthen less than they widen
        hu, hv = FRONTAL_HORN[:, 0], FRONTAL_HORN[:, 1]
        horn = np.stack([0.012 + (hu - 0.012) * s, -0.06 + (hv + 0.06) * (0.6 + 0.4 * s)], 1)
        atrium = (ATRIUM - [0.15, 0.3]) * [s, 0.5 + 0.5 * s] + [0.15, 0.3]
        ventricles += [head.px(horn, side), head.px(atrium, side)]
    for poly in ventricles:
        _fill(lab, poly, VENTRICLE)
    third = 0.014 * head.vent_scale.mean() ** 2
    _fill(lab, head.px(np.array([[-third, -0.04], [third, -0.04], [third, 0.2], [-third, 0.2]])), VENTRICLE)
    for side in (1, -1):
        ellipse((0.2, 0.33), (0.035, 0.05), side, 0, CHOROID)  # glomus of the choroid plexus
    return ext, ic, brain, lab, ventricles, np.round(brain_outline).astype(np.float32)


def _plan_mass(head: _Head, finding: Finding, brain_contour: np.ndarray, rng: np.random.Generator) -> _Mass:
    sgn, severity = (1 if finding.side == "left" else -1), finding.severity or "moderate"
    if finding.name == "tumor":
        diameter = rng.uniform(*TUMOUR_DIAMETER_MM[severity])
        uv, min_mid = TUMOUR_CENTRES[finding.location or "frontal"], 0.75
    else:
        deep = finding.location in ("basal_ganglia", "thalamus", None)
        diameter = rng.uniform(*(DEEP_BLEED_DIAMETER_MM if deep else BLEED_DIAMETER_MM)[severity])
        uv, min_mid = BLEED_CENTRES[finding.location or "basal_ganglia"], (0.55 if deep else 0.75)
    radius = diameter / 2 / head.mm
    centre = _place(head, brain_contour, uv, sgn, radius, rng, min_mid * radius + 2 / head.mm)
    if finding.name == "tumor":
        outline = _blob(centre, radius, rng)
    else:
        outline = _blob(centre, radius, rng, aspect=rng.uniform(0.7, 0.9), tilt=rng.uniform(0, np.pi), amp=0.05)
    outline = centre + (outline - centre) * (radius * 2 / _feret(outline)[0])  # drawn diameter = sampled
    return _Mass(finding.name, outline, centre, diameter, -sgn)


def _mass_effect(head: _Head, lab: np.ndarray, ic: np.ndarray, masses: list[_Mass],
                 target_mm: float) -> tuple[np.ndarray, float]:
    """Warp the label map: each mass pushes tissue aside, and the septum is displaced by target_mm.

    Returns the warped labels and the septal shift actually drawn (mm, + towards the patient's left).
    """
    w, mm = head.work, head.mm
    grid_x = (np.arange(w, dtype=np.float32) + 0.5)[None, :]
    grid_y = (np.arange(w, dtype=np.float32) + 0.5)[:, None]
    u, v = (grid_x / w - head.cx) / head.bx, (grid_y / w - head.cy) / head.by
    taper = np.clip((1 - np.sqrt(u ** 2 + v ** 2)) / 0.15, 0, 1)  # nothing moves at the inner table
    disp_x = np.zeros((w, w), np.float32)
    disp_y = np.zeros((w, w), np.float32)
    for m in masses:
        radius = float(np.min(np.linalg.norm(m.outline - m.centre, axis=1)))
        dx, dy = _push(grid_x, grid_y, m.centre, radius, (6 + 0.4 * m.diameter_mm) / mm, taper)
        disp_x += dx
        disp_y += dy
    # subfalcine shift: largest at the septum, fading towards the falx attachments and the skull
    gauss = np.exp(-0.5 * (u / 0.4) ** 2) * np.exp(-0.5 * ((v + 0.05) / 0.45) ** 2) * taper
    mid_x, row = head.cx * w, int((head.cy + SEPTUM_V * head.by) * w)
    row_x = grid_x[0]
    central = np.abs(row_x - mid_x) < 0.5 * head.bx * w

    def septum_mm(amount: float) -> float:
        """Where the septum lands (mm from the midline) with a midline displacement of `amount` px."""
        src = (row_x - disp_x[row] - amount * gauss[row])[central]
        return float((np.interp(mid_x, src, row_x[central]) - mid_x) * mm)

    a0, a1 = 0.0, (target_mm - septum_mm(0.0)) / mm  # secant search for the exact displacement
    f0, f1 = septum_mm(a0) - target_mm, septum_mm(a1) - target_mm
    for _ in range(6):
        if abs(f1) < 0.02 or f1 == f0:
            break
        a0, a1, f0 = a1, a1 - f1 * (a1 - a0) / (f1 - f0), f1
        f1 = septum_mm(a1) - target_mm
    disp_x += a1 * gauss
    shift_mm = septum_mm(0.0)
    lab = cv2.remap(lab, grid_x - disp_x, grid_y - disp_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
    return np.where(ic > 0, np.maximum(lab, CSF), 0).astype(np.uint8), shift_mm


def _paint_mass(head: _Head, img: np.ndarray, lab: np.ndarray, brain: np.ndarray, ic: np.ndarray, m: _Mass,
                rng: np.random.Generator) -> np.ndarray:
    """Draw a tumour (with vasogenic oedema) or an acute haematoma (with an oedema rim); returns its mask."""
    w, mm, d = head.work, head.mm, m.diameter_mm
    mask = np.zeros((w, w), np.uint8)
    _fill(mask, m.outline, 1)
    mask &= ic
    near = cv2.distanceTransform(1 - mask, cv2.DIST_L2, 3) * mm
    reach = (0.15 + 0.2 * rng.random()) * d + 5 if m.name == "tumor" else 2 + 0.08 * d
    lab[(near < reach * 1.2) & (lab == CSF) & (brain > 0)] = GM  # effaced sulci
    # vasogenic oedema spreads along white matter and spares the cortex; perihaematomal oedema does not
    allowed = (WM, SEPTUM, INFARCT) if m.name == "tumor" else (GM, WM, DEEP_GM, SEPTUM, INFARCT)
    oedema = (near < reach * (1 + 0.4 * _smooth_field(rng, 18, w))) & (mask == 0)
    oedema &= np.isin(lab, allowed) | (lab >= MS_FIRST)
    hetero = _smooth_field(rng, 12, w)
    img[oedema] = head.intensity["lesion"] * 1.03 * (1 + 0.03 * hetero[oedema])
    inner = np.zeros((w, w), np.uint8)
    if m.name == "tumor":
        _fill(inner, m.centre + (m.outline - m.centre) * (1 - 2.4 / d), 1)
        signal = np.where(inner > 0, 165 + 22 * hetero, 138.0)  # thin lower-signal margin
        if d >= 30:  # central necrosis: intermediate signal (proteinaceous fluid)
            core = np.zeros((w, w), np.uint8)
            _fill(core, _blob(m.centre, 0.22 * d / mm, rng), 1)
            signal = np.where(core > 0, 112 + 10 * hetero, signal)
    else:
        _fill(inner, m.centre + (m.outline - m.centre) * (1 - 3.0 / d), 1)
        signal = np.where(inner > 0, 72 + 14 * hetero, 42.0)  # deoxyhaemoglobin, darker rim
    img[mask > 0] = signal[mask > 0]
    return mask > 0


def _evans_index(head: _Head, lab: np.ndarray, ic: np.ndarray) -> float:
    """Widest span of the frontal horns over the widest inner diameter of the skull."""
    w = head.work
    horns = (lab == VENTRICLE)[int((head.cy - 0.6 * head.by) * w): int((head.cy - 0.08 * head.by) * w)]
    left, right = np.argmax(horns, axis=1), w - 1 - np.argmax(horns[:, ::-1], axis=1)
    span = np.where(horns.any(axis=1), right - left + 1, 0)
    return float(span.max()) / float(np.count_nonzero(ic, axis=1).max())


def _midline_mask(lab: np.ndarray, mid_x: float) -> np.ndarray:
    """The displaced septum pellucidum plus the ideal midline over the same rows."""
    mask = lab == SEPTUM
    mask[np.nonzero(mask.any(axis=1))[0], int(mid_x)] = True
    return mask


def render(findings: list[Finding], size: int, rng: np.random.Generator) -> Rendered:
    """Draw one axial FLAIR slice with the given findings; returns the image and filled-in findings."""
    w = size * (4 if size < 128 else (2 if size <= 256 else 1))  # supersampled grid
    by_name = {f.name: f for f in findings}
    atrophy = by_name.get("atrophy")
    head = _Head(rng, w, (atrophy.severity or "moderate") if atrophy else None)
    noise_rng = _child(rng)  # drawn before the findings' generators: a normal shares its noise
    frng = {f.name: _child(rng) for f in findings}
    mm, inten = head.mm, head.intensity
    ext, ic, brain, lab, ventricles, brain_contour = _normal_labels(head)

    # lesions of the tissue itself, moved with it by any mass effect
    if "infarct" in by_name:
        lab[_territory_mask(head, lab, by_name["infarct"], frng["infarct"])] = INFARCT
    ms_axes: list[float] = []
    if "ms_lesions" in by_name:
        ms_axes = _ms_lesions(head, lab, ventricles, by_name["ms_lesions"].severity or "moderate", frng["ms_lesions"])

    masses = [_plan_mass(head, by_name[n], brain_contour, frng[n]) for n in ("tumor", "hemorrhage") if n in by_name]
    requested_shift = by_name.get("midline_shift")
    target_mm = sum(m.induced_shift_mm for m in masses)
    if requested_shift is not None:  # the requested size; away from the masses when there are any
        magnitude = frng["midline_shift"].uniform(*SHIFT_MM[requested_shift.severity or "moderate"])
        away = np.sign(sum(m.push * m.diameter_mm for m in masses))
        target_mm = magnitude * (away if away != 0 else (1 if requested_shift.side == "left" else -1))
    shift_mm = 0.0
    if masses or requested_shift is not None:
        lab, shift_mm = _mass_effect(head, lab, ic, masses, target_mm)

    lut = np.zeros(256, np.float32)
    lut[[CSF, GM, WM, DEEP_GM, VENTRICLE, CHOROID, SEPTUM, INFARCT]] = [
        inten["csf"], inten["gm"], inten["wm"], inten["deep"], inten["csf"] * 0.85, inten["choroid"],
        inten["wm"] * 0.9, inten["lesion"] * 0.95]
    lut[MS_FIRST:] = inten["lesion"]
    img = lut[lab] * (1 + 0.035 * head.texture)
    mass_masks = {m.name: _paint_mass(head, img, lab, brain, ic, m, frng[m.name]) for m in masses}
    img = np.where(ic > 0, img, ext)

    # acquisition: area downsampling (partial volume), receive-coil bias field, Rician noise
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    xs = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    b1, b2, b3 = head.bias
    img *= 1 + b1 * xs[None, :] + b2 * xs[:, None] + b3 * 4 * (xs[None, :] ** 2 + xs[:, None] ** 2)
    noise = noise_rng.standard_normal((2, size, size), dtype=np.float32) * head.noise_sigma
    image = np.clip(np.round(np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)), 0, 255).astype(np.uint8)

    # measurements of what was drawn
    evans = _evans_index(head, lab, ic)
    covered = np.zeros((w, w), bool)
    for m in mass_masks.values():
        covered |= m
    result: list[Finding] = []
    for f in findings:
        g = f.copy()
        if f.name in mass_masks:
            outline = next(m.outline for m in masses if m.name == f.name)
            long_mm, wide_mm = (v * mm for v in _feret(outline))
            g.measurements["diameter_mm"] = round(long_mm, 1)
            if f.name == "hemorrhage":  # ABC/2, craniocaudal extent taken as the mean in-plane axis
                g.measurements["volume_ml"] = round(long_mm * wide_mm * (long_mm + wide_mm) / 4 / 1000, 1)
            mask = mass_masks[f.name]
        elif f.name == "infarct":
            mask = (lab == INFARCT) & ~covered
            g.measurements["area_cm2"] = round(float(mask.sum()) * mm * mm / 100, 2)
        elif f.name == "ms_lesions":
            mask = (lab >= MS_FIRST) & ~covered
            visible = np.unique(lab[mask]) - MS_FIRST
            g.measurements["lesion_count"] = float(len(visible))
            g.measurements["max_diameter_mm"] = round(max((ms_axes[i] for i in visible), default=0.0), 1)
        elif f.name == "atrophy":
            mask = np.isin(lab, (CSF, VENTRICLE)) & (brain > 0)
            g.measurements["evans_index"] = round(evans, 3)
        else:  # midline_shift
            g.side = _shift_side(shift_mm)
            mask = _midline_mask(lab, head.cx * w)
            g.measurements["midline_shift_mm"] = round(abs(shift_mm), 1)
        g.bbox = bbox_of(mask)
        result.append(g)
    if requested_shift is None and abs(shift_mm) >= 1.0:  # a mass shifted the midline: say so
        sev = "mild" if abs(shift_mm) < 5 else ("moderate" if abs(shift_mm) < 10 else "severe")
        result.append(Finding("midline_shift", side=_shift_side(shift_mm), severity=sev,
                              measurements={"midline_shift_mm": round(abs(shift_mm), 1)},
                              bbox=bbox_of(_midline_mask(lab, head.cx * w))))
    study = {"evans_index": round(evans, 3), "midline_shift_mm": round(abs(shift_mm), 1),
             "field_of_view_mm": FOV_MM, "pixel_spacing_mm": FOV_MM / size}
    return Rendered(image=image, findings=result, measurements=study)


FINDINGS = {
    "tumor": FindingSpec(
        name="tumor",
        terms=("intra-axial mass", "tumour", "tumor", "intra-axial neoplasm", "space-occupying lesion", "SOL"),
        templates=(
            "{severity} {side} {location} {term} with surrounding vasogenic oedema and local mass effect",
            "{severity} heterogeneous FLAIR-hyperintense {side} {location} {term}, {diameter_mm} mm, "
            "with perilesional oedema",
            "{side} {location} {term} measuring {diameter_mm} mm with surrounding vasogenic oedema "
            "and effacement of the adjacent sulci",
            "{severity} {side} {location} {term} with finger-like white matter oedema",
        ),
        sides=("left", "right"),
        locations=LOBES,
        severities=SEVERITIES,
        severity_words={"mild": ("small",), "moderate": ("moderate-sized", "medium-sized"), "severe": ("large",)},
        location_words={lobe: (lobe, f"{lobe} lobe") for lobe in LOBES},
        accompanies=("midline_shift",),  # a mass that shifts the midline by 1 mm or more is drawn and reported with it
    ),
    "infarct": FindingSpec(
        name="infarct",
        terms=("infarct", "infarction", "ischaemic infarct", "ischemic infarct", "cerebral infarct"),
        templates=(
            "{severity} {side} {location} {term}",
            "{severity} wedge-shaped {side} {location} {term} involving the cortex and subcortical white matter",
            "{severity} {side} {location} {term} with FLAIR hyperintensity of the cortex and underlying white matter",
        ),
        sides=("left", "right"),
        locations=("mca", "aca", "pca"),
        severities=SEVERITIES,
        severity_words={"mild": ("small",), "moderate": ("moderate-sized", "moderate"),
                        "severe": ("large", "extensive")},
        location_words={"mca": ("MCA territory", "middle cerebral artery territory"),
                        "aca": ("ACA territory", "anterior cerebral artery territory"),
                        "pca": ("PCA territory", "posterior cerebral artery territory")},
    ),
    "hemorrhage": FindingSpec(
        name="hemorrhage",
        terms=("intraparenchymal haemorrhage", "intraparenchymal hemorrhage", "intracerebral haemorrhage",
               "intracerebral hemorrhage", "ICH", "parenchymal haematoma", "parenchymal hematoma"),
        templates=(
            "{severity} {side} {location} {term}",
            "{severity} {side} {location} {term} with a rim of perihaematomal oedema",
            "{side} {location} {term} measuring {diameter_mm} mm (approximately {volume_ml} mL)",
            "{severity} {side} {location} {term}, heterogeneously hypointense on FLAIR "
            "with surrounding hyperintense oedema",
        ),
        sides=("left", "right"),
        locations=("basal_ganglia", "thalamus") + LOBES,
        severities=SEVERITIES,
        severity_words={"mild": ("small",), "moderate": ("moderate-sized", "moderate"), "severe": ("large",)},
        location_words={"basal_ganglia": ("basal ganglia", "putaminal"), "thalamus": ("thalamic",),
                        **{lobe: (f"{lobe} lobar", lobe) for lobe in LOBES}},
        accompanies=("midline_shift",),
    ),
    "atrophy": FindingSpec(
        name="atrophy",
        terms=("cerebral atrophy", "generalised cerebral volume loss", "generalized cerebral volume loss",
               "brain atrophy", "global cerebral volume loss"),
        templates=(
            "{severity} {term}",
            "{severity} {term} with prominent sulci and ex vacuo dilatation of the lateral ventricles",
            "{severity} {term} (Evans index {evans_index})",
            "{severity} {term} with proportionate widening of the sulci and ventricles",
        ),
        severities=SEVERITIES,
        severity_words={"mild": ("mild",), "moderate": ("moderate",), "severe": ("severe", "marked", "advanced")},
    ),
    "midline_shift": FindingSpec(
        name="midline_shift",
        terms=("midline shift", "shift of the midline structures", "MLS"),
        templates=(
            "{severity} {side} {term}",
            "{side} {term} of {midline_shift_mm} mm at the level of the septum pellucidum",
            "{severity} {side} {term} measuring {midline_shift_mm} mm",
        ),
        sides=("left", "right"),
        severities=SEVERITIES,
        severity_words={"mild": ("mild", "slight"), "moderate": ("moderate",), "severe": ("marked", "severe")},
        side_away_from=("tumor", "hemorrhage"),
    ),
    "ms_lesions": FindingSpec(
        name="ms_lesions",
        terms=("periventricular demyelinating lesions", "demyelinating plaques", "multiple sclerosis plaques",
               "MS plaques"),
        templates=(
            "{severity} {term}",
            "{severity} ovoid FLAIR-hyperintense {term} oriented perpendicular to the lateral ventricles",
            "{severity} {term}, predominantly periventricular, with long axes perpendicular to the ventricular "
            "margins (Dawson's fingers)",
        ),
        severities=SEVERITIES,
        severity_words={"mild": ("a few",), "moderate": ("several",), "severe": ("numerous", "extensive")},
    ),
}

SPEC = PhantomSpec(
    name="brain_mri",
    channels=1,
    findings=FINDINGS,
    render=render,
    techniques=(
        "MRI brain, axial T2-weighted FLAIR",
        "MR head without contrast: axial fluid-attenuated inversion recovery (FLAIR) image at the level of the "
        "lateral ventricles",
        "Axial T2 FLAIR MRI of the brain",
        "MRI brain (non-contrast), axial T2-FLAIR sequence",
        "Brain MR, axial FLAIR (fluid-attenuated inversion recovery)",
    ),
    normal_statements=(
        "The ventricles and sulci are normal in size and configuration. No abnormal FLAIR signal. "
        "Midline structures are central.",
        "Normal grey-white matter differentiation with no parenchymal signal abnormality; "
        "ventricles and sulci are appropriate for age.",
        "No intra-axial or extra-axial mass, haemorrhage or abnormal FLAIR hyperintensity. No midline shift.",
        "Brain parenchyma is of normal signal. The ventricular system is normal in size and the midline "
        "is undisplaced.",
        "No mass effect, midline shift or hydrocephalus. Grey-white matter differentiation is preserved.",
    ),
    impression_normal=(
        "Normal MRI brain.",
        "Unremarkable MRI of the brain.",
        "No intracranial abnormality on this FLAIR image.",
        "Normal study.",
    ),
)
