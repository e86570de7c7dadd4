"""Renderers for the synthetic image domains: chest X-ray, dermoscopy and fundus.

Each renderer is a pure function of a NumPy generator, a 0/1 label and the image
side, and returns a ``uint8`` array. The class signal is deliberately large and
global (a bright opacity covering much of a lung, a big dark lesion, dozens of
haemorrhages) so that a tiny model on top of a frozen random vision tower can pick
it up. Geometry is given in fractions of the image side so any size works.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class CxrStyle:
    """Grey levels and geometry of the synthetic chest X-ray.

    Attributes
    ----------
    background, soft_tissue, lung, mediastinum, heart : float
        Grey levels (0-255) of each structure.
    rib_contrast : float
        Half peak-to-peak grey amplitude of the rib stripes.
    rib_count : tuple of float
        Range of the number of rib stripes over the image height.
    opacity : tuple of float
        Range of the grey level the pneumonia opacity adds at its centre.
    opacity_extent : tuple of float
        Range of the opacity radii as a fraction of the lung radii.
    opacity_drop, opacity_sway : tuple of float, float
        Range of the downward shift of the opacity centre, and bound of its sideways
        shift, as fractions of the lung radii.
    opacity_flatness : float
        Exponent of the dome profile ``(1 - d**2) ** flatness``; below 0.5 the
        opacity is dense up to close to its rim.
    gain : tuple of float
        Range of the per-image exposure gain.
    noise : float
        Standard deviation of the pixel noise (grey levels).
    bbox_level : float
        The bounding box covers pixels where the opacity adds more than this share
        of its peak.
    """

    background: float = 12.0
    soft_tissue: float = 55.0
    lung: float = 95.0
    mediastinum: float = 150.0
    heart: float = 140.0
    rib_contrast: float = 16.0
    rib_count: tuple[float, float] = (7.0, 9.0)
    opacity: tuple[float, float] = (105.0, 130.0)
    opacity_extent: tuple[float, float] = (0.75, 1.05)
    opacity_drop: tuple[float, float] = (0.0, 0.3)
    opacity_sway: float = 0.15
    opacity_flatness: float = 0.35
    gain: tuple[float, float] = (0.96, 1.04)
    noise: float = 4.0
    bbox_level: float = 0.25


@dataclass(frozen=True)
class DermStyle:
    """Colours and geometry of the synthetic dermoscopy image.

    Attributes
    ----------
    skin_tones : tuple of RGB
        Base skin colours; each image picks one and jitters it.
    nevus_colour, melanoma_colour, blue_grey, black : RGB
        Lesion colours.
    nevus_radius, melanoma_radius : tuple of float
        Lesion radius range as a fraction of the image side.
    border_irregularity : tuple of float
        Range of the per-harmonic amplitude of the melanoma border.
    noise : float
        Standard deviation of the pixel noise.
    """

    skin_tones: tuple[tuple[float, float, float], ...] = (
        (236.0, 196.0, 168.0),
        (218.0, 170.0, 135.0),
        (196.0, 146.0, 112.0),
    )
    nevus_colour: tuple[float, float, float] = (178.0, 128.0, 92.0)
    melanoma_colour: tuple[float, float, float] = (58.0, 38.0, 32.0)
    blue_grey: tuple[float, float, float] = (105.0, 112.0, 138.0)
    black: tuple[float, float, float] = (14.0, 10.0, 10.0)
    nevus_radius: tuple[float, float] = (0.08, 0.13)
    melanoma_radius: tuple[float, float] = (0.24, 0.33)
    border_irregularity: tuple[float, float] = (0.04, 0.12)
    noise: float = 5.0


@dataclass(frozen=True)
class FundusStyle:
    """Colours and counts of the synthetic fundus photograph.

    Attributes
    ----------
    retina, macula, disc, vessel, haemorrhage, exudate : RGB
        Colours of each structure.
    retina_radius, disc_radius : float
        Radii as a fraction of the image side.
    haemorrhages, exudates : tuple of int
        Range of the number of lesions in diabetic retinopathy.
    haemorrhage_radius, exudate_radius : tuple of float
        Lesion radius range as a fraction of the image side.
    haemorrhage_reach, exudate_reach : float
        Lesions lie within this distance of the image centre (fraction of the side).
    noise : float
        Standard deviation of the pixel noise.
    """

    retina: tuple[float, float, float] = (208.0, 88.0, 42.0)
    macula: tuple[float, float, float] = (160.0, 58.0, 30.0)
    disc: tuple[float, float, float] = (250.0, 218.0, 150.0)
    vessel: tuple[float, float, float] = (165.0, 48.0, 32.0)
    haemorrhage: tuple[float, float, float] = (92.0, 8.0, 8.0)
    exudate: tuple[float, float, float] = (242.0, 222.0, 96.0)
    retina_radius: float = 0.46
    disc_radius: float = 0.07
    haemorrhages: tuple[int, int] = (30, 60)
    exudates: tuple[int, int] = (10, 25)
    haemorrhage_radius: tuple[float, float] = (0.011, 0.025)
    exudate_radius: tuple[float, float] = (0.008, 0.017)
    haemorrhage_reach: float = 0.38
    exudate_reach: float = 0.3
    noise: float = 4.0


CXR_STYLE = CxrStyle()
DERM_STYLE = DermStyle()
FUNDUS_STYLE = FundusStyle()


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1]: (y, x), each of shape (size, size)."""
    axis = (np.arange(size, dtype=np.float64) + 0.5) / size
    return np.meshgrid(axis, axis, indexing="ij")


