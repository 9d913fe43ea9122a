"""Retinal OCT phantom: a spectral-domain horizontal B-scan through the fovea.

Anatomy model. The retina is a stack of horizontal bands whose thicknesses are smooth
functions of the lateral distance from the foveal centre; every band is drawn relative to
Bruch's membrane (BM), the reference surface. From BM upwards: RPE (brightest band), the
interdigitation zone, photoreceptor outer segments, the ellipsoid zone (bright thin line),
the myoid zone, the external limiting membrane, the outer nuclear layer (dark, thickest
under the fovea), outer plexiform (medium), inner nuclear (dark), inner plexiform and
ganglion cell layers (medium) and the nerve fibre layer (bright, thickening towards the
disc). A foveal pit thins the inner layers to nothing at the foveola; the cones' longer
outer segments give a slight foveal bulge of the ellipsoid zone. Below BM lie the
choriocapillaris, the choroidal stroma with dark vessel lumens (Sattler, Haller), and the
sclera, all fading with depth. Superficial retinal vessels (GCL/NFL junction) cast
vertical shadows. Each band is integrated exactly over every pixel's depth extent, so thin
lines stay visible at 64 px; the linear reflectivity is then multiplied by speckle
(gamma-distributed, i.e. fully developed speckle averaged over a few frames), added to a
noise floor and log-compressed as on a clinical viewer.

Findings change the band geometry (fluid lifts the neurosensory retina, deposits lift the
RPE off BM, cysts swell the nuclear layers, a membrane flattens the pit) or carve the stack
(macular hole), so any combination composes. What a finding draws beyond itself is listed as
a further finding after the requested ones, so a report never denies it: a CNV's subretinal
fluid (and, from moderate up, intraretinal cysts), a macular hole's cystic edges.

Conventions. Every scan is of a right eye (OD) displayed as on Heidelberg Spectralis and
Zeiss Cirrus: vitreous at the top, choroid at the bottom, nasal (optic disc side) on the
viewer's right and temporal on the viewer's left. Findings therefore carry no side;
"parafoveal_nasal" / "parafoveal_temporal" lesions are centred about 1 mm nasal / temporal
of the foveal centre, "foveal" ones on it.

Field of view. The square frame shows a 6 mm wide by 1.5 mm deep section, so depth is
stretched 4x as on clinical displays (Spectralis shows 6 x 1.9 mm at about 3x); the retina and
choroid occupy roughly the middle third.
Thicknesses are in micrometres, ILM to Bruch's membrane (Spectralis convention).
``central_thickness_um`` is the mean over the central 1 mm of the scan (the B-scan analogue
of the ETDRS central subfield thickness), leaving out columns through a macular hole.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np
from scipy import ndimage

from .base import Finding, FindingSpec, PhantomSpec, Rendered, bbox_of

SCAN_WIDTH_MM = 6.0
SCAN_DEPTH_UM = 1500.0
LOCATION_CENTRE_MM = {"foveal": 0.0, "parafoveal_nasal": 1.0, "parafoveal_temporal": -1.0}
FOVEAL_LOCATIONS = tuple(LOCATION_CENTRE_MM)

# Band stack from deep to superficial; the drusen, sub-RPE, SHRM, SRF and ERM bands have zero
# thickness in a normal eye. Reflectivities are dB above the noise floor.
BANDS = ("sclera", "choroid", "choriocapillaris", "bm", "drusen", "sub_rpe", "rpe", "shrm", "srf", "iz", "os",
         "ez", "myoid", "elm", "onl", "opl", "inl", "ipl", "gcl", "nfl", "erm_gap", "erm")
BAND_DB = {"sclera": 19.0, "choroid": 20.0, "choriocapillaris": 23.0, "bm": 28.0, "drusen": 19.5, "sub_rpe": 3.0,
           "rpe": 34.0, "shrm": 28.0, "srf": 2.0, "iz": 22.0, "os": 14.0, "ez": 30.0, "myoid": 11.0,
           "elm": 18.5, "onl": 8.5, "opl": 22.0, "inl": 12.0, "ipl": 22.5, "gcl": 18.5, "nfl": 29.5,
           "erm_gap": 0.0, "erm": 33.0}
FLUID_DB = 2.0  # cystoid and subretinal fluid: nearly as dark as vitreous
DEEP_UM = 5000.0  # the stack runs from -DEEP_UM (sclera) to +DEEP_UM (vitreous)


def _lin(db: np.ndarray | float) -> np.ndarray | float:
    return 10.0 ** (np.asarray(db) / 10.0)


def _dome(x_um: np.ndarray, half_width_um: float, power: float) -> np.ndarray:
    """Unit-height dome (1 - (x/w)^2)^power, zero outside |x| < w."""
    return np.clip(1.0 - (x_um / half_width_um) ** 2, 0.0, None) ** power


class _Scan:
    """Per-column band geometry (micrometres above BM) and the 2-D features drawn on it."""

    def __init__(self, rng: np.random.Generator, n: int):
        self.n = n
        self.dy_um = SCAN_DEPTH_UM / n  # axial micrometres per internal pixel
        self.dx_um = SCAN_WIDTH_MM * 1000.0 / n
        cols = (np.arange(n) + 0.5) / n
        self.fovea_u = 0.5 + rng.uniform(-0.035, 0.035)
        self.xf = (cols - self.fovea_u) * SCAN_WIDTH_MM  # mm from the fovea, nasal positive
        u = cols - 0.5
        # BM line (image rows): slight tilt and posterior-pole curvature
        self.y_bm = (rng.uniform(0.5, 0.56) + rng.uniform(-0.06, 0.06) * u + rng.uniform(-0.16, 0.03) * u * u) * n

        xf, ax = self.xf, np.abs(self.xf)
        sigma, power = rng.uniform(0.36, 0.46), rng.uniform(2.0, 2.6)
        self.pit = np.exp(-0.5 * (ax / sigma) ** power)
        self.pit_depth = 1.0  # an epiretinal membrane flattens the pit
        narrow = np.exp(-0.5 * (ax / (0.55 * sigma)) ** 2)

        def ring(centre: float, width: float) -> np.ndarray:
            return np.exp(-(((ax - centre) / width) ** 2))

        s_inner, s_onl = rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1)
        self.base = {
            "nfl": rng.uniform(0.85, 1.15) * (10 + 14 * np.clip(xf, 0, None) + 2.5 * np.clip(-xf, 0, None)),
            "gcl": s_inner * (18 + 34 * ring(1.0, 0.85)),
            "ipl": s_inner * (24 + 14 * ring(1.0, 1.0)),
            "inl": s_inner * (22 + 16 * ring(0.9, 1.0)),
            "opl": 20 + 8 * ring(0.8, 1.0),
            "onl": s_onl * (50 + 14 * np.exp(-((xf / 1.5) ** 2))) + rng.uniform(50, 66) * self.pit,
            "myoid": 20 + 6 * self.pit, "os": 24 + rng.uniform(9, 15) * narrow,
            "iz": np.full(n, 8.0), "ez": np.full(n, 12.0), "elm": np.full(n, 5.0),
            "rpe": rng.uniform(17, 23) + self._profile(rng, 2.0), "bm": np.full(n, 6.0),
            "choriocapillaris": np.full(n, 12.0),
            "choroid": rng.uniform(230, 360) * (1 - 0.08 * xf) + self._profile(rng, 18.0),
        }
        self.db = {k: np.full(n, v + rng.uniform(-1.2, 1.2)) for k, v in BAND_DB.items()}
        self.gain_db = rng.uniform(-1.5, 1.5) + self._profile(rng, 1.0) - 6.0 * u * u
        self.att_retina = rng.uniform(0.004, 0.01)  # dB per um through the retina
        self.att_choroid = rng.uniform(0.03, 0.045)  # dB per um below BM
        # findings add to these; the normal eye has none
        self.add = {k: np.zeros(n) for k in BANDS}
        self.lifts: list[tuple[np.ndarray, np.ndarray]] = []  # sub-RPE elevation (um) and its content (dB)
        self.cysts: list[tuple[str, float, float, float]] = []  # layer, centre mm, half-width um, half-height um
        self.hole: dict | None = None
        self.blobs: list[tuple[float, float, float, float, float]] = []  # free ellipses: x mm, h um, a um, b um, dB
        # retinal vessels in the ganglion cell layer, outside the foveal avascular zone
        k = int(rng.integers(3, 7))
        self.vessels = [(rng.choice([-1, 1]) * rng.uniform(0.55, 2.8), rng.uniform(35, 110), rng.uniform(4, 9))
                        for _ in range(k)]
        self.choroid_vessels = []  # (x mm, depth fraction, half-width um, residual signal); larger deeper (Haller)
        for _ in range(int(rng.integers(40, 56))):
            depth = rng.uniform(0.15, 0.85)
            self.choroid_vessels.append((rng.uniform(-3.3, 3.3), depth, 50 + 260 * depth * rng.uniform(0.4, 1.0),
                                         rng.uniform(0.12, 0.35), rng.uniform(0.45, 0.8)))

    def _profile(self, rng: np.random.Generator, amp: float) -> np.ndarray:
        """Smooth random lateral profile; drawn on a fixed grid so every size gets the same eye."""
        ctrl = ndimage.gaussian_filter1d(rng.standard_normal(40), 3.0, mode="nearest")
        ctrl = amp * ctrl / (ctrl.std() + 1e-9)
        return np.interp((np.arange(self.n) + 0.5) / self.n, np.linspace(0, 1, 40), ctrl)

    def x_um(self, centre_mm: float) -> np.ndarray:
        return (self.xf - centre_mm) * 1000.0

    def lift(self, height_um: np.ndarray, content_db: np.ndarray | float) -> None:
        self.lifts.append((height_um, np.broadcast_to(np.asarray(content_db, float), (self.n,))))

    # ---- geometry -------------------------------------------------------------------
    def thickness(self) -> dict[str, np.ndarray]:
        pit = self.pit * self.pit_depth
        t = {k: v.copy() for k, v in self.base.items()}
        for k in ("nfl", "gcl", "ipl", "inl"):
            t[k] = t[k] * (1 - pit)
        t["opl"] = t["opl"] * (1 - 0.85 * pit)
        t["sclera"] = np.full(self.n, DEEP_UM)
        for name in ("drusen", "sub_rpe", "shrm", "srf", "erm_gap", "erm"):
            t[name] = np.zeros(self.n)
        if self.lifts:  # PED / fibrovascular tissue over any drusen material
            heights = np.stack([h for h, _ in self.lifts])
            t["sub_rpe"] = heights.max(0)
            self.db["sub_rpe"] = np.stack([d for _, d in self.lifts])[heights.argmax(0), np.arange(self.n)]
        for layer in ("inl", "onl", "opl"):  # cysts swell their layer smoothly, leaving septa around them
            chords = [self._chord(c) + 8.0 * (self._chord(c) > 0) for c in self.cysts if c[0] == layer]
            if chords:
                reach = max(1, int(60 / self.dx_um))
                swell = ndimage.maximum_filter1d(np.max(chords, axis=0), 2 * reach + 1)
                t[layer] = t[layer] + ndimage.gaussian_filter1d(swell, 150 / self.dx_um)
        for k, v in self.add.items():
            t[k] = t[k] + v
        if self.hole is not None:  # rounded hole edges: the retina curves down into the defect
            lip = np.clip((np.abs(self.x_um(0.0)) - self.hole["mld"] / 2) / self.hole["lip"], 0, 1)
            lip = 0.15 + 0.85 * np.sqrt(1 - (1 - lip) ** 2)
            for k in ("onl", "opl", "inl", "ipl", "gcl", "nfl"):
                t[k] = t[k] * lip
        t["srf"] = np.maximum(t["srf"] - t["shrm"], 0.0)  # fluid fills what SHRM leaves of the gap
        # the neurosensory retina drapes over steep elevations: the outer nuclear layer fills the corners
        t["sub_rpe"] = np.clip(t["sub_rpe"] - t["drusen"], 0, None)
        floor = t["drusen"] + t["sub_rpe"] + t["shrm"] + t["srf"]
        t["onl"] = t["onl"] + np.clip(ndimage.gaussian_filter1d(floor, 120 / self.dx_um) - floor, 0, None)
        return {k: np.clip(v, 0, None) for k, v in t.items()}

    def _chord(self, cyst: tuple[str, float, float, float]) -> np.ndarray:
        _, centre, a, b = cyst
        return 2 * b * np.sqrt(np.clip(1 - (self.x_um(centre) / a) ** 2, 0, None))

    def boundaries(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """name -> (lower, upper) height above BM of every band, per column."""
        t = self.thickness()
        below = ("sclera", "choroid", "choriocapillaris")
        level = -sum(t[k] for k in below)
        out = {}
        for name in BANDS:
            out[name] = (level, level + t[name])
            level = level + t[name]
        return out

    # ---- rendering --------------------------------------------------------------------
    def render_linear(self) -> tuple[np.ndarray, dict]:
        n, dy = self.n, self.dy_um
        bounds = self.boundaries()
        # knots of the cumulative reflectivity C(h) per column; each pixel is (C(top) - C(bottom)) / dy
        knots = np.stack([bounds[BANDS[0]][0]] + [bounds[b][1] for b in BANDS] + [np.full(n, DEEP_UM * 2)])
        values = np.stack([_lin(self.db[b]) for b in BANDS] + [np.zeros(n)])
        cum = np.vstack([np.zeros(n), np.cumsum(values * np.diff(knots, axis=0), axis=0)])
        offset = 4 * DEEP_UM * np.arange(n)  # one interp call for all columns: columns on disjoint ranges
        edges = (self.y_bm[None, :] - np.arange(n + 1)[:, None]) * dy
        c = np.interp((edges + offset).ravel(), (knots + offset).T.ravel(), cum.T.ravel()).reshape(n + 1, n)
        lin = (c[:-1] - c[1:]) / dy
        h = (edges[:-1] + edges[1:]) / 2  # pixel-centre height above BM
        geom = {"bounds": bounds, "h": h}

        fluid = _lin(FLUID_DB)
        for cyst in self.cysts:
            win, m = self._cyst_mask(cyst, bounds, h)
            lin[win] = lin[win] * (1 - m) + fluid * m
        for xc, hc, a, b, db in self.blobs:
            win, m = self._ellipse(xc, hc, a, b, h)
            lin[win] = lin[win] * (1 - m) + _lin(db) * m
        # retinal vessels: bright lumen in the GCL, shadow below
        gcl_lo, gcl_hi = bounds["gcl"]
        for xc, d, shadow_db in self.vessels:
            j = int(np.clip(np.searchsorted(self.xf, xc), 0, n - 1))
            room = bounds["nfl"][1][j] - gcl_lo[j]  # vessels lie in the ganglion cell and nerve fibre layers
            if room < 40:
                continue
            hc, d = gcl_hi[j], min(d, 0.9 * room)
            cs = self._cols(xc, d / 2)
            rs = self._rows(cs, -DEEP_UM, hc)
            across = np.clip(0.5 - (np.abs(self.x_um(xc)[cs]) - d / 2) / self.dx_um, 0, 1)[None, :]
            lin[rs, cs] *= 1 - across * (h[rs, cs] < hc - d / 2) * (1 - _lin(-shadow_db))
            win, m = self._ellipse(xc, hc, d / 2, d / 2.5, h)
            lin[win] = lin[win] * (1 - m) + _lin(31.0) * m
        # choroidal vessel lumens
        ch_lo = bounds["choroid"][0]
        for xc, depth, a, dark, aspect in self.choroid_vessels:
            j = int(np.clip(np.searchsorted(self.xf, xc), 0, n - 1))
            thick = -ch_lo[j] - 12.0
            # lumens look a little flattened on the display (aspect = displayed height / width)
            b = min(a * aspect * self.dy_um / self.dx_um * 1.5, thick * min(depth, 1 - depth))
            win, m = self._ellipse(xc, -12.0 - depth * thick, a, b, h)
            lin[win] *= 1 - m * (1 - dark)
        if self.hole is not None:
            hole = np.zeros_like(lin)
            cs = self._cols(0.0, max(self.hole["base"] / 2, self.hole["mld"] / 2 + self.hole["flare"]))
            hole[:, cs] = self._hole_mask(bounds, h[:, cs], cs)
            lin = lin * (1 - hole) + 0.6 * fluid * hole
            geom["hole"] = hole
        ilm = bounds["erm"][1]
        att = -self.att_retina * np.clip(ilm[None, :] - h, 0, None) - self.att_choroid * np.clip(-h, 0, None)
        lin = lin * _lin(att + self.gain_db[None, :])
        return lin.astype(np.float32), geom

    def _cols(self, xc: float, half_um: float) -> slice:
        """Columns covering xc +- half_um (mm from the fovea)."""
        def col(x_mm: float) -> float:
            return (x_mm / SCAN_WIDTH_MM + self.fovea_u) * self.n - 0.5
        j0, j1 = int(np.floor(col(xc - half_um / 1000))) - 1, int(np.ceil(col(xc + half_um / 1000))) + 2
        return slice(min(max(j0, 0), self.n), min(max(j1, 0), self.n))

    def _rows(self, cs: slice, h_lo, h_hi) -> slice:
        """Rows covering heights h_lo..h_hi (scalars or per-column arrays) within columns cs."""
        y = self.y_bm[cs]
        if y.size == 0:
            return slice(0, 0)
        i0 = int(np.floor(np.min(y - np.asarray(h_hi) / self.dy_um))) - 2
        i1 = int(np.ceil(np.max(y - np.asarray(h_lo) / self.dy_um))) + 2
        return slice(min(max(i0, 0), self.n), min(max(i1, 0), self.n))

    def _ellipse(self, xc: float, hc: float, a: float, b: float, h: np.ndarray):
        cs = self._cols(xc, a)
        rs = self._rows(cs, hc - b, hc + b)
        r = np.sqrt((self.x_um(xc)[cs][None, :] / a) ** 2 + ((h[rs, cs] - hc) / b) ** 2)
        return (rs, cs), np.clip((1 - r) * min(a / self.dx_um, b / self.dy_um) + 0.5, 0, 1)

    def _cyst_mask(self, cyst, bounds, h: np.ndarray):
        cs = self._cols(cyst[1], cyst[2])
        lo, hi = bounds[cyst[0]]
        half, mid = self._chord(cyst)[cs] / 2, (lo[cs] + hi[cs]) / 2
        rs = self._rows(cs, mid - half, mid + half)
        m = np.clip((half[None, :] - np.abs(h[rs, cs] - mid[None, :])) / self.dy_um + 0.5, 0, 1)
        return (rs, cs), m * (half > 0)[None, :]

    def _hole_mask(self, bounds, h: np.ndarray, cs: slice) -> np.ndarray:
        """Full-thickness defect: narrowest (the minimum linear diameter) at mid-depth, wide at the base."""
        hole = self.hole
        bottom, top = bounds["shrm"][0][cs][None, :], bounds["erm"][1][cs][None, :]
        t = np.clip((h - bottom) / np.maximum(top - bottom, 1.0), 0, 1)
        waist = hole["waist"]
        below = np.clip((waist - t) / waist, 0, 1) ** 2
        above = np.clip((t - waist) / (1 - waist), 0, 1) ** 2
        half = hole["mld"] / 2 + (hole["base"] - hole["mld"]) / 2 * below + hole["flare"] * above
        inside = np.clip((half - np.abs(self.x_um(0.0)[cs])[None, :]) / self.dx_um + 0.5, 0, 1)
        return inside * (h >= bottom) * (h <= top + self.dy_um)

    def central_thickness_um(self, bounds) -> float:
        thick = bounds["nfl"][1]
        central = np.abs(self.xf) <= 0.5
        if self.hole is not None:
            central &= np.abs(self.x_um(0.0)) > self.hole["mld"] / 2
        if not central.any():  # a hole wider than the subfield: measure just outside it
            central = np.abs(self.x_um(0.0)) <= self.hole["mld"] / 2 + 100.0
        return float(thick[central].mean())


# ---- findings -------------------------------------------------------------------------
# finish(geometry) -> (mask of what was drawn, measurements, [(finding the drawing caused, its mask)])
Finish = Callable[[dict], tuple[np.ndarray, dict[str, float], list[tuple[Finding, np.ndarray]]]]


def _centre(finding: Finding, rng: np.random.Generator) -> float:
    """Lesion centre in mm from the fovea (nasal positive) for the finding's location."""
    base = LOCATION_CENTRE_MM.get(finding.location or "foveal", 0.0)
    return base + rng.uniform(-0.1, 0.1) if base == 0 else base + rng.uniform(-0.15, 0.2) * np.sign(base)


