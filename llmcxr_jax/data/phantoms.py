"""Procedural chest-radiograph phantoms drawn with vectorised NumPy.

A phantom is an attenuation map built from analytic shapes (torso, lungs, heart, mediastinum,
hemidiaphragms, ribs, clavicles, spine, lung markings) plus the findings of a `StudyFindings`,
turned into a film-like grayscale image with exposure variation and noise. Shapes have analytic
soft edges about one pixel wide, which antialiases them without supersampling.

Coordinates: x, y in [-1, 1], y pointing down. Frontal (PA/AP) views show the patient's right on
the image left (x < 0); lateral views face left (anterior at x < 0, spine at x > 0).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from llmcxr_jax.data.findings import (DEVICES, SEVERITIES, SIDES, UNCERTAIN, ZONES, Finding,
                                      StudyFindings)

FRONTAL_VIEWS = ("PA", "AP")
LATERAL_VIEWS = ("LATERAL", "LL")
VIEWS = FRONTAL_VIEWS + LATERAL_VIEWS


# --------------------------------------------------------------------------------------------------
# Anatomy and findings sampling
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """Per-subject body shape; each image adds positioning jitter on top."""

    thorax_w: float  # half-width of the rib cage
    lung_top: float  # y of the lung apices
    dia_right: float  # y of the right hemidiaphragm dome (higher = smaller y)
    dia_left: float
    ctr: float  # normal cardiothoracic ratio
    heart_shift: float  # heart centre offset to the patient's left, in heart widths
    mediastinum_w: float  # upper-mediastinum half-width
    rib_spacing: float
    rib_phase: float
    body_w: float  # half-width of the soft-tissue outline
    lung_air: float  # how dark the lungs are

    @staticmethod
    def sample(rng: np.random.Generator) -> "Anatomy":
        dia_right = rng.uniform(0.40, 0.52)
        return Anatomy(
            thorax_w=rng.uniform(0.74, 0.84), lung_top=rng.uniform(-0.70, -0.60),
            dia_right=dia_right, dia_left=dia_right + rng.uniform(0.02, 0.07),
            ctr=rng.uniform(0.40, 0.47), heart_shift=rng.uniform(0.08, 0.16),
            mediastinum_w=rng.uniform(0.085, 0.11), rib_spacing=rng.uniform(0.125, 0.145),
            rib_phase=rng.uniform(0.0, 1.0), body_w=rng.uniform(0.88, 0.98),
            lung_air=rng.uniform(0.34, 0.42))


# Per-finding prior of being present in a study (before co-occurrence adjustments).
FINDING_RATES: dict[str, float] = {
    "Enlarged Cardiomediastinum": 0.10, "Cardiomegaly": 0.20, "Lung Opacity": 0.16,
    "Lung Lesion": 0.08, "Edema": 0.12, "Consolidation": 0.14, "Atelectasis": 0.16,
    "Pneumothorax": 0.08, "Pleural Effusion": 0.20, "Support Devices": 0.22,
}
NORMAL_RATE = 0.30  # fraction of studies with no finding at all (devices excluded)
UNCERTAIN_RATE = 0.10  # fraction of findings stated with hedging (and drawn mildly)
# Pertinent negatives a report may state, with the chance each is stated when absent.
NEGATABLE: dict[str, float] = {
    "Pleural Effusion": 0.6, "Pneumothorax": 0.6, "Consolidation": 0.4, "Edema": 0.25,
    "Cardiomegaly": 0.25, "Pneumonia": 0.2, "Lung Lesion": 0.1, "Fracture": 0.1,
    "Enlarged Cardiomediastinum": 0.1, "Lung Opacity": 0.1, "Atelectasis": 0.05,
    "Pleural Other": 0.03}


def _sample_finding(rng: np.random.Generator, label: str, certainty: int) -> Finding:
    mild_first = [0.45, 0.35, 0.20]
    severity = "mild" if certainty == UNCERTAIN else str(rng.choice(SEVERITIES, p=mild_first))
    lr = ("left", "right")
    if label in ("Enlarged Cardiomediastinum", "Cardiomegaly", "Edema"):
        return Finding(label, certainty, severity=severity)
    if label in ("Lung Opacity", "Consolidation", "Lung Lesion"):
        side = str(rng.choice(SIDES, p=[0.4, 0.4, 0.2])) if label == "Lung Opacity" else str(
            rng.choice(lr))
        return Finding(label, certainty, side=side, severity=severity,
                       zone=str(rng.choice(ZONES, p=[0.3, 0.3, 0.4])))
    if label in ("Atelectasis", "Pleural Effusion"):
        return Finding(label, certainty, side=str(rng.choice(SIDES, p=[0.35, 0.35, 0.3])),
                       severity=severity)
    if label == "Pneumothorax":
        return Finding(label, certainty, side=str(rng.choice(lr)), severity=severity)
    raise ValueError(f"no sampler for {label!r}")


def sample_findings(rng: np.random.Generator, view: str = "PA") -> StudyFindings:
    """Draw a study's findings with mild clinical co-occurrence, plus its pertinent negatives."""
    findings: list[Finding] = []
    devices_rate = FINDING_RATES["Support Devices"] * (1.8 if view == "AP" else 0.6)
    if rng.random() < devices_rate:
        n = 1 + int(rng.random() < 0.4) + int(rng.random() < 0.15)
        for device in rng.choice(DEVICES, size=n, replace=False):
            findings.append(Finding("Support Devices", device=str(device)))
    if rng.random() >= NORMAL_RATE:
        rates = dict(FINDING_RATES)
        rates.pop("Support Devices")
        present: set[str] = set()
        for label in rates:  # fixed order keeps the RNG stream deterministic
            p = rates[label]
            if label == "Cardiomegaly" and "Edema" in present:
                p = 0.5
            if label == "Pleural Effusion" and ("Edema" in present or "Cardiomegaly" in present):
                p = 0.45
            if rng.random() < p:
                present.add(label)
        if not present:  # an abnormal study has at least one finding
            present.add(str(rng.choice(list(rates))))
        for label in rates:
            if label in present:
                certainty = UNCERTAIN if rng.random() < UNCERTAIN_RATE else 1
                findings.append(_sample_finding(rng, label, certainty))
        consolidation = [f for f in findings if f.label == "Consolidation"]
        if consolidation and rng.random() < 0.5:
            findings.append(Finding("Pneumonia", UNCERTAIN if rng.random() < 0.5 else 1))
    stated = {f.label for f in findings}
    negated = tuple(label for label, p in NEGATABLE.items()
                    if label not in stated and rng.random() < p)
    if "Pneumonia" in negated and "Consolidation" not in stated and "Consolidation" not in negated:
        negated = negated + ("Consolidation",)  # "no consolidation to suggest pneumonia"
    return StudyFindings(tuple(findings), negated)


