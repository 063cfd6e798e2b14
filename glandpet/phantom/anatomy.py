"""Parametric head-and-neck anatomy of one individual, on a regular grid in the anatomy frame.

The anatomy frame is LPS millimetres (+x patient left, +y posterior, +z superior) with the origin
between the external ear canals (roughly the centre of the head): the vertex is near z = +125,
the nose tip near y = -115, the chin near z = -95, the hyoid near z = -100, the thyroid near
z = -140 and the grid stops below the lung apices.

Every structure is an implicit shape (level > 0 inside) evaluated only inside its bounding box:
ellipsoids (optionally rotated and warped by a low-frequency random displacement), tubes along
polylines, swept plates (mandible) and z-profiled elliptic cylinders (skin, airway). The
individual varies by head size (anisotropic scale), neck length and flexion (the neck
structures rotate about the cranio-vertebral junction relative to the skull), fat thickness,
and gland sizes and positions. Glands are placed after the tissues, only where the tissue is
soft (fat, muscle, soft tissue, mucosa), and each gland's iso-level is chosen so that its voxel
volume hits the size drawn for it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from glandpet.glands import label_value
from glandpet.phantom.model import Anatomy, Tissue

#: Grid of the anatomy frame: voxel size (mm) and the world box covered (LPS mm, [lo, hi)).
VOXEL_MM = 1.0
BOX_LO = np.array([-98.0, -134.0, -182.0])
BOX_HI = np.array([98.0, 114.0, 138.0])

#: Sizes drawn for the glands (mL): (low, high) of a uniform draw per individual and side.
GLAND_VOLUME_ML = {
    "parotid": (15.0, 35.0),
    "submandibular": (5.0, 12.0),
    "sublingual": (2.0, 4.0),
    "lacrimal": (0.5, 0.9),
    "tubarial": (0.5, 1.5),
}

_SOFT_OK = np.zeros(256, bool)
for _t in (Tissue.FAT, Tissue.SOFT, Tissue.MUSCLE, Tissue.MUCOSA, Tissue.TONGUE, Tissue.LYMPH_NODE):
    _SOFT_OK[int(_t)] = True


# ----------------------------------------------------------------------------------------------
# geometry helpers


def _rot(axis: str, deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


class _Part:
    """A rigid-ish part of the body: template coordinates q = A^-1 p (p: anatomy frame)."""

    def __init__(self, grid: "_Grid", A: np.ndarray):
        self.grid = grid
        self.A = A
        self.Ainv = np.linalg.inv(A)
        self.diagonal = np.allclose(A[:3, :3], np.diag(np.diag(A[:3, :3])))
        self.x_separable = abs(A[0, 1]) + abs(A[0, 2]) + abs(A[1, 0]) + abs(A[2, 0]) < 1e-12

    def box(self, lo, hi):
        """Index slices of the grid covering the template box [lo, hi] (mapped to the anatomy frame)."""
        lo = np.asarray(lo, float)
        hi = np.asarray(hi, float)
        corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        w = corners @ self.A.T
        return self.grid.slices(w[:, :3].min(0), w[:, :3].max(0))

    def coords(self, sl):
        """Template coordinates (X, Y, Z) of the voxels in slices `sl` (broadcastable arrays)."""
        g = self.grid
        axes = [
            (g.origin[d] + g.h * np.arange(sl[d].start, sl[d].stop, dtype=np.float32)).astype(np.float32)
            for d in range(3)
        ]
        if self.diagonal:
            out = []
            for d in range(3):
                v = (axes[d] - self.A[d, 3]) / self.A[d, d]
                shp = [1, 1, 1]
                shp[d] = -1
                out.append(v.reshape(shp).astype(np.float32))
            return tuple(out)
        M = self.Ainv.astype(np.float32)
        if self.x_separable:
            X = (M[0, 0] * axes[0] + M[0, 3]).reshape(-1, 1, 1)
            Yw = axes[1].reshape(1, -1, 1)
            Zw = axes[2].reshape(1, 1, -1)
            Y = M[1, 1] * Yw + M[1, 2] * Zw + M[1, 3]
            Z = M[2, 1] * Yw + M[2, 2] * Zw + M[2, 3]
            return X.astype(np.float32), Y.astype(np.float32), Z.astype(np.float32)
        P = np.meshgrid(*axes, indexing="ij")
        return tuple(M[d, 0] * P[0] + M[d, 1] * P[1] + M[d, 2] * P[2] + M[d, 3] for d in range(3))


class _Grid:
    def __init__(self, lo, hi, h):
        self.h = float(h)
        self.origin = np.asarray(lo, float) + 0.5 * h
        self.shape = tuple(int(round((b - a) / h)) for a, b in zip(lo, hi))

    def slices(self, wlo, whi):
        out = []
        for d in range(3):
            a = int(math.floor((wlo[d] - self.origin[d]) / self.h)) - 1
            b = int(math.ceil((whi[d] - self.origin[d]) / self.h)) + 2
            out.append(slice(max(a, 0), min(max(b, 0), self.shape[d])))
        return tuple(out)

    @property
    def affine(self):
        A = np.eye(4)
        A[:3, :3] *= self.h
        A[:3, 3] = self.origin
        return A


class _Warp:
    """Low-frequency random displacement: sum of a few sinusoids (mm)."""

    def __init__(self, rng, amp_mm=2.5, wavelength_mm=(25.0, 60.0), n=4):
        self.terms = []
        for _ in range(n):
            k = rng.normal(size=3)
            k /= np.linalg.norm(k)
            lam = rng.uniform(*wavelength_mm)
            amp = rng.normal(size=3) * amp_mm / math.sqrt(n)
            self.terms.append((k * 2 * math.pi / lam, rng.uniform(0, 2 * math.pi), amp))

    def __call__(self, X, Y, Z):
        dx = dy = dz = np.float32(0)
        for k, ph, a in self.terms:
            s = np.sin(np.float32(k[0]) * X + np.float32(k[1]) * Y + np.float32(k[2]) * Z + np.float32(ph))
            dx = dx + np.float32(a[0]) * s
            dy = dy + np.float32(a[1]) * s
            dz = dz + np.float32(a[2]) * s
        return X + dx, Y + dy, Z + dz


def _ell_level(X, Y, Z, c, r, R=None):
    """1 - |(q - c)/r|^2 (positive inside), R rotates the ellipsoid's axes (template frame)."""
    x, y, z = X - np.float32(c[0]), Y - np.float32(c[1]), Z - np.float32(c[2])
    if R is not None:
        R = np.asarray(R, np.float32)
        x, y, z = (R[0, 0] * x + R[1, 0] * y + R[2, 0] * z, R[0, 1] * x + R[1, 1] * y + R[2, 1] * z,
                   R[0, 2] * x + R[1, 2] * y + R[2, 2] * z)
    return 1.0 - (x / np.float32(r[0])) ** 2 - (y / np.float32(r[1])) ** 2 - (z / np.float32(r[2])) ** 2


