"""Synthetic X-ray coronary angiography frames with exact vessel masks and Sa2VA-style polygon annotations.

A frame is a dark branching vessel tree (a thick proximal trunk tapering into ~1 px branches, with crossings) and a
catheter (dark, but not a vessel: it is not in the ground truth) on a bright, vignetted, textured, noisy background.
Frames of one sequence show the same tree moved and deformed a little (cardiac motion) with fresh noise. Everything
is drawn from ``numpy.random.default_rng`` seeds, so two builds give identical pixels.

Ground truth leaves this module only as polygons (``mask_to_polygons``); filling them with the **even-odd rule**
(each polygon XOR-ed into the mask, as ``cv2.fillPoly`` does with all polygons in one call) gives back the raster
mask: outer outlines and the outlines of holes (background enclosed by looping vessels) are both listed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import draw, measure

SUPERSAMPLE = 2  # vessels are drawn at 2x and averaged down, so 1 px branches are not broken into dots


@dataclass(frozen=True)
class VesselPoint:
    """A sample along a vessel centre line, in pixels of the output frame."""

    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class SyntheticFrame:
    """One generated frame: RGB uint8 image and its boolean vessel mask (the mask never leaves the generator)."""

    name: str
    image: np.ndarray
    mask: np.ndarray


def _grow_branch(
    rng: np.random.Generator,
    points: list[VesselPoint],
    x: float,
    y: float,
    angle: float,
    radius: float,
    depth: int,
    size: int,
) -> None:
    """Walk a wiggly, tapering centre line from (x, y); at its end continue and fork a thinner side branch."""
    scale = size / 256
    length = (28 + 10 * radius / scale) * scale * rng.uniform(0.8, 1.3)
    end_radius = radius * rng.uniform(0.8, 0.92)
    turn = rng.normal(0, 0.02)
    n_steps = max(int(length / 0.5), 2)
    for step in range(n_steps):
        r = radius + (end_radius - radius) * step / n_steps
        turn = 0.92 * turn + rng.normal(0, 0.01)
        angle += turn
        x += 0.5 * np.cos(angle)
        y += 0.5 * np.sin(angle)
        if not (-10 <= x <= size + 10 and -10 <= y <= size + 10):
            return
        points.append(VesselPoint(x, y, r))
    if depth <= 0:
        return
    side = rng.choice([-1.0, 1.0])
    _grow_branch(rng, points, x, y, angle - side * rng.uniform(0.1, 0.35), end_radius * 0.88, depth - 1, size)
    side_radius = end_radius * rng.uniform(0.45, 0.7)
    if side_radius >= 0.5 * scale:
        _grow_branch(rng, points, x, y, angle + side * rng.uniform(0.5, 1.0), side_radius, depth - 1, size)


def vessel_tree(rng: np.random.Generator, size: int) -> list[VesselPoint]:
    """Two coronary-like trees entering from the upper border; their branches cross each other."""
    points: list[VesselPoint] = []
    scale = size / 256
    for start_x, heading in ((0.25, 0.9), (0.7, 2.1)):
        x0 = size * (start_x + rng.uniform(-0.08, 0.08))
        y0 = size * rng.uniform(0.08, 0.18)
        radius = rng.uniform(4.0, 6.0) * scale
        _grow_branch(rng, points, x0, y0, heading + rng.uniform(-0.25, 0.25), radius, depth=5, size=size)
    return points


def _catheter(rng: np.random.Generator, size: int) -> list[VesselPoint]:
    """A catheter enters from the top border towards the first trunk: dark like a vessel, absent from the GT."""
    x, y = size * rng.uniform(0.05, 0.2), 0.0
    angle = np.pi / 2 + rng.uniform(-0.3, 0.3)
    points = []
    for _ in range(int(size * 0.3 / 0.5)):
        angle += rng.normal(0, 0.01)
        x, y = x + 0.5 * np.cos(angle), y + 0.5 * np.sin(angle)
        points.append(VesselPoint(x, y, 1.4 * size / 256))
    return points


def _deform(points: list[VesselPoint], rng: np.random.Generator, size: int, phase: float) -> list[VesselPoint]:
    """Cardiac-like motion: a global shift plus a smooth sinusoidal warp, growing with ``phase``."""
    amplitude = 0.012 * size
    shift = rng.normal(0, 0.008 * size, size=2) + phase * amplitude
    out = []
    for p in points:
        dx = shift[0] + amplitude * np.sin(2 * np.pi * (p.y / size + 0.3 * phase))
        dy = shift[1] + amplitude * np.cos(2 * np.pi * (p.x / size + 0.2 * phase))
        out.append(VesselPoint(p.x + dx, p.y + dy, p.radius))
    return out


def _rasterise(points: list[VesselPoint], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask, path length) at the output size.

    Each pixel belongs to its nearest centre-line sample (Euclidean distance transform on a 2x grid); it is vessel
    when that distance is within the sample's radius, and the X-ray path length through the vessel there is the
    chord ``2 * sqrt(r^2 - d^2)``.
    """
    hi = size * SUPERSAMPLE
    radius_grid = np.zeros((hi, hi), dtype=np.float32)
    if points:
        xy = np.array([(p.x, p.y, p.radius) for p in points], dtype=np.float64)
        cols = np.round(xy[:, 0] * SUPERSAMPLE).astype(int)
        rows = np.round(xy[:, 1] * SUPERSAMPLE).astype(int)
        inside = (rows >= 0) & (rows < hi) & (cols >= 0) & (cols < hi)
        np.maximum.at(radius_grid, (rows[inside], cols[inside]), np.maximum(xy[inside, 2], 0.5).astype(np.float32))
    if not radius_grid.any():
        return np.zeros((size, size), dtype=bool), np.zeros((size, size), dtype=np.float32)
    distance, (near_r, near_c) = ndimage.distance_transform_edt(radius_grid == 0, return_indices=True)
    radius = radius_grid[near_r, near_c] * SUPERSAMPLE
    chord = 2 * np.sqrt(np.clip(radius**2 - distance**2, 0, None)) / SUPERSAMPLE
    coverage = (distance <= radius).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    path = chord.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)
    return coverage >= 0.5, path


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Bright X-ray field: vignetting, soft anatomical shadows and a fine texture."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = 0.5 + rng.uniform(-0.1, 0.1, size=2)
    vignette = 1.0 - 0.45 * ((xx - cx) ** 2 + (yy - cy) ** 2) / 0.5
    shadows = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=size / 8)
    shadows /= np.abs(shadows).max() + 1e-8
    texture = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=size / 64)
    texture /= np.abs(texture).max() + 1e-8
    return 0.78 * vignette + 0.08 * shadows + 0.03 * texture