# --------------------------------------------------------------------------------------------------
# Shape helpers (all vectorised over the pixel grid)
# --------------------------------------------------------------------------------------------------


def _soft(signed: np.ndarray, width: float) -> np.ndarray:
    """Soft step: 1 where `signed` > 0, 0 where < 0, a linear ramp about `width` wide."""
    return np.clip(0.5 + signed * (0.5 / max(width, 1e-6)), 0.0, 1.0)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float,
             px: float, power: float = 2.0, thick: bool = False) -> np.ndarray:
    """Soft mask of a (super)ellipse, edge width about one pixel `px`.

    With `thick`, the mask is weighted by the chord length through an ellipsoid (thicker in the
    middle), which is how a radiograph sees a rounded body.
    """
    if power == 2.0:  # the common case without fractional powers
        r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    else:
        r = (np.abs((x - cx) / rx) ** power + np.abs((y - cy) / ry) ** power) ** (1.0 / power)
    mask = _soft((1.0 - r) * min(rx, ry), px)
    if thick:
        mask = mask * np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0) + 0.02)
    return mask


def _segments(x: np.ndarray, y: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance from every pixel to each segment p0[i] -> p1[i]: shape (n, H, W)."""
    p0 = np.asarray(p0, np.float32).reshape(-1, 2)[:, :, None, None]
    p1 = np.asarray(p1, np.float32).reshape(-1, 2)[:, :, None, None]
    d = p1 - p0
    length2 = np.maximum((d ** 2).sum(1), 1e-9)
    t = np.clip(((x - p0[:, 0]) * d[:, 0] + (y - p0[:, 1]) * d[:, 1]) / length2, 0.0, 1.0)
    return np.hypot(x - (p0[:, 0] + t * d[:, 0]), y - (p0[:, 1] + t * d[:, 1]))


def _polyline(x: np.ndarray, y: np.ndarray, points: np.ndarray, width: float,
              px: float) -> np.ndarray:
    """Soft mask of a polyline of half-width `width` (at least one pixel)."""
    points = np.asarray(points, np.float32)
    dist = _segments(x, y, points[:-1], points[1:]).min(0)
    return _soft(max(width, 0.7 * px) - dist, 0.6 * px)


def _tube(x: np.ndarray, y: np.ndarray, points: np.ndarray, width: float, px: float) -> np.ndarray:
    """A radiopaque tube: two bright walls with a fainter lumen."""
    points = np.asarray(points, np.float32)
    dist = _segments(x, y, points[:-1], points[1:]).min(0)
    body = _soft(width - dist, 0.6 * px)
    walls = np.exp(-((dist - width * 0.8) / max(0.6 * px, width * 0.25)) ** 2)
    return np.maximum(0.55 * body, walls * body + 0.55 * body)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled uniform noise in [0, 1] with `cells` x `cells` control points."""
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    t = np.linspace(0.0, cells, size, dtype=np.float32)
    i = np.minimum(t.astype(np.int32), cells - 1)
    f = t - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]  # (size, cells+1)
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _rotate(x: np.ndarray, y: np.ndarray, angle: float, cx: float, cy: float):
    c, s = np.cos(angle), np.sin(angle)
    return c * (x - cx) - s * (y - cy) + cx, s * (x - cx) + c * (y - cy) + cy