def _ell_box(c, r, R=None, margin=4.0):
    ext = np.abs(np.asarray(R if R is not None else np.eye(3))) @ np.asarray(r, float) if R is not None else np.asarray(r, float)
    ext = ext + margin
    return np.asarray(c, float) - ext, np.asarray(c, float) + ext


def _polyline_distance(coords, pts):
    """Distance from each grid point to a polyline and the interpolated arc parameter (0..len-1) of
    the closest point. ``coords`` holds one coordinate array per dimension (x, y[, z]) and ``pts``
    the polyline's vertices with as many coordinates."""
    pts = np.asarray(pts, np.float32)
    coords = np.broadcast_arrays(*coords)
    best = None
    tpar = None
    for i in range(len(pts) - 1):
        a, b = pts[i], pts[i + 1]
        ab = b - a
        L2 = float(ab @ ab)
        proj = (coords[0] - a[0]) * ab[0]
        for k in range(1, len(coords)):
            proj = proj + (coords[k] - a[k]) * ab[k]
        t = np.clip(proj / np.float32(L2), 0, 1)
        d2 = (coords[0] - a[0] - t * ab[0]) ** 2
        for k in range(1, len(coords)):
            d2 = d2 + (coords[k] - a[k] - t * ab[k]) ** 2
        if best is None:
            best, tpar = d2, t + np.float32(i)
        else:
            m = d2 < best
            best = np.where(m, d2, best)
            tpar = np.where(m, t + np.float32(i), tpar)
    return np.sqrt(best), tpar


def _interp_profile(z, zs, vals, step=0.25):
    """Piecewise-linear profile (zs increasing), by table look-up (np.interp is slow on big arrays)."""
    zs = np.asarray(zs, float)
    tz = np.arange(zs[0], zs[-1] + step, step)
    table = np.interp(tz, zs, vals).astype(np.float32)
    i = np.clip(((z - np.float32(zs[0])) * np.float32(1.0 / step) + np.float32(0.5)), 0, len(tz) - 1).astype(np.int32)
    return table[i]


# ----------------------------------------------------------------------------------------------
# the builder