def _ellipse_distance(
    y: np.ndarray, x: np.ndarray, *, cy: float, cx: float, ry: float, rx: float
) -> np.ndarray:
    """Normalised elliptical radius: 1 on the ellipse border."""
    return np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)


def _soft_disc(distance: np.ndarray, *, edge: float = 0.15) -> np.ndarray:
    """1 inside, 0 outside, with a linear ramp of width ``edge`` at the border."""
    return np.clip((1.0 - distance) / edge + 0.5, 0.0, 1.0)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _lung_fields(
    rng: np.random.Generator, *, lateral: bool
) -> list[tuple[float, float, float, float]]:
    """Lung ellipses (cy, cx, ry, rx) in unit coordinates."""
    jitter = rng.uniform(-0.02, 0.02, size=4)
    if lateral:
        return [(0.5 + jitter[0], 0.47 + jitter[1], 0.33 + jitter[2], 0.27 + jitter[3])]
    cy, ry, rx = 0.5 + jitter[0], 0.3 + jitter[2], 0.14 + jitter[3]
    return [(cy, 0.31 + jitter[1], ry, rx), (cy, 0.69 - jitter[1], ry, rx)]


def _opacity(
    rng: np.random.Generator,
    y: np.ndarray,
    x: np.ndarray,
    lung: tuple[float, float, float, float],
    *,
    style: CxrStyle,
) -> np.ndarray:
    """Additive grey of a pneumonia opacity over part of one lung, shape (S, S)."""
    cy, cx, ry, rx = lung
    extent = rng.uniform(*style.opacity_extent, size=2)
    oy = cy + rng.uniform(*style.opacity_drop) * ry  # pneumonia favours lower zones
    ox = cx + rng.uniform(-style.opacity_sway, style.opacity_sway) * rx
    d = _ellipse_distance(y, x, cy=oy, cx=ox, ry=extent[0] * ry, rx=extent[1] * rx)
    # A flat-topped dome: dense consolidation with a short fading rim.
    profile = np.clip(1.0 - d**2, 0.0, 1.0) ** style.opacity_flatness
    inside_lung = _soft_disc(_ellipse_distance(y, x, cy=cy, cx=cx, ry=ry, rx=rx))
    mottle = 1.0 + 0.15 * rng.standard_normal(y.shape)
    return rng.uniform(*style.opacity) * profile * inside_lung * mottle


def _bbox(added: np.ndarray, *, level: float) -> list[int]:
    """[x1, y1, x2, y2] (x2, y2 exclusive) of the pixels above ``level`` * peak."""
    ys, xs = np.nonzero(added > level * float(added.max()))
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def render_cxr(
    rng: np.random.Generator,
    *,
    label: int,
    size: int,
    lateral: bool = False,
    style: CxrStyle = CXR_STYLE,
) -> tuple[np.ndarray, list[int] | None]:
    """A grayscale chest X-ray-like image.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of all randomness of this image.
    label : int
        0 = Normal, 1 = Pneumonia (a large bright opacity over part of one lung).
    size : int
        Image side in pixels.
    lateral : bool
        Render the lateral view (one lung silhouette, spine at the back).
    style : CxrStyle
        Grey levels and geometry.

    Returns
    -------
    image : numpy.ndarray
        ``uint8`` array of shape (size, size).
    bbox : list of int or None
        ``[x1, y1, x2, y2]`` of the opacity in pixels (x2, y2 exclusive), or None for
        a normal image.
    """
    y, x = _grid(size)
    image = np.full((size, size), style.background)
    thorax = _soft_disc(_ellipse_distance(y, x, cy=0.56, cx=0.5, ry=0.46, rx=0.44))
    image += (style.soft_tissue - style.background) * thorax
    lungs = _lung_fields(rng, lateral=lateral)
    ribs = rng.uniform(*style.rib_count)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    curve = y + 0.4 * (x - 0.5) ** 2  # ribs bend downwards away from the midline
    stripes = style.rib_contrast * np.sin(2.0 * np.pi * ribs * curve + phase)
    for cy, cx, ry, rx in lungs:
        mask = _soft_disc(_ellipse_distance(y, x, cy=cy, cx=cx, ry=ry, rx=rx))
        image += mask * (style.lung - style.soft_tissue + stripes)
    if lateral:
        spine = _soft_disc(np.abs(x - 0.8) / 0.06, edge=0.5) * (y > 0.15)
        image += (style.mediastinum - style.soft_tissue) * spine
        heart_centre = (0.66, 0.38)
    else:
        band = _soft_disc(np.abs(x - 0.5) / 0.06, edge=0.6) * _soft_disc(
            np.abs(y - 0.5) / 0.36
        )
        mediastinum = style.background + (style.mediastinum - style.background) * band
        image = np.maximum(image, mediastinum)
        heart_centre = (0.66, 0.55)
    hy, hx = heart_centre
    heart = _soft_disc(_ellipse_distance(y, x, cy=hy, cx=hx, ry=0.13, rx=0.13))
    heart_grey = style.background + (style.heart - style.background) * heart
    image = np.maximum(image, heart_grey)
    bbox = None
    if label == 1:
        lung = lungs[int(rng.integers(len(lungs)))]
        added = _opacity(rng, y, x, lung, style=style)
        image += added
        bbox = _bbox(added, level=style.bbox_level)
    noise = style.noise * rng.standard_normal(image.shape)
    return _to_uint8(image * rng.uniform(*style.gain) + noise), bbox