SEVERITY_INDEX = {s: i for i, s in enumerate(SEVERITIES)}


def _sev(f: Finding, values: tuple[float, float, float]) -> float:
    return values[SEVERITY_INDEX[f.severity or "mild"]]


def _side_signs(side: Optional[str]) -> tuple[int, ...]:
    """Image-x sign of the lung(s) on `side` in a frontal view (patient's right = image left)."""
    return {"right": (-1,), "left": (1,), "bilateral": (-1, 1)}[side or "bilateral"]


# --------------------------------------------------------------------------------------------------
# Frontal view
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Frontal:
    """Geometry of one frontal image (anatomy + jitter + finding-driven changes)."""

    x: np.ndarray
    y: np.ndarray
    px: float
    thorax_w: float
    lung_top: float
    dia: dict[int, float]  # sign -> dome y
    heart_hw: float
    heart_cx: float
    heart_cy: float
    mediastinum_w: float
    lung_cx: dict[int, float]
    lung_rx: dict[int, float]
    _cache: dict = dataclasses.field(default_factory=dict)

    def lung(self, sign: int, scale: float = 1.0, anchor: Optional[tuple[float, float]] = None,
             thick: bool = False):
        """Soft mask of one lung; `scale` < 1 shrinks it toward `anchor` (collapsed lung)."""
        key = (sign, thick)
        if scale == 1.0 and key in self._cache:
            return self._cache[key]
        out = self._lung(sign, scale, anchor, thick)
        if scale == 1.0:
            self._cache[key] = out
        return out

    def _lung(self, sign: int, scale: float, anchor: Optional[tuple[float, float]], thick: bool):
        x, y = self.x, self.y
        if anchor is not None:
            x = anchor[0] + (x - anchor[0]) / scale
            y = anchor[1] + (y - anchor[1]) / scale
        cx, rx = self.lung_cx[sign], self.lung_rx[sign]
        top, dia = self.lung_top, self.dia[sign]
        height = dia - top + 0.12
        # Lateral wall widens toward the base; apex is rounded.
        t = np.clip((y - top) / height, 0.0, 1.0)
        rx_y = rx * (0.72 + 0.34 * np.sqrt(t))
        cx_y = cx + sign * (rx_y - rx) * 0.55
        r = (np.abs((x - cx_y) / rx_y) ** 2.6 + np.abs((y - (top + height * 0.62)) /
                                                        (height * 0.62)) ** 2.6) ** (1 / 2.6)
        shape = _soft((1.0 - r) * rx, self.px)
        if thick:
            shape = shape * (0.35 + 0.65 * np.sqrt(np.clip(1.0 - r ** 3, 0.0, 1.0)))
        return shape * self.below_dome(sign, x, y, invert=True)

    def dome_y(self, sign: int, x: np.ndarray) -> np.ndarray:
        cx, rx = self.lung_cx[sign], self.lung_rx[sign]
        u = (x - (cx - sign * 0.1 * rx)) / (rx * 1.05)
        return self.dia[sign] + 0.13 * np.clip(u, -1.3, 1.3) ** 2

    def below_dome(self, sign: int, x=None, y=None, invert: bool = False) -> np.ndarray:
        x = self.x if x is None else x
        y = self.y if y is None else y
        s = y - self.dome_y(sign, x)
        return _soft(-s if invert else s, self.px)


def _frontal_geometry(rng: np.random.Generator, anatomy: Anatomy, sf: StudyFindings, view: str,
                      size: int) -> _Frontal:
    px = 2.0 / size
    lin = np.linspace(-1 + px / 2, 1 - px / 2, size, dtype=np.float32)
    x, y = np.meshgrid(lin, lin)
    scale = rng.uniform(0.95, 1.04)
    x, y = _rotate(x, y, np.deg2rad(rng.uniform(-2.5, 2.5)), 0.0, 0.0)
    x = (x - rng.uniform(-0.04, 0.04)) / scale
    y = (y - rng.uniform(-0.04, 0.04)) / scale
    px = px / scale
    ctr = anatomy.ctr * (1.04 if view == "AP" else 1.0)
    for f in sf.of("Cardiomegaly"):
        ctr = _sev(f, (0.57, 0.63, 0.70)) if f.certainty != UNCERTAIN else 0.54
    med = anatomy.mediastinum_w
    for f in sf.of("Enlarged Cardiomediastinum"):
        med = _sev(f, (0.165, 0.195, 0.23)) if f.certainty != UNCERTAIN else 0.15
    dia = {-1: anatomy.dia_right, 1: anatomy.dia_left}
    if view == "AP":  # supine / poor inspiration
        dia = {k: v - 0.04 for k, v in dia.items()}
    for f in sf.of("Atelectasis"):
        if f.severity == "severe":  # volume loss lifts the hemidiaphragm
            for s in _side_signs(f.side):
                dia[s] -= 0.06
    heart_hw = ctr * anatomy.thorax_w
    lung_rx = {s: anatomy.thorax_w * 0.47 for s in (-1, 1)}
    lung_cx = {s: s * anatomy.thorax_w * 0.52 for s in (-1, 1)}
    return _Frontal(x=x, y=y, px=px, thorax_w=anatomy.thorax_w, lung_top=anatomy.lung_top, dia=dia,
                    heart_hw=heart_hw, heart_cx=anatomy.heart_shift * 2 * heart_hw,
                    heart_cy=anatomy.dia_left - 0.12, mediastinum_w=med, lung_cx=lung_cx,
                    lung_rx=lung_rx)