class _Builder:
    def __init__(self, rng: np.random.Generator, sex: str | None = None):
        self.rng = rng
        self.sex = sex
        self.grid = _Grid(BOX_LO, BOX_HI, VOXEL_MM)
        self.tissue = np.zeros(self.grid.shape, np.uint8)
        self.glands = np.zeros(self.grid.shape, np.uint8)
        self.extra: dict = {}

    # painting ------------------------------------------------------------------------------
    def paint(self, part, lo, hi, level_fn, tissue, where=None):
        sl = part.box(lo, hi)
        if any(s.stop <= s.start for s in sl):
            return None
        X, Y, Z = part.coords(sl)
        m = level_fn(X, Y, Z) > 0
        m = np.broadcast_to(m, tuple(s.stop - s.start for s in sl))
        sub = self.tissue[sl]
        if where is not None:
            m = m & where(sub)
        sub[m] = int(tissue)
        return sl, m

    def ell(self, part, c, r, tissue, R=None, warp=None, where=None):
        lo, hi = _ell_box(c, r, R, margin=4.0 + (6.0 if warp else 0.0))
        if warp is None:
            fn = lambda X, Y, Z: _ell_level(X, Y, Z, c, r, R)  # noqa: E731
        else:
            fn = lambda X, Y, Z: _ell_level(*warp(X, Y, Z), c, r, R)  # noqa: E731
        return self.paint(part, lo, hi, fn, tissue, where)

    def tube(self, part, pts, radius, tissue, where=None):
        pts = np.asarray(pts, float)
        rad = np.atleast_1d(np.asarray(radius, float))
        rmax = float(rad.max())
        lo, hi = pts.min(0) - rmax - 2, pts.max(0) + rmax + 2

        def fn(X, Y, Z):
            d, t = _polyline_distance((X, Y, Z), pts)
            r = np.interp(t, np.arange(len(rad)), rad).astype(np.float32) if len(rad) > 1 else np.float32(rad[0])
            return r - d

        return self.paint(part, lo, hi, fn, tissue, where)

    def zcyl(self, part, prof, tissue, inset=0.0, where=None):
        """Elliptic cylinder with z-profile rows (z, xc, yc, a, b)."""
        prof = np.asarray(prof, float)
        zs = prof[:, 0]
        lo = np.array([(prof[:, 1] - prof[:, 3]).min(), (prof[:, 2] - prof[:, 4]).min(), zs.min()])
        hi = np.array([(prof[:, 1] + prof[:, 3]).max(), (prof[:, 2] + prof[:, 4]).max(), zs.max()])

        def fn(X, Y, Z):
            xc = _interp_profile(Z, zs, prof[:, 1])
            yc = _interp_profile(Z, zs, prof[:, 2])
            a = _interp_profile(Z, zs, prof[:, 3]) - np.float32(inset)
            b = _interp_profile(Z, zs, prof[:, 4]) - np.float32(inset)
            inside_z = (Z >= zs[0]) & (Z <= zs[-1])
            return np.where(inside_z, 1.0 - ((X - xc) / a) ** 2 - ((Y - yc) / b) ** 2, -1.0)

        return self.paint(part, lo, hi, fn, tissue, where)

    # the individual ------------------------------------------------------------------------
    def build(self) -> Anatomy:
        rng = self.rng
        g = self.grid
        u = rng.random()
        sex_m = (u < 0.5) if self.sex is None else (self.sex == "M")
        base = 1.03 if sex_m else 0.97
        sx = base * rng.normal(1.0, 0.03)
        sy = base * rng.normal(1.0, 0.03)
        sz = base * rng.normal(1.0, 0.03)
        sx, sy, sz = (float(np.clip(v, 0.9, 1.1)) for v in (sx, sy, sz))
        H = np.diag([sx, sy, sz, 1.0])
        head = _Part(g, H)
        flex = float(np.clip(rng.normal(0.0, 5.0), -10, 10))  # degrees, + = chin down
        neck_len = float(np.clip(rng.normal(1.0, 0.04), 0.92, 1.08))
        pivot = np.array([0.0, 8.0, -28.0])
        # neck: scale (head) then, about the pivot, stretch z and rotate about x
        ps = pivot * np.array([sx, sy, sz])
        T1 = np.eye(4)
        T1[:3, 3] = -ps
        S = np.diag([1.0, 1.0, neck_len, 1.0])
        Rf = np.eye(4)
        Rf[:3, :3] = _rot("x", flex)
        T2 = np.eye(4)
        T2[:3, 3] = ps
        neck = _Part(g, T2 @ Rf @ S @ T1 @ H)
        fat = float(np.clip(rng.normal(1.0, 0.3), 0.5, 1.8))  # subcutaneous fat scale
        self.extra.update(scale=(sx, sy, sz), flexion_deg=flex, neck_length=neck_len, fat_scale=fat,
                          sex="M" if sex_m else "F")

        self._body(head, neck, fat)
        self._skull_brain(head)
        self._face(head)
        self._neck(neck, fat)
        self._glands(head, neck)
        anat = Anatomy(self.tissue, self.glands, g.affine, source="parametric", extra=self.extra)
        return anat

    # ---------------------------------------------------------------------------------------
    def _body(self, head, neck, fat):
        T = Tissue
        f = 3.0 * (fat - 1.0)  # extra subcutaneous mm
        # cranium, face, chin, jaw line, submental: head part
        self.ell(head, (0, 5, 38), (76 + 0.3 * f, 99 + 0.3 * f, 90), T.FAT)
        self.ell(head, (0, -38, -22), (70 + f, 64 + f, 66), T.FAT)
        self.ell(head, (0, -52, 12), (66, 44 + 0.5 * f, 42), T.FAT)
        self.ell(head, (0, -70, -78), (30 + f, 24 + f, 19 + f), T.FAT)
        self.tube(head, [(-47, -2, -56), (-38, -55, -80), (0, -80, -90), (38, -55, -80), (47, -2, -56)], 14 + f, T.FAT)
        self.ell(head, (0, -52, -86), (46 + f, 36 + f, 18 + f), T.FAT)
        # nose and ears
        self.ell(head, (0, -101, -6), (12, 15, 24), T.SOFT, R=_rot("x", -18))
        self.ell(head, (0, -104, -22), (15, 8, 7), T.SOFT)  # nasal base / columella
        for s in (-1, 1):
            self.ell(head, (s * 73, 10, 0), (6, 16, 30), T.SOFT, R=_rot("y", s * 10))
        # neck (neck part): z-profiled ellipse
        prof = [
            (-182, 0, 14, 118, 74 + f),
            (-168, 0, 12, 96, 68 + f),
            (-155, 0, 8, 68 + f, 62 + f),
            (-130, 0, 6, 57 + f, 58 + f),
            (-100, 0, 6, 54 + f, 60 + f),
            (-60, 0, 10, 54 + f, 62 + f),
            (-20, 0, 14, 56 + f, 66 + f),
            (10, 0, 20, 50, 60),
        ]
        self.zcyl(neck, prof, T.FAT)
        body = (self.tissue > 0).view(np.uint8)
        # skin: the outer 2 mm
        inner = ndimage.minimum_filter(body, size=5) > 0
        self.tissue[(body > 0) & ~inner] = T.SOFT
        # ear canals (air) and the nasal vestibule
        for s in (-1, 1):
            self.tube(head, [(s * 80, 6, 0), (s * 50, 2, -2)], 3.5, T.AIRWAY)
        self.ell(head, (0, -108, -18), (8, 6, 4), T.AIRWAY, where=lambda t: t == T.SOFT)

    def _skull_brain(self, head):
        T = Tissue
        rng = self.rng
        c = (0, 5, 38)
        outer = np.array([71.0, 94.0, 85.0])
        th = float(rng.uniform(6.0, 8.5))

        def floor(Y):
            return np.interp(Y, [-95, -40, -32, 5, 18, 35, 50, 70, 90, 105], [34, 30, 2, -4, -26, -26, -18, -5, 10, 20]).astype(np.float32)

        # skull vault incl. diploe, with the skull base plate below the cranial floor
        self.paint(head, np.array(c) - outer - 2, np.array(c) + outer + 2,
                   lambda X, Y, Z: np.minimum(_ell_level(X, Y, Z, c, outer), Z - floor(Y) + 9), T.BONE_CORTICAL)
        self.paint(head, np.array(c) - outer, np.array(c) + outer,
                   lambda X, Y, Z: np.minimum(_ell_level(X, Y, Z, c, outer - 2.0), Z - floor(Y) + 7), T.BONE_SPONGY)
        inner_r = outer - th
        self.paint(head, np.array(c) - outer, np.array(c) + outer,
                   lambda X, Y, Z: np.minimum(_ell_level(X, Y, Z, c, inner_r + 2.0), Z - floor(Y) + 2), T.BONE_CORTICAL)
        # cranial cavity: CSF, then brain 2 mm inside
        self.paint(head, np.array(c) - inner_r, np.array(c) + inner_r,
                   lambda X, Y, Z: np.minimum(_ell_level(X, Y, Z, c, inner_r), Z - floor(Y)), T.CSF)
        self.paint(head, np.array(c) - inner_r, np.array(c) + inner_r,
                   lambda X, Y, Z: np.minimum(_ell_level(X, Y, Z, c, inner_r - 2.5), Z - floor(Y) - 2.5), T.BRAIN)
        # ventricles, interhemispheric fissure
        for s in (-1, 1):
            self.ell(head, (s * 9, 8, 52), (5 + rng.uniform(0, 2), 26, 8), T.CSF, R=_rot("y", s * 12))
        self.ell(head, (0, 10, 40), (2, 12, 7), T.CSF)
        self.paint(head, (-1.5, -80, 40), (1.5, 95, 128),
                   lambda X, Y, Z: np.minimum(1.2 - np.abs(X), _ell_level(X, Y, Z, (0, 5, 75), (20, 95, 58))), T.CSF,
                   where=lambda t: t == T.BRAIN)
        # foramen magnum, brainstem
        self.tube(head, [(0, 20, -12), (0, 24, -36)], 14, T.CSF, where=lambda t: t != T.AIR)
        self.tube(head, [(0, 5, 30), (0, 18, -5), (0, 22, -36)], [13, 12, 9], T.BRAIN,
                  where=lambda t: t != T.BONE_CORTICAL)
        # petrous ridges, mastoids, sphenoid sinus, clivus
        for s in (-1, 1):
            self.tube(head, [(s * 18, 2, 4), (s * 52, 20, -4)], 8, T.BONE_CORTICAL)
            self.ell(head, (s * 50, 22, -14), (10, 12, 15), T.BONE_SPONGY)
            self.ell(head, (s * 50, 22, -10), (6, 7, 8), T.AIRWAY)
            self.tube(head, [(s * 80, 6, 0), (s * 50, 2, -2)], 3.5, T.AIRWAY)
        self.tube(head, [(0, -15, 8), (0, 5, -22)], 9, T.BONE_SPONGY)
        self.ell(head, (0, -20, 10), (13, 11, 9), T.BONE_CORTICAL)
        self.ell(head, (0, -20, 10), (11, 9, 7.5), T.AIRWAY)
        # glenoid fossae: leave to mandible
        self.extra["skull_thickness_mm"] = th

    def _face(self, head):
        T = Tissue
        rng = self.rng
        ipd = rng.uniform(-3, 3)
        # maxillary sinuses (air) in a thin bony shell, ethmoid, frontal sinus
        for s in (-1, 1):
            self.ell(head, (s * 27, -62, -8), (17, 20, 19), T.BONE_CORTICAL)
            self.ell(head, (s * 27, -62, -8), (15.5, 18.5, 17.5), T.AIRWAY)
            # zygomatic arch
            self.tube(head, [(s * 45, -70, 4), (s * 60, -40, 2), (s * 60, -15, 0)], 4, T.BONE_CORTICAL)
        self.ell(head, (0, -60, 18), (14, 22, 14), T.BONE_SPONGY)  # ethmoid block
        for s in (-1, 1):
            self.ell(head, (s * 7, -60, 18), (5, 20, 12), T.AIRWAY)
        self.ell(head, (0, -88, 58), (16, 8, 10), T.AIRWAY, where=lambda t: t != T.BRAIN)
        # nasal cavity with septum and turbinates, nasopharynx
        for s in (-1, 1):
            self.ell(head, (s * 8.5, -66, -2), (7, 40, 20), T.AIRWAY)
            self.ell(head, (s * 10, -64, -14), (4, 28, 5), T.MUCOSA)
            self.ell(head, (s * 9, -60, 0), (3.5, 22, 5), T.MUCOSA)
        self.ell(head, (0, -19, -14), (14, 11, 11), T.AIRWAY)
        self.paint(head, (-2, -110, -26), (2, -28, 22), lambda X, Y, Z: 1.0 - np.abs(X) + 0 * Y * Z, T.BONE_CORTICAL,
                   where=lambda t: t == T.AIRWAY)
        # hard palate
        self.paint(head, (-24, -96, -32), (24, -30, -24),
                   lambda X, Y, Z: np.minimum(_ell_level(X, Y, Z, (0, -62, -28), (23, 34, 4)), 1.0), T.BONE_CORTICAL)
        # orbits: bony cone, fat, muscles, globe, lens, optic nerve
        for s in (-1, 1):
            gc = np.array([s * (32 + ipd / 2), -70.0, 17.0])
            apex = np.array([s * 14.0, -22.0, 14.0])
            rim = np.array([s * 35.0, -84.0, 18.0])
            axis = rim - apex
            L = float(np.linalg.norm(axis))
            u = axis / L

            def cone(X, Y, Z, grow=0.0, apex=apex, u=u, L=L):
                px, py, pz = X - apex[0], Y - apex[1], Z - apex[2]
                t = (px * u[0] + py * u[1] + pz * u[2]) / np.float32(L)
                rx = px - t * L * u[0]
                ry = py - t * L * u[1]
                rz = pz - t * L * u[2]
                rr = np.sqrt(rx * rx + ry * ry + rz * rz)
                return np.minimum(np.minimum(t, 1.04 - t), 3.0 + 17.0 * np.clip(t, 0, 1) + grow - rr)

            lo, hi = np.minimum(apex, rim) - 26, np.maximum(apex, rim) + 26
            inside = lambda t: t != T.AIR  # noqa: E731
            self.paint(head, lo, hi, lambda X, Y, Z, cone=cone: np.minimum(cone(X, Y, Z, 2.2), -4.0 - (Y - np.float32(rim[1])) ),
                       T.BONE_CORTICAL, where=inside)
            self.paint(head, lo, hi, cone, T.FAT, where=inside)
            for off in ((0, 0, 12), (0, 0, -12), (s * 13, 0, 0), (-s * 13, 0, 0)):
                self.tube(head, [apex, gc + np.array(off) + np.array([0, 6, 0])], 2.6, T.MUSCLE)
            self.tube(head, [apex, gc + np.array([0, 10, 0])], 2.2, T.SOFT)
            self.ell(head, gc, (12, 12, 12), T.EYE)
            self.ell(head, gc + np.array([0, -9.5, 0]), (4, 1.8, 4), T.SOFT)
            self.extra[f"globe_{'left' if s > 0 else 'right'}"] = gc.tolist()
        # muscles of mastication, temporalis
        for s in (-1, 1):
            self.ell(head, (s * 56, -28, -32), (6, 15, 27), T.MUSCLE, R=_rot("x", 12))
            self.ell(head, (s * 37, -22, -42), (6, 11, 22), T.MUSCLE, R=_rot("x", 15))
            self.ell(head, (s * 38, -22, -12), (7, 10, 9), T.MUSCLE)  # lateral pterygoid
            self.ell(head, (s * 72, -22, 32), (5.5, 32, 30), T.MUSCLE, where=lambda t: t == T.FAT)
        # tongue, floor of the mouth, oral cavity
        self.ell(head, (0, -54, -49), (24, 34, 17), T.TONGUE)
        self.ell(head, (0, -30, -64), (19, 14, 19), T.TONGUE)
        self.ell(head, (0, -56, -73), (27, 30, 8), T.MUSCLE)
        self.ell(head, (0, -60, -33), (16, 24, 2.2), T.AIRWAY)
        self.ell(head, (0, -28, -28), (17, 10, 7), T.MUSCLE)  # soft palate
        for s in (-1, 1):
            self.ell(head, (s * 15, -20, -50), (5, 6, 9), T.MUCOSA)  # palatine tonsils
        self.ell(head, (0, -8, -12), (14, 5, 9), T.MUCOSA)  # adenoid / posterior nasopharyngeal wall
        # mandible: body swept along the arch, rami, condyles; teeth
        arch = np.array([(-46, -4), (-40, -30), (-31, -56), (-20, -74), (-9, -84), (0, -86),
                         (9, -84), (20, -74), (31, -56), (40, -30), (46, -4)], float)
        ztop = np.array([-62, -56, -52, -50, -49, -49, -49, -50, -52, -56, -62], float)
        zbot = np.array([-66, -74, -82, -88, -93, -95, -93, -88, -82, -74, -66], float)
        half = np.array([4.5, 5, 5.5, 6, 7, 7.5, 7, 6, 5.5, 5, 4.5])

        def mand(X, Y, Z, inset=0.0):
            d, t = _polyline_distance((X, Y), arch)
            ii = np.arange(len(arch))
            zt = np.interp(t, ii, ztop).astype(np.float32) - inset
            zb = np.interp(t, ii, zbot).astype(np.float32) + inset
            hw = np.interp(t, ii, half).astype(np.float32) - inset
            return np.minimum(np.minimum(hw - d, Z - zb), zt - Z)

        self.paint(head, (-55, -96, -100), (55, 5, -45), mand, T.BONE_CORTICAL)
        self.paint(head, (-55, -96, -100), (55, 5, -45), lambda X, Y, Z: mand(X, Y, Z, 2.0), T.BONE_SPONGY)
        for s in (-1, 1):
            R = _rot("x", 8)
            self.ell(head, (s * 47, -18, -30), (4.5, 13, 30), T.BONE_CORTICAL, R=R)
            self.ell(head, (s * 47, -18, -30), (2.5, 11, 28), T.BONE_SPONGY, R=R)
            self.ell(head, (s * 49, -9, -3), (9, 5, 5), T.BONE_CORTICAL)
            self.ell(head, (s * 45, -36, -10), (3, 7, 10), T.BONE_CORTICAL)  # coronoid
        lower = np.array([(-27, -44), (-25, -58), (-18, -72), (-8, -81), (0, -83), (8, -81), (18, -72), (25, -58), (27, -44)], float)
        upper = lower * np.array([1.05, 1.0]) + np.array([0, -2.5])
        zl = np.full(len(lower), -49.0)
        self.tube(head, np.c_[lower, zl - 3], 3.8, T.TEETH)
        self.tube(head, np.c_[upper, zl + 5], 3.8, T.TEETH)
        self.tube(head, np.c_[upper, zl + 13], 5.0, T.BONE_SPONGY)  # upper alveolar ridge
        # carotid/jugular in the skull base region (continued by the neck part)

    def _neck(self, neck, fat):
        T = Tissue
        rng = self.rng
        # spine: bodies, discs, canal, cord, posterior elements
        levels = [(-50, 20, 1.0), (-72, 13, 0.0), (-89, 13, -1.0), (-106, 13, 0.0), (-123, 13, 2.0), (-140, 13, 5.0),
                  (-157, 14, 9.0), (-174, 14, 14.0)]
        for zc, h, yc in levels:
            a = 9.5 + (-zc - 50) * 0.04
            self.ell(neck, (0, yc, zc), (a + 1, 9, h / 2 + 0.5), T.BONE_CORTICAL, R=None)
            self.ell(neck, (0, yc, zc), (a - 0.8, 7.2, h / 2 - 0.8), T.BONE_SPONGY)
            cy = yc + 17
            self.ell(neck, (0, cy, zc), (15, 11.5, h / 2 - 1.0), T.BONE_CORTICAL)  # lamina/pedicle ring
            self.tube(neck, [(0, cy + 8, zc), (0, cy + 28, zc - 6)], 3.5, T.BONE_CORTICAL)  # spinous process
            for s in (-1, 1):
                self.tube(neck, [(s * 10, yc + 3, zc), (s * 25, yc + 6, zc)], 3.5, T.BONE_CORTICAL)  # transverse
            # disc below
            self.ell(neck, (0, yc - 0.5, zc - h / 2 - 2.0), (a, 8, 2.0), T.SOFT)
        # C1 ring and dens
        for s in (-1, 1):  # C1: lateral masses, arches
            self.ell(neck, (s * 15, 10, -31), (6, 8, 6), T.BONE_SPONGY)
        self.tube(neck, [(-13, 2, -30), (0, -6, -30), (13, 2, -30)], 3.2, T.BONE_CORTICAL)
        self.tube(neck, [(-15, 16, -30), (0, 36, -30), (15, 16, -30)], 3.2, T.BONE_CORTICAL)
        self.ell(neck, (0, 3, -33), (5.5, 5.5, 11), T.BONE_SPONGY)
        spine_y = [(-182, 14 + 17), (-157, 9 + 17), (-123, 2 + 17), (-89, -1 + 17), (-50, 1 + 17), (-20, 4 + 17), (0, 18 + 8)]
        zs = [p[0] for p in spine_y]
        ys = [p[1] for p in spine_y]
        canal = np.c_[zs, np.zeros(len(zs)), ys, np.full(len(zs), 11.0), np.full(len(zs), 7.5)]
        self.zcyl(neck, canal, T.CSF)
        cord = np.c_[zs, np.zeros(len(zs)), ys, np.full(len(zs), 6.0), np.full(len(zs), 4.2)]
        self.zcyl(neck, cord, T.SPINAL_CORD)
        # paraspinal and prevertebral muscles, SCM, strap muscles
        para = [(-182, 0, 55, 62, 22), (-140, 0, 46, 48, 24), (-100, 0, 44, 44, 24), (-60, 0, 44, 46, 24), (-25, 0, 48, 50, 20)]
        self.zcyl(neck, para, T.MUSCLE, where=lambda t: t == T.FAT)
        self.paint(neck, (-2, 30, -182), (2, 72, -20), lambda X, Y, Z: 1.0 - np.abs(X) + 0 * Y * Z, T.FAT,
                   where=lambda t: t == T.MUSCLE)
        for s in (-1, 1):
            self.tube(neck, [(s * 8, -8, -30), (s * 8, -12, -90), (s * 9, -5, -150)], 5, T.MUSCLE, where=lambda t: t == T.FAT)
            self.tube(neck, [(s * 50, 26, -18), (s * 46, 5, -70), (s * 36, -25, -130), (s * 22, -45, -172)], [9, 9, 8, 7], T.MUSCLE)
            self.tube(neck, [(s * 12, -48, -105), (s * 14, -46, -140), (s * 12, -42, -175)], 4, T.MUSCLE, where=lambda t: t == T.FAT)
            # scalene muscles
            self.tube(neck, [(s * 26, 8, -95), (s * 40, 0, -165)], 7, T.MUSCLE, where=lambda t: t == T.FAT)
        # airway: oro/hypopharynx, larynx, trachea
        aw = [(-182, 0, -10, 9, 8), (-150, 0, -22, 9, 8), (-118, 0, -30, 8.5, 7.5), (-108, 0, -32, 5, 6),
              (-98, 0, -32, 9, 8), (-85, 0, -26, 12, 7), (-60, 0, -18, 12, 6), (-35, 0, -16, 12, 6)]
        self.zcyl(neck, aw, T.AIRWAY)
        # thyroid cartilage / larynx wall, cricoid, hyoid
        lar = [(-122, 0, -32, 15, 14), (-110, 0, -33, 17, 16), (-92, 0, -33, 17, 15)]
        self.zcyl(neck, lar, T.SOFT, where=lambda t: t == T.FAT)
        self.tube(neck, [(-20, -18, -100), (-14, -32, -100), (0, -40, -100), (14, -32, -100), (20, -18, -100)], 3.5, T.BONE_CORTICAL)
        # thyroid
        for s in (-1, 1):
            self.ell(neck, (s * 18, -30, -140), (8 + rng.uniform(-1, 2), 10, 21), T.THYROID, warp=_Warp(rng, 1.5))
        self.ell(neck, (0, -40, -147), (11, 4, 6), T.THYROID)
        # vessels: common/internal carotid, external carotid, jugular vein
        for s in (-1, 1):
            self.tube(neck, [(s * 20, -16, -182), (s * 22, -12, -95), (s * 22, -4, -45), (s * 22, 6, -10)], [4.0, 3.8, 3.0, 2.8], T.VESSEL)
            self.tube(neck, [(s * 22, -12, -95), (s * 28, -22, -60), (s * 36, -20, -35)], 2.5, T.VESSEL)
            rj = 5.5 + (1.0 if s < 0 else 0.0) + rng.uniform(-1, 1)
            self.tube(neck, [(s * 33, -10, -182), (s * 34, -6, -95), (s * 34, 2, -45), (s * 36, 12, -14)], [rj, rj, rj - 1, rj - 2], T.VESSEL)
            self.tube(neck, [(s * 22, 8, -140), (s * 23, 5, -50), (s * 24, 12, -28)], 1.8, T.VESSEL)  # vertebral artery
            # lymph nodes (level II/III), lung apex, clavicle
            for c in ((s * 40, 6, -88), (s * 37, -2, -112), (s * 30, 18, -70)):
                self.ell(neck, c, (4, 6, 5) * rng.uniform(0.8, 1.2, 3), T.LYMPH_NODE, where=lambda t: t == T.FAT)
            self.ell(neck, (s * 44, 14, -222), (36, 50, 60), T.LUNG)
            self.tube(neck, [(s * 18, -48, -176), (s * 60, -30, -170), (s * 100, -5, -162)], 6.5, T.BONE_CORTICAL)
        # esophagus behind the trachea
        self.zcyl(neck, [(-182, -3, 0, 7, 5), (-130, -2, -10, 7, 5), (-118, 0, -14, 8, 4)], T.MUSCLE)

    # glands ---------------------------------------------------------------------------------
    def _gland(self, part, name, side, blobs, vol_ml, shell=None):
        """Paint one gland: union of warped ellipsoids (and optional shell field), iso-level for vol_ml."""
        rng = self.rng
        warp = _Warp(rng, amp_mm=2.2 if name in ("parotid", "submandibular") else 1.2,
                     wavelength_mm=(18.0, 45.0) if name in ("parotid", "submandibular") else (12.0, 30.0))
        los, his = [], []
        for c, r, R in blobs:
            lo, hi = _ell_box(c, r, R, margin=16.0)
            los.append(lo)
            his.append(hi)
        sl = part.box(np.min(los, 0), np.max(his, 0))
        X, Y, Z = part.coords(sl)
        Xw, Yw, Zw = warp(X, Y, Z)
        lev = None
        for c, r, R in blobs:
            # normalised so that level units are ~ mm near the surface
            l = _ell_level(Xw, Yw, Zw, c, r, R) * np.float32(min(r) / 2.0)
            lev = l if lev is None else np.maximum(lev, l)
        if shell is not None:
            lev = shell(Xw, Yw, Zw) if lev is None else np.maximum(lev, shell(Xw, Yw, Zw))
        lev = np.broadcast_to(lev, tuple(s.stop - s.start for s in sl))
        ok = _SOFT_OK[self.tissue[sl]] & (self.glands[sl] == 0)
        vals = lev[ok]
        want = int(round(vol_ml * 1000.0 / self.grid.h ** 3))
        nvox = want
        for _ in range(4):
            if vals.size <= nvox:
                thr = float(vals.min()) if vals.size else 0.0
            else:
                thr = float(np.partition(vals, vals.size - nvox)[vals.size - nvox])
            m = ok & (lev >= thr)
            # keep the largest connected piece; if that loses volume, lower the iso-level and retry
            lab, n = ndimage.label(m)
            if n > 1:
                sizes = np.bincount(lab.ravel())[1:]
                m = lab == (1 + int(np.argmax(sizes)))
            got = int(m.sum())
            if got >= want * 0.995 or vals.size <= nvox:
                break
            nvox += want - got
        got = int(m.sum())
        if got > want:  # trim the lowest levels of the kept piece back to the target volume
            lv = lev[m]
            m = m & (lev >= np.partition(lv, got - want)[got - want])
        sub = self.glands[sl]
        sub[m] = label_value(name, side)
        tsub = self.tissue[sl]
        tsub[m] = Tissue.SOFT

    def _glands(self, head, neck):
        rng = self.rng
        vols = {}
        for name, (lo, hi) in GLAND_VOLUME_ML.items():
            v = rng.uniform(lo, hi)
            asym = rng.normal(1.0, 0.07)
            vols[name] = {"left": float(np.clip(v * asym, lo, hi)), "right": float(np.clip(v / asym, lo, hi))}
        self.extra["gland_volume_target_ml"] = vols
        for side in ("left", "right"):
            s = 1.0 if side == "left" else -1.0
            j = lambda a=2.5: rng.normal(0, a, 3)  # noqa: E731
            # parotid: superficial lobe lateral to ramus/masseter, retromandibular and deep lobes, tail
            d = j(2.5)
            blobs = [
                ((s * 58 + d[0] * 0.4, -7 + d[1], -24 + d[2]), (8.5, 20, 30), _rot("x", 10)),
                ((s * 46, 8 + d[1], -28 + d[2]), (9, 9, 24), None),
                ((s * 36, 2 + d[1], -30 + d[2]), (6, 9, 13), None),
                ((s * 56, 4 + d[1], -52 + d[2]), (8, 10, 9), None),
                ((s * 59, -30 + d[1], -18 + d[2]), (4, 9, 5), None),
            ]
            self._gland(head, "parotid", side, blobs, vols["parotid"][side])
            # submandibular: below the mandibular body, deep process around the mylohyoid
            d = j(2.5)
            blobs = [
                ((s * 36 + d[0] * 0.3, -22 + d[1], -82 + d[2]), (9.5, 15, 11), _rot("x", -15)),
                ((s * 27, -37 + d[1], -73 + d[2]), (6, 10, 6), None),
            ]
            self._gland(head, "submandibular", side, blobs, vols["submandibular"][side])
            # sublingual: floor of the mouth above the mylohyoid, medial to the mandibular body
            d = j(1.5)
            blobs = [((s * 13 + d[0] * 0.3, -62 + d[1], -59 + d[2] * 0.5), (5.5, 16, 6.5), _rot("z", s * -15))]
            self._gland(head, "sublingual", side, blobs, vols["sublingual"][side])
            # lacrimal: thin curved shell superolateral to the globe
            gc = np.array(self.extra[f"globe_{side}"])
            dirv = np.array([0.62 * s, -0.32, 0.72])
            dirv /= np.linalg.norm(dirv)
            # angular half-width: 24-30 degrees gives a gland 4-5 mm thick at 0.5-0.9 mL (30-38 made
            # a 2.7 mm sheet whose CT number read 20-50 HU low, partial volume with the orbital fat)
            cosl = math.cos(math.radians(rng.uniform(24, 30)))
            rmid = 12.0 + 3.0 + rng.uniform(-0.5, 0.5)

            def shell(X, Y, Z, gc=gc, dirv=dirv, cosl=cosl, rmid=rmid):
                px, py, pz = X - gc[0], Y - gc[1], Z - gc[2]
                r = np.sqrt(px * px + py * py + pz * pz) + np.float32(1e-3)
                cosang = (px * dirv[0] + py * dirv[1] + pz * dirv[2]) / r
                return np.minimum(2.4 - np.abs(r - rmid), (cosang - cosl) * 40.0)

            c = gc + dirv * rmid
            blobs_l = [(tuple(c), (8, 8, 8), None)]
            self._gland_shell(head, side, blobs_l, shell, vols["lacrimal"][side])
            # tubarial: flat plate on the posterolateral nasopharyngeal wall over the torus tubarius
            d = j(1.2)
            R = _rot("z", s * 40) @ _rot("x", -20)
            blobs = [((s * 17 + d[0] * 0.3, -10 + d[1], -14 + d[2]), (2.6, 9, 17), R)]
            self._gland(head, "tubarial", side, blobs, vols["tubarial"][side])

    def _gland_shell(self, part, side, blobs, shell, vol):
        # a shell-only gland: blobs give the box, the shell gives the level
        c, r, _ = blobs[0]
        lo, hi = np.asarray(c) - 16, np.asarray(c) + 16
        sl = part.box(lo, hi)
        X, Y, Z = part.coords(sl)
        warp = _Warp(self.rng, amp_mm=1.0, wavelength_mm=(10.0, 25.0))
        lev = shell(*warp(X, Y, Z))
        lev = np.broadcast_to(lev, tuple(s.stop - s.start for s in sl))
        ok = ((self.tissue[sl] == Tissue.FAT) | (self.tissue[sl] == Tissue.SOFT) | (self.tissue[sl] == Tissue.MUSCLE)) & (self.glands[sl] == 0)
        vals = lev[ok]
        nvox = int(round(vol * 1000.0 / self.grid.h ** 3))
        thr = float(np.partition(vals, vals.size - nvox)[vals.size - nvox]) if vals.size > nvox else float(vals.min())
        m = ok & (lev >= thr)
        lab, n = ndimage.label(m)
        if n > 1:
            sizes = np.bincount(lab.ravel())[1:]
            m = lab == (1 + int(np.argmax(sizes)))
        self.glands[sl][m] = label_value("lacrimal", side)
        self.tissue[sl][m] = Tissue.SOFT