def _lesion_radius_map(
    rng: np.random.Generator,
    angle: np.ndarray,
    *,
    radius: float,
    irregular: bool,
    style: DermStyle,
) -> np.ndarray:
    """Lesion radius as a function of the polar angle (wobbly for melanoma)."""
    if not irregular:
        tilt = rng.uniform(0.0, np.pi)
        return radius * (1.0 + 0.05 * np.cos(2.0 * (angle - tilt)))
    wobble = np.zeros_like(angle)
    for harmonic in range(2, 7):
        amplitude = rng.uniform(*style.border_irregularity)
        wobble += amplitude * np.sin(harmonic * angle + rng.uniform(0.0, 2.0 * np.pi))
    return radius * (1.0 + wobble)


def _blobs(
    rng: np.random.Generator,
    y: np.ndarray,
    x: np.ndarray,
    *,
    centre: tuple[float, float],
    spread: float,
    count: int,
    radius: tuple[float, float],
) -> np.ndarray:
    """Union mask (0-1) of ``count`` small soft discs scattered around ``centre``."""
    mask = np.zeros_like(y)
    for _ in range(count):
        by = centre[0] + rng.uniform(-spread, spread)
        bx = centre[1] + rng.uniform(-spread, spread)
        r = rng.uniform(*radius)
        disc = _soft_disc(_ellipse_distance(y, x, cy=by, cx=bx, ry=r, rx=r), edge=0.4)
        mask = np.maximum(mask, disc)
    return mask