def render_frame(
    tree: list[VesselPoint], catheter: list[VesselPoint], background: np.ndarray, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Image (RGB uint8) and vessel mask of one frame; contrast grows with vessel thickness, as in X-ray."""
    mask, path = _rasterise(tree, size)
    _, catheter_path = _rasterise(catheter, size)
    contrast = rng.uniform(0.2, 0.26)
    # sqrt: thin branches stay visible (as with real contrast agent) while the trunk does not saturate
    attenuation = 1.0 - np.exp(-contrast * np.sqrt(path + catheter_path))
    image = ndimage.gaussian_filter(background * (1.0 - attenuation), sigma=0.6)
    image = image + rng.normal(0, 0.02, size=image.shape)
    grey = np.clip(image * 255, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2), mask


def sequence_tag(patient_index: int, sequence_index: int) -> str:
    """A users'-style sequence name, e.g. ``1-4_1_0A1B2C3D`` (run, series, deterministic hex id)."""
    digest = hashlib.sha256(f"demo-{patient_index}-{sequence_index}".encode()).hexdigest()[:8].upper()
    return f"{sequence_index + 1}-4_1_{digest}"


def patient_name(patient_index: int, prefix: str = "Demo_Patient") -> str:
    """``Demo_Patient_A_0000100001`` style: a name then a ten-digit id, as in the users' files."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    label = letters[patient_index] if patient_index < len(letters) else str(patient_index)
    return f"{prefix}_{label}_{100001 + patient_index:010d}"


def generate_frames(
    seed: int,
    n_patients: int,
    sequences_per_patient: int,
    frames_per_sequence: int,
    size: int,
    prefix: str = "Demo_Patient",
    first_frame: int = 34,
) -> list[SyntheticFrame]:
    """All frames of a synthetic dataset, named ``<Name>_<id>__<seq>_frame_<nnnnnn>`` (stems, no extension)."""
    frames = []
    for patient in range(n_patients):
        for sequence in range(sequences_per_patient):
            rng = np.random.default_rng([seed, patient, sequence])
            tree = vessel_tree(rng, size)
            catheter = _catheter(rng, size)
            background = _background(rng, size)
            stem = f"{patient_name(patient, prefix)}__{sequence_tag(patient, sequence)}"
            for index in range(frames_per_sequence):
                frame_rng = np.random.default_rng([seed, patient, sequence, index, 7])
                phase = index / max(frames_per_sequence - 1, 1)
                moved = _deform(tree, frame_rng, size, phase)
                moved_catheter = _deform(catheter, frame_rng, size, phase)
                image, mask = render_frame(moved, moved_catheter, background, frame_rng, size)
                frames.append(SyntheticFrame(f"{stem}_frame_{first_frame + index:06d}", image, mask))
    return frames


def mask_to_polygons(mask: np.ndarray, tolerance: float = 0.3, min_points: int = 3) -> list[list[float]]:
    """Outlines of every region *and hole* of ``mask`` as flat ``[x1, y1, x2, y2, ...]`` lists.

    Pixel centres have integer coordinates; outlines run between pixels (half-integers, so a vessel touching the
    border gives -0.5 or size-0.5). Fill them back with the even-odd rule (:func:`polygons_to_mask`).
    ``tolerance`` (pixels) is ``skimage.measure.approximate_polygon``'s; small so 1 px vessels survive.
    """
    padded = np.pad(mask.astype(np.float32), 1)
    polygons = []
    for contour in measure.find_contours(padded, 0.5):
        simplified = measure.approximate_polygon(contour, tolerance=tolerance)
        if len(simplified) < min_points + 1:
            continue
        xy = simplified[:-1, ::-1] - 1.0  # (row, col) -> (x, y), undo the padding; drop the closing repeat
        polygons.append([round(float(v), 2) for v in xy.ravel()])
    return polygons


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Even-odd fill: a pixel is foreground when its centre lies inside an odd number of polygons."""
    mask = np.zeros((height, width), dtype=bool)
    for flat in polygons:
        xy = np.asarray(flat, dtype=np.float64).reshape(-1, 2)
        rr, cc = draw.polygon(xy[:, 1], xy[:, 0], shape=(height, width))
        mask[rr, cc] ^= True
    return mask


def annotation_record(image_name: str, mask: np.ndarray, prompt: str, answer: str) -> dict:
    """One entry of a Sa2VA training ``annotations.json``: polygons, one ``"blood vessel"`` text per polygon."""
    polygons = mask_to_polygons(mask)
    return {
        "image": image_name,
        "mask": polygons,
        "text": ["blood vessel"] * len(polygons),
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
    }