def build_parametric_anatomy(rng: np.random.Generator, sex: str | None = None) -> Anatomy:
    """One individual's anatomy (tissue classes + gland labels) on the 1 mm anatomy grid.

    ``sex`` ("M" | "F") sets the head size class; None draws it. ``anatomy.extra`` records what
    was drawn (scale, flexion, fat, sex, gland volume targets, ...).
    """
    return _Builder(rng, sex).build()


def add_lesion(anat: Anatomy, rng: np.random.Generator) -> dict:
    """Plant a FAPI-avid solid-tumour lesion (a nodal metastasis in neck level II/III, or a
    tongue-base primary) as Tissue.TUMOUR, away from the glands. Returns its description.

    Parametric anatomies place it at fixed positions of the parametric frame; anatomies that
    carry their own landmarks (``anat.extra["frame"]``, e.g. the real-label individuals, whose
    frame is the scan's world) place it relative to those landmarks, in soft tissue."""
    if "frame" in anat.extra:
        return _add_lesion_landmarks(anat, rng)
    kind = "node" if rng.random() < 0.7 else "tongue_base"
    s = 1.0 if rng.random() < 0.5 else -1.0
    if kind == "node":
        c = np.array([s * rng.uniform(34, 42), rng.uniform(-4, 8), rng.uniform(-118, -92)])
        r = rng.uniform(6, 11)
    else:
        c = np.array([s * rng.uniform(3, 10), rng.uniform(-34, -26), rng.uniform(-70, -60)])
        r = rng.uniform(7, 12)
    m, sl, _ = _lesion_mask(anat, c, r, rng.normal(0, 0.12, 3))
    t = anat.tissue[sl]
    t[m] = Tissue.TUMOUR
    return {"kind": kind, "center_mm": c.tolist(), "radius_mm": float(r), "n_voxels": int(m.sum())}