def _paint(image: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Blend ``colour`` (3,) into ``image`` (S, S, 3) with opacity ``mask`` (S, S)."""
    return image * (1.0 - mask[..., None]) + colour[None, None, :] * mask[..., None]


def render_derm(
    rng: np.random.Generator, *, label: int, size: int, style: DermStyle = DERM_STYLE
) -> np.ndarray:
    """A colour dermoscopy-like image with one lesion on skin.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of all randomness of this image.
    label : int
        0 = Benign nevus (small, round, uniform light brown), 1 = Melanoma (large,
        very dark, irregular border, blue-grey and black patches).
    size : int
        Image side in pixels.
    style : DermStyle
        Colours and geometry.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape (size, size, 3).
    """
    y, x = _grid(size)
    tone = np.asarray(style.skin_tones[int(rng.integers(len(style.skin_tones)))])
    skin = tone + rng.uniform(-8.0, 8.0, size=3)
    band = y * rng.uniform(0.5, 1.5) + rng.uniform(0.0, 1.0)
    shading = 1.0 + 0.05 * np.sin(2.0 * np.pi * band)  # uneven illumination
    image = skin[None, None, :] * shading[..., None]
    cy, cx = 0.5 + rng.uniform(-0.07, 0.07, size=2)
    melanoma = label == 1
    radii = style.melanoma_radius if melanoma else style.nevus_radius
    radius = rng.uniform(*radii)
    angle = np.arctan2(y - cy, x - cx)
    border = _lesion_radius_map(
        rng, angle, radius=radius, irregular=melanoma, style=style
    )
    edge = 0.2 if melanoma else 0.3
    lesion = _soft_disc(np.hypot(y - cy, x - cx) / border, edge=edge)
    colour = np.asarray(style.melanoma_colour if melanoma else style.nevus_colour)
    image = _paint(image, lesion, colour + rng.uniform(-10.0, 10.0, size=3))
    if melanoma:
        for colour_rgb, count, extent in (
            (style.blue_grey, (3, 7), (0.15, 0.3)),
            (style.black, (4, 9), (0.06, 0.12)),
        ):
            patches = _blobs(
                rng,
                y,
                x,
                centre=(cy, cx),
                spread=radius * 0.65,
                count=int(rng.integers(*count)),
                radius=(extent[0] * radius, extent[1] * radius),
            )
            image = _paint(image, patches * lesion, np.asarray(colour_rgb))
    vignette = _soft_disc(np.hypot(y - 0.5, x - 0.5) / 0.62, edge=0.3)
    noise = style.noise * rng.standard_normal(image.shape)
    image = image * vignette[..., None] + noise
    return _to_uint8(image)


def _draw_vessels(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    *,
    disc: tuple[float, float],
    size: int,
    style: FundusStyle,
) -> None:
    """Four arcades leaving the optic disc towards the macula side (in pixels)."""
    toward = 1.0 if disc[1] < 0.5 else -1.0
    colour = tuple(int(c) for c in style.vessel)
    width = max(1, round(size / 64))
    for sign in (-1.0, 1.0):
        for spread in (0.16, 0.3):
            t = np.linspace(0.0, 1.0, 12)
            bend = spread + rng.uniform(-0.04, 0.04)
            vx = disc[1] + toward * 0.55 * t
            vy = disc[0] + sign * bend * np.sin(np.pi * 0.8 * t)
            points = [
                (float(a * size), float(b * size)) for a, b in zip(vx, vy, strict=True)
            ]
            draw.line(points, fill=colour, width=width)


def _draw_spots(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    *,
    count: tuple[int, int],
    radius: tuple[float, float],
    colour: tuple[float, float, float],
    reach: float,
    size: int,
) -> None:
    """Filled discs at random places within ``reach`` of the centre (unit coords)."""
    fill = tuple(int(c) for c in colour)
    for _ in range(int(rng.integers(*count))):
        rho = reach * np.sqrt(rng.uniform(0.0, 1.0))  # uniform over the disc area
        theta = rng.uniform(0.0, 2.0 * np.pi)
        cy = (0.5 + rho * np.sin(theta)) * size
        cx = (0.5 + rho * np.cos(theta)) * size
        r = rng.uniform(*radius) * size
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)


def render_fundus(
    rng: np.random.Generator,
    *,
    label: int,
    size: int,
    style: FundusStyle = FUNDUS_STYLE,
) -> np.ndarray:
    """A colour fundus-photograph-like image.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of all randomness of this image.
    label : int
        0 = No DR, 1 = Diabetic retinopathy (dozens of dark-red haemorrhage dots and
        yellow exudates).
    size : int
        Image side in pixels.
    style : FundusStyle
        Colours and counts.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape (size, size, 3).
    """
    y, x = _grid(size)
    r = np.hypot(y - 0.5, x - 0.5) / style.retina_radius
    retina = np.asarray(style.retina) + rng.uniform(-10.0, 10.0, size=3)
    falloff = 1.0 - 0.35 * np.clip(r, 0.0, 1.0) ** 2  # darker towards the rim
    image = retina[None, None, :] * falloff[..., None]
    macula = _soft_disc(np.hypot(y - 0.5, x - 0.5) / 0.09, edge=0.8)
    image = _paint(image, macula, np.asarray(style.macula))
    disc = (0.5 + rng.uniform(-0.04, 0.04), 0.5 + rng.choice([-1.0, 1.0]) * 0.25)
    canvas = Image.fromarray(_to_uint8(image))
    draw = ImageDraw.Draw(canvas)
    _draw_vessels(draw, rng, disc=disc, size=size, style=style)
    d = style.disc_radius * size
    dy, dx = disc[0] * size, disc[1] * size
    disc_fill = tuple(int(c) for c in style.disc)
    draw.ellipse([dx - d, dy - d, dx + d, dy + d], fill=disc_fill)
    if label == 1:
        _draw_spots(
            draw,
            rng,
            count=style.haemorrhages,
            radius=style.haemorrhage_radius,
            colour=style.haemorrhage,
            reach=style.haemorrhage_reach,
            size=size,
        )
        _draw_spots(
            draw,
            rng,
            count=style.exudates,
            radius=style.exudate_radius,
            colour=style.exudate,
            reach=style.exudate_reach,
            size=size,
        )
    image = np.asarray(canvas, dtype=np.float64)
    image += style.noise * rng.standard_normal(image.shape)
    inside = _soft_disc(r, edge=0.05)
    return _to_uint8(image * inside[..., None])