def _sample_grid(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear lookup of `grid` at fractional (row u, column v) positions, wrapping around."""
    n0, n1 = grid.shape
    i0, j0 = np.floor(u).astype(np.int32), np.floor(v).astype(np.int32)
    fu, fv = u - i0, v - j0
    i0, j0 = i0 % n0, j0 % n1
    i1, j1 = (i0 + 1) % n0, (j0 + 1) % n1
    return ((grid[i0, j0] * (1 - fv) + grid[i0, j1] * fv) * (1 - fu)
            + (grid[i1, j0] * (1 - fv) + grid[i1, j1] * fv) * fu)


def _markings(rng: np.random.Generator, g: _Frontal, hila: dict[int, tuple[float, float]]):
    """Vessel shadows: wavy radial streaks fanning out from each hilum, fading to the periphery.

    Built in polar coordinates around the hilum (two layers of streaks with different counts give
    the look of branching), so the cost is a few elementwise operations per pixel.
    """
    out = np.zeros_like(g.x)
    for s, (hx, hy) in hila.items():
        dx, dy = g.x - hx, g.y - hy
        r = np.hypot(dx, dy) + 1e-3
        theta = np.arctan2(dy, s * dx)  # mirrored so both lungs fan laterally
        total = np.zeros_like(r)
        for count, width, amp in ((11, 0.010, 1.0), (23, 0.006, 0.6)):
            warp = _sample_grid(rng.standard_normal((8, 12)).astype(np.float32),
                                r * 7.0, (theta / np.pi + 1.0) * 6.0)
            phase = theta * count / np.pi + 0.35 * warp + rng.uniform(0, 1)
            offset = np.abs(phase - np.round(phase)) * np.pi / count * r  # arc distance
            w = np.maximum(width * np.clip(1.3 - r, 0.3, 1.0), 0.5 * g.px)
            total += amp * np.exp(-(offset / w) ** 2)
        out += total * np.clip(1.15 - r / 0.7, 0.0, 1.0)
    return out


def _draw_frontal(rng: np.random.Generator, finding_rng: np.random.Generator, anatomy: Anatomy,
                  sf: StudyFindings, view: str, size: int) -> np.ndarray:
    g = _frontal_geometry(rng, anatomy, sf, view, size)
    x, y, px = g.x, g.y, g.px
    noise_lo = _smooth_noise(rng, size, 6)
    noise_mid = _smooth_noise(rng, size, 18)

    # Soft tissue: torso with shoulders and neck, abdomen below the diaphragm.
    torso = _ellipse(x, y, 0.0, 0.25, anatomy.body_w, 1.25, px, power=3.0, thick=True)
    shoulders = _ellipse(x, y, 0.0, -0.62, anatomy.body_w * 1.12, 0.32, px, power=2.2, thick=True)
    neck = _ellipse(x, y, 0.0, -1.0, 0.22, 0.45, px, thick=True)
    tissue = np.maximum(np.maximum(torso, 0.9 * shoulders), 0.8 * neck)
    att = 0.62 * tissue * (0.92 + 0.16 * noise_lo)
    thorax = _ellipse(x, y, 0.0, 0.0, g.thorax_w * 1.02, 0.8, px, power=2.6)
    att += 0.06 * thorax  # chest-wall muscle

    # Heart and mediastinum.
    heart = _ellipse(x, y, g.heart_cx, g.heart_cy, g.heart_hw, 0.27, px, power=2.2, thick=True)
    heart = heart * _soft(y - (g.lung_top + 0.45), 3 * px)
    neck_y = g.lung_top - 0.3
    mediastinum = _soft(g.mediastinum_w - np.abs(x - 0.015), px) * _soft(y - neck_y, px) * _soft(
        g.heart_cy - y, px)
    aortic_knob = _ellipse(x, y, 0.06 + g.mediastinum_w * 0.7, g.lung_top + 0.33, 0.075, 0.06, px)
    central = np.clip(heart + mediastinum + aortic_knob, 0.0, 1.0)

    # Lungs (air) with vessel markings.
    hila = {s: (s * (g.mediastinum_w + 0.09), (g.lung_top + g.dia[s]) * 0.5 + 0.02) for s in (-1, 1)}
    lungs = {}
    lung_air = np.zeros_like(x)
    marks = np.zeros_like(x)
    ptx_air = np.zeros_like(x)
    ptx_line = np.zeros_like(x)
    ptx_by_side = {s: f for f in sf.of("Pneumothorax") for s in _side_signs(f.side)}
    marks_all = _markings(rng, g, hila)
    for s in (-1, 1):
        lung = g.lung(s, thick=True) * (1.0 - 0.85 * central)
        lungs[s] = lung
        vessels = marks_all
        if s in ptx_by_side:
            f = ptx_by_side[s]
            shrink = _sev(f, (0.82, 0.70, 0.56)) if f.certainty != UNCERTAIN else 0.88
            anchor = (hila[s][0], g.dia[s] - 0.05)
            collapsed = g.lung(s, shrink, anchor)
            rim = np.clip(lung - collapsed, 0.0, 1.0)
            vessels = vessels * collapsed
            ptx_air += rim
            edge = collapsed * (1.0 - collapsed) * 4.0  # ridge at the visceral pleura
            ptx_line += np.clip(edge * 1.5, 0, 1) * g.lung(s)
        lung_air += lung
        marks += vessels * lung
    hilar = sum(np.exp(-((x - h[0]) ** 2 / 0.006 + (y - h[1]) ** 2 / 0.02)) for h in hila.values())
    att += 0.17 * central + 0.05 * hilar * (1 - central)
    lung_tex = 0.85 + 0.3 * noise_mid
    att -= anatomy.lung_air * lung_air * lung_tex
    att += 0.07 * marks
    att -= 0.08 * ptx_air
    att += 0.10 * ptx_line

    # Bones: spine, ribs, clavicles.
    spine = _soft(0.055 - np.abs(x - 0.01), px)
    vert = 0.5 + 0.5 * np.cos((y - anatomy.rib_phase) * 2 * np.pi / anatomy.rib_spacing * 0.9)
    att += spine * (0.05 + 0.03 * vert) * (0.4 + 0.6 * _soft(g.lung_top + 0.1 - y, 0.1))
    ribs = np.zeros_like(x)
    ys = g.lung_top - 0.02 + anatomy.rib_spacing * (np.arange(10) + anatomy.rib_phase * 0.3)
    t = np.abs(x) / g.thorax_w
    for y0 in ys:
        centre = y0 - 0.10 * t + 0.42 * t ** 2
        d = np.abs(y - centre)
        band = _soft(0.028 - d, px)
        cortex = np.exp(-((d - 0.026) / max(0.008, 0.7 * px)) ** 2)
        ribs += band * 0.6 + cortex * 0.5
    ribs *= _soft(1.0 - np.abs(x) / (g.thorax_w * 1.04), px) * _soft(np.abs(x) - 0.04, px)
    ribs *= _soft(g.dia[1] + 0.28 - y, 4 * px)
    att += 0.05 * np.clip(ribs, 0, 1.2)
    for s in (-1, 1):
        clav = _polyline(x, y, [(s * 0.07, g.lung_top + 0.12), (s * 0.35, g.lung_top + 0.02),
                                (s * 0.62, g.lung_top - 0.06)], 0.028, px)
        att += 0.11 * clav
    # Hemidiaphragms are implicit (lung base); gastric bubble under the left one.
    bubble = _ellipse(x, y, 0.35, g.dia[1] + 0.18, 0.09, 0.055, px)
    att -= 0.18 * bubble * tissue

    att += _draw_frontal_findings(finding_rng, g, sf, lungs, hila, noise_mid)
    att += _draw_devices(finding_rng, g, sf, frontal=True)
    return att


def _zone_y(g: _Frontal, sign: int, zone: str) -> float:
    top, dia = g.lung_top, g.dia[sign]
    return top + (dia - top) * {"upper": 0.22, "middle": 0.5, "lower": 0.8}[zone]


def _draw_frontal_findings(rng: np.random.Generator, g: _Frontal, sf: StudyFindings,
                           lungs: dict[int, np.ndarray], hila, noise: np.ndarray) -> np.ndarray:
    x, y, px = g.x, g.y, g.px
    out = np.zeros_like(x)
    full_lung = {s: g.lung(s) for s in (-1, 1)}
    for f in sf.findings:
        faint = 0.6 if f.certainty == UNCERTAIN else 1.0
        if f.label == "Pleural Effusion":
            for s in _side_signs(f.side):
                height = _sev(f, (0.12, 0.26, 0.45)) * (0.8 if faint < 1 else 1.0)
                lateral = g.lung_cx[s] + s * g.lung_rx[s] * 1.1
                u = np.clip(np.abs(x - lateral) / (2.0 * g.lung_rx[s]), 0, 1)  # 0 at the wall
                level = g.dia[s] + 0.13 - height + 0.10 * np.sqrt(u)  # meniscus
                fluid = _soft(y - level, 2 * px) * full_lung[s]
                # Fluid also fills the costophrenic recess below the dome line.
                recess = _soft(y - level, 2 * px) * _soft(0.16 - (y - g.dome_y(s, x)), 2 * px) * \
                    _soft(g.lung_rx[s] * 1.1 - np.abs(x - g.lung_cx[s]), px)
                out += 0.30 * faint * np.clip(fluid + recess, 0, 1)
        elif f.label == "Consolidation":
            for s in _side_signs(f.side):
                cy = _zone_y(g, s, f.zone)
                r = _sev(f, (0.16, 0.22, 0.30))
                blob = _ellipse(x, y, g.lung_cx[s] + s * 0.04, cy, r * 1.1, r * 0.85, 3 * px)
                blob = blob * _soft(noise - 0.25, 0.08)
                bronchi = _smooth_noise(rng, x.shape[0], 24)
                out += faint * 0.36 * blob * lungs[s] * (0.85 + 0.15 * bronchi)
        elif f.label == "Lung Opacity":
            for s in _side_signs(f.side):
                cy = _zone_y(g, s, f.zone)
                r = _sev(f, (0.20, 0.26, 0.33))
                blob = _ellipse(x, y, g.lung_cx[s], cy, r * 1.2, r, 0.1)
                patchy = _smooth_noise(rng, x.shape[0], 14)
                out += faint * 0.26 * blob * lungs[s] * (0.35 + 0.65 * patchy)
        elif f.label == "Lung Lesion":
            s = _side_signs(f.side)[0]
            r = _sev(f, (0.045, 0.065, 0.10))
            cx = g.lung_cx[s] + s * rng.uniform(-0.08, 0.08)
            cy = _zone_y(g, s, f.zone) + rng.uniform(-0.04, 0.04)
            out += faint * 0.34 * _ellipse(x, y, cx, cy, r, r * rng.uniform(0.85, 1.0), px)
        elif f.label == "Edema":
            amp = _sev(f, (0.18, 0.25, 0.32)) * faint
            haze = sum(np.exp(-((x - h[0]) ** 2 / 0.07 + (y - h[1]) ** 2 / 0.12))
                       for h in hila.values())
            kerley = np.zeros_like(x)
            for s in (-1, 1):
                lateral = g.lung_cx[s] + s * g.lung_rx[s] * 0.95
                ys = g.dia[s] - np.linspace(0.05, 0.32, 6)
                p0 = np.stack([np.full(6, lateral), ys], 1)
                p1 = p0 - np.array([s * 0.09, 0.0], np.float32)
                d = _segments(x, y, p0, p1).min(0)
                kerley += np.exp(-(d / max(0.007, 0.6 * px)) ** 2)
            lung_all = lungs[-1] + lungs[1]
            out += amp * lung_all * (np.clip(haze, 0, 1) * (0.7 + 0.3 * noise) + 0.25)
            out += 0.5 * amp * kerley * lung_all
        elif f.label == "Atelectasis":
            for s in _side_signs(f.side):
                cy = g.dia[s] - _sev(f, (0.12, 0.14, 0.10))
                cx = g.lung_cx[s] - s * 0.02
                half = _sev(f, (0.16, 0.20, 0.24))
                tilt = rng.uniform(-0.12, 0.12)
                band = _polyline(x, y, [(cx - half, cy + tilt * half * s),
                                        (cx + half, cy - tilt * half * s)],
                                 _sev(f, (0.018, 0.026, 0.034)), px)
                out += faint * 0.32 * band * lungs[s]
                if f.severity == "severe":
                    wedge = _ellipse(x, y, cx, g.dia[s] - 0.02, half, 0.08, 2 * px)
                    out += faint * 0.22 * wedge * lungs[s]
    return out


def _draw_devices(rng: np.random.Generator, g, sf: StudyFindings, frontal: bool) -> np.ndarray:
    x, y, px = g.x, g.y, g.px
    out = np.zeros_like(x)
    metal = 0.75
    for f in sf.of("Support Devices"):
        if f.device == "et_tube":
            xs = 0.015 + rng.uniform(-0.02, 0.02)
            tip = g.lung_top + rng.uniform(0.30, 0.40)
            pts = [(xs, -1.05), (xs + 0.01, -0.5), (xs, tip)] if frontal else \
                [(-0.30, -1.05), (-0.22, -0.6), (-0.16, tip)]
            out += metal * 0.7 * _tube(x, y, np.array(pts), 0.018, px)
        elif f.device == "ng_tube":
            if frontal:
                pts = [(0.03, -1.05), (0.02, -0.3), (0.05, g.dia[1] + 0.05), (0.30, g.dia[1] + 0.2),
                       (0.40, g.dia[1] + 0.14)]
            else:
                pts = [(-0.1, -1.05), (0.05, -0.3), (0.1, 0.4), (-0.05, 0.62)]
            out += metal * 0.6 * _tube(x, y, np.array(pts), 0.011, px)
        elif f.device == "central_line":
            if frontal:
                pts = [(-0.55, g.lung_top - 0.05), (-0.25, g.lung_top + 0.08),
                       (-0.07, g.lung_top + 0.22), (-0.05, g.lung_top + 0.48)]
            else:
                pts = [(0.05, -0.9), (-0.02, -0.5), (-0.05, -0.15)]
            out += metal * 0.55 * _polyline(x, y, np.array(pts), 0.009, px)
        elif f.device == "pacemaker":
            if frontal:
                bx, by = 0.52, g.lung_top + 0.12
                box = _ellipse(x, y, bx, by, 0.10, 0.065, px, power=4.0)
                lead = [(bx - 0.05, by), (0.2, g.lung_top + 0.15), (0.0, g.heart_cy - 0.15),
                        (g.heart_cx + 0.05, g.heart_cy + 0.05)]
            else:
                bx, by = -0.55, -0.45
                box = _ellipse(x, y, bx, by, 0.05, 0.07, px, power=4.0)
                lead = [(bx, by), (-0.25, -0.3), (-0.15, 0.15), (-0.3, 0.3)]
            out += metal * 1.2 * box + metal * 0.8 * _polyline(x, y, np.array(lead), 0.01, px)
    return out


# --------------------------------------------------------------------------------------------------
# Lateral view
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Lateral:
    x: np.ndarray
    y: np.ndarray
    px: float
    lung_top: float
    dia: dict[int, float]
    heart_cx: float
    heart_cy: float
    heart_hw: float


def _draw_lateral(rng: np.random.Generator, finding_rng: np.random.Generator, anatomy: Anatomy,
                  sf: StudyFindings, size: int) -> np.ndarray:
    px = 2.0 / size
    lin = np.linspace(-1 + px / 2, 1 - px / 2, size, dtype=np.float32)
    x, y = np.meshgrid(lin, lin)
    scale = rng.uniform(0.95, 1.04)
    x, y = _rotate(x, y, np.deg2rad(rng.uniform(-3, 3)), 0.0, 0.0)
    x, y, px = (x - rng.uniform(-0.04, 0.04)) / scale, (y - rng.uniform(-0.04, 0.04)) / scale, \
        px / scale
    noise_lo = _smooth_noise(rng, size, 6)
    noise_mid = _smooth_noise(rng, size, 18)
    ctr = anatomy.ctr
    for f in sf.of("Cardiomegaly"):
        ctr = _sev(f, (0.57, 0.63, 0.70)) if f.certainty != UNCERTAIN else 0.54
    g = _Lateral(x=x, y=y, px=px, lung_top=anatomy.lung_top - 0.05,
                 dia={-1: anatomy.dia_right, 1: anatomy.dia_left}, heart_cx=-0.2,
                 heart_cy=anatomy.dia_left - 0.12, heart_hw=ctr * 0.75)

    body = _ellipse(x, y, 0.0, 0.2, 0.82, 1.3, px, power=2.4, thick=True)
    arms = _ellipse(x, y, -0.15, -0.75, 0.45, 0.35, px)
    att = 0.7 * np.maximum(body, 0.6 * arms) * (0.9 + 0.2 * noise_lo)
    lung = _ellipse(x, y, 0.0, 0.0, 0.62, 0.72, px, power=2.5)
    dome = np.maximum(g.dia[-1], g.dia[1]) - 0.15 * (1 - np.clip((x / 0.6) ** 2, 0, 1))
    lung = lung * _soft(dome - y, px) * _soft(y - g.lung_top, px)
    heart = _ellipse(x, y, g.heart_cx + (g.heart_hw - 0.32) * 0.5, g.heart_cy, g.heart_hw, 0.3, px)
    med = anatomy.mediastinum_w
    for f in sf.of("Enlarged Cardiomediastinum"):
        med = _sev(f, (0.165, 0.195, 0.23))
    trachea = _soft(0.04 - np.abs(x - 0.05 + 0.15 * (y + 0.5)), px) * _soft(0.0 - y, px)
    vessels_hilum = _ellipse(x, y, 0.08, -0.05, 0.10 + med * 0.6, 0.14, 3 * px)
    att -= anatomy.lung_air * 1.1 * lung * (1 - 0.8 * heart) * (0.85 + 0.3 * noise_mid)
    att += 0.15 * heart + 0.12 * vessels_hilum * lung
    att -= 0.08 * trachea
    # Spine (posterior) with vertebral bodies, sternum (anterior).
    spine_x = 0.62
    vert_phase = np.cos((y - anatomy.rib_phase) * 2 * np.pi / anatomy.rib_spacing)
    spine = _soft(0.09 - np.abs(x - spine_x - 0.05 * y), px) * (0.7 + 0.3 * _soft(vert_phase, 0.3))
    att += 0.22 * spine
    sternum = _soft(0.025 - np.abs(x + 0.6 - 0.06 * (y + 0.3)), px) * _soft(0.2 - y, px) * \
        _soft(y + 0.75, px)
    att += 0.18 * sternum
    # Posterior ribs as faint oblique bands.
    ribs = np.zeros_like(x)
    for k in range(9):
        y0 = g.lung_top + anatomy.rib_spacing * (k + 0.5)
        d = np.abs(y - (y0 + 0.25 * (x - 0.6)))
        ribs += _soft(0.02 - d, px)
    att += 0.05 * ribs * _soft(x - 0.1, 4 * px) * body

    for f in sf.findings:
        faint = 0.6 if f.certainty == UNCERTAIN else 1.0
        if f.label == "Pleural Effusion":
            height = _sev(f, (0.12, 0.24, 0.42)) * (0.8 if faint < 1 else 1.0)
            level = np.maximum(g.dia[-1], g.dia[1]) - height - 0.12 * (x - 0.1)
            att += 0.32 * faint * _soft(y - level, 2 * px) * lung
        elif f.label in ("Consolidation", "Lung Opacity", "Lung Lesion"):
            cy = g.lung_top + (np.mean(list(g.dia.values())) - g.lung_top) * {
                "upper": 0.22, "middle": 0.5, "lower": 0.8}[f.zone]
            cx = {"upper": 0.1, "middle": 0.05, "lower": 0.25}[f.zone]
            if f.label == "Lung Lesion":
                r = _sev(f, (0.045, 0.065, 0.10))
                att += faint * 0.3 * _ellipse(x, y, cx, cy, r, r, px)
            else:
                r = _sev(f, (0.16, 0.22, 0.30))
                amp = 0.3 if f.label == "Consolidation" else 0.2
                att += faint * amp * _ellipse(x, y, cx, cy, r, r * 0.8, 0.08) * lung * \
                    (0.5 + 0.5 * noise_mid)
        elif f.label == "Edema":
            amp = _sev(f, (0.13, 0.19, 0.26)) * faint
            att += amp * lung * (0.4 + np.exp(-((x - 0.05) ** 2 + (y + 0.05) ** 2) / 0.12))
        elif f.label == "Atelectasis":
            cy = np.mean(list(g.dia.values())) - 0.15
            band = _polyline(x, y, np.array([(-0.3, cy + 0.05), (0.35, cy - 0.05)]),
                             _sev(f, (0.018, 0.026, 0.034)), px)
            att += faint * 0.3 * band * lung
        elif f.label == "Pneumothorax":
            apex = _ellipse(x, y, 0.05, g.lung_top + 0.08, 0.35, 0.12, 3 * px)
            att -= 0.06 * faint * apex * lung
    att += _draw_devices(finding_rng, g, sf, frontal=False)
    return att


# --------------------------------------------------------------------------------------------------
# Film response
# --------------------------------------------------------------------------------------------------


def _expose(rng: np.random.Generator, att: np.ndarray) -> np.ndarray:
    """Attenuation -> uint8 film: exposure, contrast curve, noise."""
    size = att.shape[0]
    gain = rng.uniform(1.6, 2.1)
    film = 1.0 - np.exp(-gain * np.clip(att, 0.0, None))
    film = film / (1.0 - np.exp(-gain * 1.0))
    film = np.clip(film, 0.0, 1.0) ** rng.uniform(0.85, 1.2)
    lo, hi = rng.uniform(-0.04, 0.06), rng.uniform(0.92, 1.08)
    film = (film - lo) / (hi - lo)
    grain = rng.standard_normal(att.shape, dtype=np.float32)
    film = film + rng.uniform(0.008, 0.025) * grain + 0.02 * (_smooth_noise(rng, size, 40) - 0.5)
    return np.clip(film * 255.0 + 0.5, 0, 255).astype(np.uint8)


def render(findings: StudyFindings, anatomy: Anatomy, view: str, size: int = 256,
           seed: int | np.random.SeedSequence = 0) -> np.ndarray:
    """Draw one radiograph: a (size, size) uint8 array. Same arguments -> same pixels."""
    if view not in VIEWS:
        raise ValueError(f"view {view!r} not in {VIEWS}")
    if size < 32:
        raise ValueError(f"size {size} is too small; use at least 32 pixels")
    # Two streams: the background (positioning, texture, exposure, noise) does not depend on the
    # findings, so the same seed with and without a finding differs only where it is drawn.
    if isinstance(seed, np.random.SeedSequence):  # copy: spawning mutates a SeedSequence
        seed = np.random.SeedSequence(seed.entropy, spawn_key=seed.spawn_key)
    else:
        seed = np.random.SeedSequence(int(seed))
    rng, finding_rng = (np.random.default_rng(s) for s in seed.spawn(2))
    if view in FRONTAL_VIEWS:
        att = _draw_frontal(rng, finding_rng, anatomy, findings, view, size)
    else:
        att = _draw_lateral(rng, finding_rng, anatomy, findings, size)
    return _expose(rng, att.astype(np.float32))