def _lesion_mask(anat: Anatomy, c: np.ndarray, r: float, warp: np.ndarray, margin: float = 3.0):
    """Voxels of a warped ball (centre c, radius r mm, per-axis radius factors 1 + warp) that may
    become tumour (soft tissue, no gland, no airway), the box slices, and the ball's own voxel
    count. Works on any axis-aligned grid (anisotropic voxels included)."""
    g = anat.affine
    inv = np.linalg.inv(g)
    ci = inv[:3, :3] @ c + inv[:3, 3]
    h = np.sqrt((g[:3, :3] ** 2).sum(axis=0))  # voxel size per axis (mm)
    ri = r / h
    lo = np.maximum(np.floor(ci - ri - margin).astype(int), 0)
    hi = np.minimum(np.ceil(ci + ri + margin).astype(int), anat.tissue.shape)
    sl = tuple(slice(a, max(a, b)) for a, b in zip(lo, hi))
    I, J, K = np.ogrid[sl]
    d2 = ((I - ci[0]) / (ri[0] * (1 + warp[0]))) ** 2 + ((J - ci[1]) / (ri[1] * (1 + warp[1]))) ** 2 + (
        (K - ci[2]) / (ri[2] * (1 + warp[2]))) ** 2
    t = anat.tissue[sl]
    ball = d2 <= 1.0
    m = ball & (anat.glands[sl] == 0) & _SOFT_OK[t] & (t != Tissue.AIRWAY)
    return m, sl, int(ball.sum())


