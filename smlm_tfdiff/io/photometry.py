"""Photometry at known positions: photons, background and background noise per localization.

Around each localization a (2r+1)^2 window of the photon image (x - offset) / gain is fitted with
N * PSF(x, y) + b by linear least squares (the PSF is the pixel-integrated Gaussian of the config,
seeds eq. 2, at the fixed position), jointly for localizations whose windows overlap. bkgstd is the
rms residual of that fit in the window. Units: photons, photons per pixel.
"""

import numpy as np
from scipy import spatial
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from smlm_tfdiff.simulation.physics.psf import pixel_integrals_numpy


def photometry(photon_frame, xy, psf_sigma, radius=3):
    """photon_frame [H, W] photons; xy [M, 2] (x, y) LR pixels; psf_sigma LR pixels.

    Returns dict of [M] arrays: intensity (photons), background (photons / pixel), bkgstd (photons,
    rms fit residual in the window). NaN where the window holds fewer pixels than unknowns.
    """
    image = np.asarray(photon_frame, np.float64)
    xy = np.asarray(xy, np.float64).reshape((-1, 2))
    m = len(xy)
    out = {k: np.full(m, np.nan) for k in ("intensity", "background", "bkgstd")}
    if m == 0:
        return out
    h, w = image.shape
    # Localizations whose windows overlap are fitted together (one background per group).
    link = 2 * radius + 1
    pairs = spatial.cKDTree(xy).query_pairs(link, p=np.inf, output_type="ndarray")
    d = np.abs(xy[pairs[:, 0]] - xy[pairs[:, 1]]).max(1) if len(pairs) else np.zeros(0)
    pairs = pairs[d < link]  # query_pairs includes distance == link.
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(m, m))
    _, labels = connected_components(graph, directed=False)
    for label in np.unique(labels):
        members = np.nonzero(labels == label)[0]
        pts = xy[members]
        cols = np.floor(pts[:, 0]).astype(int)
        rows = np.floor(pts[:, 1]).astype(int)
        r0, r1 = max(rows.min() - radius, 0), min(rows.max() + radius + 1, h)
        c0, c1 = max(cols.min() - radius, 0), min(cols.max() + radius + 1, w)
        if r1 <= r0 or c1 <= c0:
            continue
        yy, xx = np.mgrid[r0:r1, c0:c1]
        mask = np.zeros(yy.shape, bool)
        for r, c in zip(rows, cols):
            mask |= (np.abs(yy - r) <= radius) & (np.abs(xx - c) <= radius)
        # PSF of each localization on the window: dE_x(col) * dE_y(row), window coordinates.
        ex = pixel_integrals_numpy(pts[:, 0] - c0, c1 - c0, psf_sigma)  # [M, w]
        ey = pixel_integrals_numpy(pts[:, 1] - r0, r1 - r0, psf_sigma)  # [M, h]
        design = [ey[k][yy[mask] - r0] * ex[k][xx[mask] - c0] for k in range(len(pts))]
        design.append(np.ones(mask.sum()))
        a = np.stack(design, axis=1)
        data = image[r0:r1, c0:c1][mask]
        if len(data) <= a.shape[1]:
            continue
        coef, *_ = np.linalg.lstsq(a, data, rcond=None)
        resid = data - a @ coef
        rms = np.sqrt(np.sum(resid ** 2) / (len(data) - a.shape[1]))
        for k, i in enumerate(members):
            out["intensity"][i] = coef[k]
            out["background"][i] = coef[-1]
            out["bkgstd"][i] = rms
    return out