def _level(finding: Finding) -> int:
    """0, 1, 2 for mild/small, moderate/medium, severe/large (moderate when unset)."""
    order = {"mild": 0, "moderate": 1, "severe": 2, "small": 0, "medium": 1, "large": 2}
    return order.get(finding.severity or "", 1)


def _band_mask(h: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    return (h >= lower[None, :]) & (h <= upper[None, :]) & ((upper - lower) > 3.0)[None, :]


def _add_cysts(scan: _Scan, rng: np.random.Generator, centre: float, spread_um: float, count: int,
               a_range: tuple[float, float], b_range: tuple[float, float]) -> list:
    cysts = []
    offsets = np.linspace(-1, 1, count) if count > 1 else np.zeros(1)
    lead = int(np.argmin(np.abs(offsets)))  # the largest cyst, central in the outer nuclear (Henle) layer
    lead_b = rng.uniform(*b_range) * 1.25
    for k, off in enumerate(offsets):
        off = 0.0 if k == lead else np.clip(off + rng.uniform(-0.3, 0.3) / count, -1, 1)
        x = centre + off * spread_um / 1000.0
        layer = "onl" if k == lead or abs(x) < 0.35 or (k % 2 == 0 and abs(off) < 0.6) else "inl"
        shrink = 1 - 0.45 * abs(off)
        a, b = rng.uniform(*a_range) * shrink, rng.uniform(*b_range) * shrink
        if layer == "inl":  # INL cysts are the smaller, rounder ones
            a, b = a * 0.75, b * 0.7
        cysts.append((layer, x, a, lead_b if k == lead else min(b * 1.25, lead_b)))
    scan.cysts.extend(cysts)
    return cysts


def _cyst_finish(scan: _Scan, cysts: list) -> Finish:
    def finish(geom):
        mask = np.zeros(geom["h"].shape, dtype=bool)
        for c in cysts:
            win, m = scan._cyst_mask(c, geom["bounds"], geom["h"])
            mask[win] |= m > 0.5
        area_mm2 = mask.sum() * scan.dx_um * scan.dy_um / 1e6
        measured = {"max_cyst_height_um": float(max(2 * c[3] for c in cysts)), "fluid_area_mm2": float(area_mm2)}
        return mask, measured, []
    return finish


def _intraretinal_fluid(scan: _Scan, f: Finding, rng: np.random.Generator) -> Finish:
    lvl, centre = _level(f), _centre(f, rng)
    count = [int(rng.integers(2, 4)), int(rng.integers(4, 7)), int(rng.integers(7, 11))][lvl]
    spread = (250, 500, 800)[lvl]
    a = ((60, 100), (70, 140), (100, 200))[lvl]
    b = ((16, 28), (30, 48), (50, 85))[lvl]
    cysts = _add_cysts(scan, rng, centre, spread, count, a, b)
    scan.add["inl"] += (10, 20, 35)[lvl] * np.exp(-((scan.x_um(centre) / (spread + 300)) ** 2))
    if abs(centre) < 0.3:
        scan.pit_depth *= (0.85, 0.6, 0.3)[lvl]  # central oedema fills the pit
    return _cyst_finish(scan, cysts)


def _subretinal_fluid(scan: _Scan, f: Finding, rng: np.random.Generator) -> Finish:
    lvl, centre = _level(f), _centre(f, rng)
    height = rng.uniform(*((50, 110), (130, 220), (250, 400))[lvl])
    half_width = rng.uniform(600, 900) + 1.5 * height
    own = height * _dome(scan.x_um(centre), half_width, 1.5)
    scan.add["srf"] = np.maximum(scan.add["srf"], own)
    scan.add["os"] += 0.15 * own.clip(0, 60)  # elongated outer segments hanging into the fluid

    def finish(geom):
        lo = geom["bounds"]["srf"][0]  # fluid sits on the RPE (or on SHRM)
        measured = {"height_um": float(height), "width_um": float(2 * half_width)}
        return _band_mask(geom["h"], lo, lo + own), measured, []
    return finish


def _drusen(scan: _Scan, f: Finding, rng: np.random.Generator) -> Finish:
    lvl = _level(f)
    count = [int(rng.integers(2, 5)), int(rng.integers(5, 9)), int(rng.integers(9, 14))][lvl]
    heights = ((30, 55), (60, 95), (100, 150))[lvl]
    own = np.zeros(scan.n)
    for _ in range(count):  # scattered over the macula, confluent when many
        x, hgt = rng.uniform(-2.5, 2.5), rng.uniform(*heights)
        own = np.maximum(own, hgt * _dome(scan.x_um(x), 90 + hgt * rng.uniform(2.5, 4.0), 0.75))
    scan.add["drusen"] = np.maximum(scan.add["drusen"], own)
    scan.db["drusen"] += rng.uniform(-1.5, 1.5)
    scan.db["ez"] -= 0.04 * own  # photoreceptors attenuate over the larger drusen
    scan.add["onl"] -= 0.6 * own  # the outer retina thins over them, the inner surface stays smoother

    def finish(geom):
        lo = geom["bounds"]["drusen"][0]
        measured = {"drusen_count": float(count), "max_height_um": float(own.max())}
        return _band_mask(geom["h"], lo, lo + own), measured, []
    return finish


def _pigment_epithelial_detachment(scan: _Scan, f: Finding, rng: np.random.Generator) -> Finish:
    lvl, centre = _level(f), _centre(f, rng)
    height = rng.uniform(*((90, 150), (180, 280), (310, 420))[lvl])
    half_width = rng.uniform(500, 700) + 1.3 * height
    own = height * _dome(scan.x_um(centre), half_width, 0.7)
    scan.lift(own, 3.5)

    def finish(geom):
        lo = geom["bounds"]["drusen"][0]
        measured = {"height_um": float(height), "width_um": float(2 * half_width)}
        return _band_mask(geom["h"], lo, lo + own), measured, []
    return finish


def _epiretinal_membrane(scan: _Scan, f: Finding, rng: np.random.Generator) -> Finish:
    lvl = _level(f)
    lo_mm, hi_mm = -rng.uniform(1.3, 2.8), rng.uniform(1.3, 2.8)
    extent = ((scan.xf > lo_mm) & (scan.xf < hi_mm)).astype(float)
    extent = ndimage.gaussian_filter1d(extent, 0.1 * scan.n / SCAN_WIDTH_MM)
    scan.pit_depth *= (0.65, 0.3, 0.0)[lvl]
    thickening = (20, 60, 130)[lvl] * np.exp(-((scan.xf / 1.2) ** 2)) * extent
    for layer, share in (("inl", 0.4), ("ipl", 0.25), ("gcl", 0.15), ("onl", 0.2)):
        scan.add[layer] += share * thickening
    # wrinkled inner surface: irregular folds a few hundred micrometres apart
    folds = ndimage.gaussian_filter1d(rng.standard_normal(120), 2.0)
    folds = np.interp(scan.xf, np.linspace(-3.2, 3.2, 120), folds / (folds.std() + 1e-9))
    scan.add["nfl"] += (4, 7, 11)[lvl] * np.clip(folds + 1.2, 0, None) * extent
    scan.add["erm"] += rng.uniform(7, 12) * (extent > 0.5)
    tent = np.zeros(scan.n)
    for _ in range(int(rng.integers(2, 5))):  # focal separation of the membrane from the ILM
        centre = rng.uniform(lo_mm, hi_mm)
        tent = np.maximum(tent, rng.uniform(8, 20) * _dome(scan.x_um(centre), rng.uniform(250, 500), 2))
    scan.add["erm_gap"] += tent * (extent > 0.5)

    def finish(geom):
        b = geom["bounds"]
        mask = _band_mask(geom["h"], b["inl"][0], b["erm"][1]) & (extent > 0.5)[None, :]
        return mask, {"central_thickness_um": scan.central_thickness_um(b)}, []
    return finish


def _choroidal_neovascularization(scan: _Scan, f: Finding, rng: np.random.Generator) -> Finish:
    lvl, centre = _level(f), _centre(f, rng)
    half_width = rng.uniform(*((300, 450), (500, 750), (800, 1150))[lvl])
    x = scan.x_um(centre)
    # type 1 component: irregular fibrovascular RPE elevation with heterogeneous content
    ped = rng.uniform(*((25, 45), (50, 75), (80, 120))[lvl]) * _dome(x, half_width, 0.8)
    bumpy = 1 + 0.2 * np.sin(x / rng.uniform(60, 120))
    scan.lift(ped * bumpy, 19 + scan._profile(rng, 3.0))
    # type 2 component: fusiform subretinal hyperreflective material, bathed in fluid that spreads beyond it
    shrm_height = rng.uniform(*((35, 55), (60, 95), (110, 150))[lvl])
    shrm = shrm_height * _dome(x, 0.7 * half_width, 0.7)
    fluid = (0.5 * shrm_height + rng.uniform(10, 30) * (lvl + 1)) * _dome(x, 1.7 * half_width, 0.9)
    scan.add["shrm"] = np.maximum(scan.add["shrm"], shrm)
    scan.add["srf"] = np.maximum(scan.add["srf"], np.maximum(shrm + 12.0 * (shrm > 0), fluid))
    scan.db["shrm"] = np.full(scan.n, 23.5) + scan._profile(rng, 1.5)
    scan.db["ez"] -= 18 * (shrm > 5)  # no ellipsoid zone over the lesion
    cysts = _add_cysts(scan, rng, centre, half_width, (0, 2, 4)[lvl], (50, 120), (20, 50)) if lvl else []
    lesion = np.maximum(ped * bumpy, 1e-9)

    def finish(geom):
        b, h = geom["bounds"], geom["h"]
        sub = _band_mask(h, b["drusen"][0], b["drusen"][0] + lesion)
        above = _band_mask(h, b["shrm"][0], b["shrm"][0] + shrm + fluid)
        width = float(((ped > 5) | (shrm > 5)).sum() * scan.dx_um)
        measured = {"lesion_width_um": width, "lesion_height_um": float((ped * bumpy + shrm).max())}
        # the exudation it causes is reported too, so no report denies fluid the image shows
        srf_lo, srf_hi = b["srf"]
        in_lesion = fluid > 3
        fluid_um = float(np.max((srf_hi - srf_lo)[in_lesion], initial=0.0))
        severity = "mild" if fluid_um < 120 else "moderate" if fluid_um < 240 else "severe"
        srf_mask = _band_mask(h, srf_lo, srf_hi) & in_lesion[None, :]
        caused = [(Finding("subretinal_fluid", location=f.location, severity=severity,
                           measurements={"height_um": fluid_um, "width_um": float(in_lesion.sum() * scan.dx_um)}),
                   srf_mask)]
        mask = sub | above | srf_mask
        if cysts:
            cyst_mask, cyst_measured, _ = _cyst_finish(scan, cysts)(geom)
            irf = Finding("intraretinal_fluid", location=f.location, severity=("mild", "moderate")[lvl - 1],
                          measurements=cyst_measured)
            caused.append((irf, cyst_mask))
            mask |= cyst_mask
        return mask, measured, caused
    return finish


def _macular_hole(scan: _Scan, f: Finding, rng: np.random.Generator) -> Finish:
    lvl = _level(f)
    mld = rng.uniform(*((120, 240), (260, 390), (420, 650))[lvl])
    base = mld * rng.uniform(1.8, 2.6)
    scan.hole = {"mld": mld, "base": base, "waist": rng.uniform(0.45, 0.6), "flare": rng.uniform(40, 100),
                 "lip": rng.uniform(250, 400)}
    scan.pit_depth *= 0.2
    edge = np.exp(-(((np.abs(scan.xf) * 1000 - base / 2) / 600) ** 2))
    scan.add["onl"] += rng.uniform(30, 60) * edge  # thickened, elevated hole edges
    scan.add["inl"] += rng.uniform(15, 30) * edge
    cysts = [(layer, s * (base / 2 + rng.uniform(60, 300)) / 1000, rng.uniform(60, 130), rng.uniform(15, 32))
             for s in (-1, 1) for layer in ("inl", "onl")]  # intraretinal cysts in the hole edges
    scan.cysts.extend(cysts)
    if rng.random() < 0.5:  # operculum floating over the hole
        scan.blobs.append((rng.uniform(-0.1, 0.1), rng.uniform(520, 640), 0.4 * mld + 40, rng.uniform(10, 18), 20.0))

    def finish(geom):
        cyst_mask, cyst_measured, _ = _cyst_finish(scan, cysts)(geom)
        edge_cysts = Finding("intraretinal_fluid", location="foveal", severity="mild", measurements=cyst_measured)
        measured = {"minimum_linear_diameter_um": float(mld), "base_diameter_um": float(base)}
        return geom["hole"] > 0.5, measured, [(edge_cysts, cyst_mask)]
    return finish


DRAWERS: dict[str, Callable[[_Scan, Finding, np.random.Generator], Finish]] = {
    "intraretinal_fluid": _intraretinal_fluid,
    "subretinal_fluid": _subretinal_fluid,
    "drusen": _drusen,
    "pigment_epithelial_detachment": _pigment_epithelial_detachment,
    "epiretinal_membrane": _epiretinal_membrane,
    "choroidal_neovascularization": _choroidal_neovascularization,
    "macular_hole": _macular_hole,
}


def _display(lin: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Area-downsample, apply speckle and noise floor, log-compress to 8 bits."""
    lin = cv2.resize(lin, (size, size), interpolation=cv2.INTER_AREA)
    looks = rng.uniform(1.0, 2.2)  # frames averaged: fewer looks, stronger speckle
    speckle = rng.gamma(looks, 1.0 / looks, (size, size)).astype(np.float32)
    speckle = cv2.GaussianBlur(speckle, (0, 0), sigmaX=0.7, sigmaY=0.4)
    floor = rng.standard_exponential((size, size)).astype(np.float32)
    db = 10.0 * np.log10(lin * speckle + floor * rng.uniform(0.7, 1.3))
    lo, hi = rng.uniform(0.5, 2.0), rng.uniform(34.0, 37.0)
    grey = np.clip((db - lo) / (hi - lo), 0, 1) ** rng.uniform(1.1, 1.35)
    return (grey * 255 + 0.5).astype(np.uint8)


def render(findings: list[Finding], size: int, rng: np.random.Generator) -> Rendered:
    """Draw a foveal B-scan of a right eye with the given findings."""
    anatomy_rng, finding_rng, noise_rng = rng.spawn(3)  # anatomy and findings independent of size and noise
    n = size * (2 if size >= 96 else 3)
    scan = _Scan(anatomy_rng, n)
    finishers = [DRAWERS[f.name](scan, f, finding_rng) for f in findings]
    lin, geom = scan.render_linear()
    image = _display(lin, size, noise_rng)

    def filled(f: Finding, mask: np.ndarray, measurements: dict[str, float]) -> Finding:
        small = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
        done = f.copy(bbox=bbox_of(small > 0.3 if (small > 0.3).any() else small > 0))
        done.measurements.update(measurements)
        return done

    out, caused = [], []
    for f, finish in zip(findings, finishers):
        mask, measurements, extra = finish(geom)
        out.append(filled(f, mask, measurements))
        caused += extra
    for f, mask in caused:  # fluid a CNV exudes, cysts in a hole's edges: listed once, after the requested ones
        if f.name not in {g.name for g in out}:
            out.append(filled(f, mask, {}))
    return Rendered(image, out, {"central_thickness_um": scan.central_thickness_um(geom["bounds"])})


# ---- report vocabulary --------------------------------------------------------------------
_LOC_WITHIN = {
    "foveal": ("at the fovea", "involving the foveal centre", "centrally"),
    "parafoveal_nasal": ("nasal to the fovea", "in the nasal parafovea", "in the parafovea nasally"),
    "parafoveal_temporal": ("temporal to the fovea", "in the temporal parafovea", "in the parafovea temporally"),
}
_LOC_BENEATH = {**_LOC_WITHIN, "foveal": ("beneath the fovea", "under the foveal centre", "involving the fovea")}

FINDINGS = {
    "intraretinal_fluid": FindingSpec(
        name="intraretinal_fluid",
        terms=("intraretinal fluid", "IRF", "intraretinal cystoid spaces", "cystoid intraretinal fluid"),
        templates=("{severity} {term} {location}",
                   "{severity} {term} {location}, within the inner and outer nuclear layers",
                   "{term} {location} with retinal thickening",
                   "{term} {location}, the largest cyst measuring {max_cyst_height_um} µm in height"),
        locations=FOVEAL_LOCATIONS, severities=("mild", "moderate", "severe"),
        severity_words={"mild": ("mild", "a small amount of", "minimal"), "moderate": ("moderate",),
                        "severe": ("severe", "extensive", "a large amount of")},
        location_words=_LOC_WITHIN),
    "subretinal_fluid": FindingSpec(
        name="subretinal_fluid",
        terms=("subretinal fluid", "SRF", "serous neurosensory detachment", "neurosensory retinal detachment"),
        templates=("{severity} {term} {location}", "{term} {location}, maximum height {height_um} µm",
                   "{severity} {term} {location}, measuring {height_um} µm in height",
                   "{severity} {term} {location} separating the neurosensory retina from the RPE"),
        locations=FOVEAL_LOCATIONS, severities=("mild", "moderate", "severe"),
        severity_words={"mild": ("shallow", "small"), "moderate": ("moderate",), "severe": ("large", "extensive")},
        location_words=_LOC_BENEATH),
    "drusen": FindingSpec(
        name="drusen",
        terms=("drusen", "soft drusen", "sub-RPE deposits"),
        templates=("{severity} {term}", "{severity} {term} elevating the RPE",
                   "{severity} {term}, the tallest {max_height_um} µm",
                   "{severity} {term} ({drusen_count} on this scan)",
                   "{severity} {term} with medium reflectivity beneath the RPE"),
        severities=("mild", "moderate", "severe"),
        severity_words={"mild": ("a few small", "few scattered"), "moderate": ("several medium-sized", "multiple"),
                        "severe": ("numerous large", "numerous confluent")}),
    "pigment_epithelial_detachment": FindingSpec(
        name="pigment_epithelial_detachment",
        terms=("pigment epithelial detachment", "PED", "serous pigment epithelial detachment", "RPE detachment"),
        templates=("{severity} {term} {location}", "{term} {location}, height {height_um} µm",
                   "dome-shaped {term} {location}, measuring {height_um} µm in height",
                   "{severity} hyporeflective {term} {location}"),
        locations=FOVEAL_LOCATIONS, severities=("mild", "moderate", "severe"),
        severity_words={"mild": ("small", "shallow"), "moderate": ("moderate", "medium-sized"),
                        "severe": ("large", "tall")},
        location_words=_LOC_BENEATH,
        excludes=("macular_hole",)),
    "epiretinal_membrane": FindingSpec(
        name="epiretinal_membrane",
        terms=("epiretinal membrane", "ERM", "epimacular membrane", "macular pucker"),
        templates=("{severity} {term}", "{severity} {term} with wrinkling of the inner retinal surface",
                   "{severity} {term}; central subfield thickness {central_thickness_um} µm",
                   "{severity} hyperreflective {term} along the inner retinal surface"),
        severities=("mild", "moderate", "severe"),
        severity_words={"mild": ("mild", "thin"), "moderate": ("moderate",), "severe": ("severe", "thick")}),
    "choroidal_neovascularization": FindingSpec(
        name="choroidal_neovascularization",
        terms=("choroidal neovascularization", "CNV", "choroidal neovascular membrane",
               "macular neovascularization", "MNV"),
        templates=("{severity} {term} {location} with surrounding subretinal fluid",
                   "{term} {location}: hyperreflective subretinal material over an irregular RPE elevation, "
                   "with subretinal fluid",
                   "{severity} active {term} {location}",
                   "{term} {location}, lesion width {lesion_width_um} µm, with associated fluid"),
        locations=FOVEAL_LOCATIONS, severities=("mild", "moderate", "severe"),
        severity_words={"mild": ("small",), "moderate": ("moderate", "medium-sized"), "severe": ("large", "extensive")},
        location_words=_LOC_BENEATH,
        excludes=("macular_hole",), implies=("subretinal_fluid",), accompanies=("intraretinal_fluid",)),
    "macular_hole": FindingSpec(
        name="macular_hole",
        terms=("full-thickness macular hole", "FTMH", "macular hole"),
        templates=("{severity} {term}", "{severity} {term}, minimum linear diameter {minimum_linear_diameter_um} µm",
                   "{term} (minimum linear diameter {minimum_linear_diameter_um} µm, "
                   "base diameter {base_diameter_um} µm)",
                   "{severity} {term} with cystic thickening of the edges"),
        severities=("small", "medium", "large"),
        severity_words={"small": ("small",), "medium": ("medium", "medium-sized"), "large": ("large",)},
        excludes=("choroidal_neovascularization", "pigment_epithelial_detachment"), accompanies=("intraretinal_fluid",)),
}

SPEC = PhantomSpec(
    name="oct",
    channels=1,
    findings=FINDINGS,
    render=render,
    techniques=(
        "Spectral-domain OCT of the macula, right eye, horizontal B-scan through the fovea",
        "SD-OCT macula OD, 6 mm horizontal line scan centred on the fovea",
        "Optical coherence tomography (OCT), right eye (OD): horizontal foveal B-scan reviewed",
        "Macular OCT OD, high-resolution horizontal raster line through the foveal centre",
        "SD-OCT, right macula, single 6 mm horizontal B-scan through the fovea",
    ),
    normal_statements=(
        "Normal foveal contour with preserved retinal lamination; no intraretinal or subretinal fluid.",
        "The foveal depression is preserved. Retinal layers are intact; the ellipsoid zone and RPE are continuous.",
        "Normal macular architecture; the vitreoretinal interface is unremarkable and the RPE is flat.",
        "Well-defined retinal layers and a normal foveal pit, with no fluid, drusen or pigment epithelial detachment.",
    ),
    impression_normal=(
        "Normal macular OCT.",
        "No macular pathology on OCT.",
        "Normal study; no macular oedema or neovascular activity.",
    ),
)