def _add_lesion_landmarks(anat: Anatomy, rng: np.random.Generator, tries: int = 12) -> dict:
    """A lesion placed from the anatomy's own landmarks (``extra["frame"]``, anatomy-frame mm):

    * node: level II/III, lateral to the internal jugular vein (which runs ~30 mm lateral to the
      spinal canal at the front of the vertebral bodies), from 10 mm below to 6 mm above the
      bottom of the submandibular gland (about the hyoid level);
    * tongue base: a random tongue voxel in the posterior third of the tongue, 2-12 mm off the
      midline.

    A draw is kept when at least 60 % of the ball is soft tissue (no bone, air, vessel, gland)
    and the ball stays >= 5 mm from every gland; otherwise another draw (deterministic for the
    rng); after ``tries`` draws the best one is kept."""
    fr = anat.extra["frame"]
    g = anat.affine
    inv = np.linalg.inv(g)
    h = np.sqrt((g[:3, :3] ** 2).sum(axis=0))
    kind = "node" if rng.random() < 0.7 else "tongue_base"
    s = 1.0 if rng.random() < 0.5 else -1.0
    side = "left" if s > 0 else "right"
    tongue = None
    best = None
    for _ in range(tries):
        if kind == "node":
            z = fr["smg_bottom_z"][side] + rng.uniform(-10.0, 6.0)
            k = int(np.clip(round(inv[2, 2] * z + inv[2, 3]), 0, anat.tissue.shape[2] - 1))
            cx, cy = fr["canal_x"][k], fr["canal_y"][k]
            vb_front = cy - fr["canal_r"] - fr["vb_ap"]
            c = np.array([cx + s * rng.uniform(36.0, 44.0), vb_front + rng.uniform(2.0, 12.0), z])
            r = rng.uniform(6, 11)
        else:
            if tongue is None:
                idx = np.argwhere(anat.tissue == Tissue.TONGUE)
                w = idx @ g[:3, :3].T + g[:3, 3]
                back = w[:, 1] >= np.quantile(w[:, 1], 2 / 3) if len(w) else np.zeros(0, bool)
                tongue = w[back]
            off = (tongue[:, 0] - fr["mid_x"]) * s if len(tongue) else np.zeros(0)
            cand = tongue[(off >= 2.0) & (off <= 12.0)] if len(tongue) else tongue
            if len(cand) == 0:  # no tongue synthesised: fall back to a node
                kind = "node"
                continue
            c = cand[int(rng.integers(len(cand)))].astype(float)
            r = rng.uniform(7, 12)
        warp = rng.normal(0, 0.12, 3)
        m, sl, n_ball = _lesion_mask(anat, c, r, warp)
        frac = m.sum() / max(n_ball, 1)
        # distance to the glands: no gland voxel within r + 5 mm of the centre (per-axis mm)
        ci = inv[:3, :3] @ c + inv[:3, 3]
        reach = (r * 1.15 + 5.0) / h
        lo = np.maximum(np.floor(ci - reach).astype(int), 0)
        hi = np.minimum(np.ceil(ci + reach).astype(int) + 1, anat.tissue.shape)
        gsl = tuple(slice(a, max(a, b)) for a, b in zip(lo, hi))
        gi = np.argwhere(anat.glands[gsl] > 0)
        if len(gi):
            dmm = np.sqrt(((((gi + lo) - ci) * h) ** 2).sum(axis=1)).min() - r * (1 + float(np.abs(warp).max()))
        else:
            dmm = np.inf
        score = frac + (0.5 if dmm >= 5.0 else 0.0)
        if best is None or score > best[0]:
            best = (score, kind, c, r, m, sl, frac, dmm)
        if frac >= 0.6 and dmm >= 5.0:
            break
    _, kind, c, r, m, sl, frac, dmm = best
    t = anat.tissue[sl]
    t[m] = Tissue.TUMOUR
    return {"kind": kind, "center_mm": [float(v) for v in c], "radius_mm": float(r), "n_voxels": int(m.sum()),
            "soft_fraction": float(frac), "gland_clearance_mm": float(dmm)}
