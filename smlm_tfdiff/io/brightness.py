"""A movie's typical photons per emitter (N0), for a brightness-normalised phi.

A phi trained over a range of brightness cannot tell a close pair from one emitter twice as bright:
both put the same light in the same few pixels. One dye in one movie has one typical N0, and a phi
that reads frames scaled to it (PhiConfig.brightness_reference) counts the light in emitters. N0 is
estimated from the movie: photometry (io.photometry: a fixed-position PSF fit, photons) of isolated
spots, their median; first at the local maxima of the smoothed frames, then at phi's localizations
with phi normalised by the current estimate, until it settles.

Units: frames in photons per pixel ([N, H, W]), positions (x, y) LR px, N0 in photons.
"""

import math

import numpy as np
from scipy import ndimage, spatial

from smlm_tfdiff.io.photometry import photometry

MAX_ITERATIONS = 4
TOLERANCE = 0.02  # Relative change of N0 at which the iterations stop.
ISOLATION_PX = 4.0  # A spot is isolated when no other is nearer (LR px).
EDGE_PX = 2.0  # Spots nearer the frame edge are not measured (their PSF is cut).
MIN_SPOTS = 5  # Fewer isolated spots than this do not make an estimate.
PEAK_SNR = 5.0  # Local maxima of the smoothed frame this many robust sds above its median.


def isolated_intensities(photon_frames, positions, psf_sigma):
    """Photometry of the isolated spots away from the edges: a 1-D array of photons.

    photon_frames: [N, H, W] photons; positions: a list of N [M, 2] (x, y) LR px arrays."""
    out = []
    for frame, xy in zip(photon_frames, positions):
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        if len(xy) == 0:
            continue
        h, w = frame.shape
        keep = ((xy[:, 0] >= EDGE_PX) & (xy[:, 0] <= w - EDGE_PX)
                & (xy[:, 1] >= EDGE_PX) & (xy[:, 1] <= h - EDGE_PX))
        if len(xy) > 1:
            nearest = spatial.cKDTree(xy).query(xy, k=2)[0][:, 1]
            keep &= nearest > ISOLATION_PX
        if not keep.any():
            continue
        intensity = photometry(frame, xy, psf_sigma)["intensity"][keep]
        out.append(intensity[np.isfinite(intensity) & (intensity > 0)])
    return np.concatenate(out) if out else np.zeros(0)


def local_maxima(photon_frames, psf_sigma):
    """Local maxima of each frame smoothed by the PSF, PEAK_SNR robust sds above its median:
    a list of [M, 2] (x, y) LR px (pixel centres)."""
    out = []
    for frame in photon_frames:
        smooth = ndimage.gaussian_filter(np.asarray(frame, np.float64), psf_sigma)
        level = np.median(smooth)
        sd = 1.4826 * np.median(np.abs(smooth - level))
        peaks = (smooth == ndimage.maximum_filter(smooth, size=5)) & (
            smooth > level + PEAK_SNR * max(sd, 1e-9))
        rows, cols = np.nonzero(peaks)
        out.append(np.stack([cols + 0.5, rows + 0.5], axis=1).astype(np.float64))
    return out


def estimate_emitter_photons(photon_frames, localize, psf_sigma, fallback):
    """The movie's typical N0 (photons) from a sample of its frames.

    photon_frames: [N, H, W] photons (a few dozen frames spread over the movie).
    localize: callable(n0) -> a list of N [M, 2] (x, y) LR px, phi's localizations in these
        frames with phi normalised by n0.
    fallback: N0 used where the frames hold fewer than MIN_SPOTS isolated spots.
    Returns (n0, info): info records each step's estimate and spot count, and the source
    ("estimated", or "fallback" with the reason).
    """
    frames = np.asarray(photon_frames, np.float64)
    spots = isolated_intensities(frames, local_maxima(frames, psf_sigma), psf_sigma)
    steps = [{"from": "local maxima", "spots": int(len(spots)),
              "n0": float(np.median(spots)) if len(spots) else None}]
    if len(spots) < MIN_SPOTS:
        n0 = float(fallback)
    else:
        n0 = float(np.median(spots))
    for _ in range(MAX_ITERATIONS):
        spots = isolated_intensities(frames, localize(n0), psf_sigma)
        if len(spots) < MIN_SPOTS:
            steps.append({"from": "phi", "spots": int(len(spots)), "n0": None})
            break
        new = float(np.median(spots))
        steps.append({"from": "phi", "spots": int(len(spots)), "n0": new})
        settled = abs(math.log(new / n0)) < TOLERANCE
        n0 = new
        if settled:
            break
    measured = [s for s in steps if s["n0"] is not None]
    if not measured:
        return float(fallback), {"source": "fallback", "steps": steps,
                                 "reason": f"fewer than {MIN_SPOTS} isolated spots in "
                                           f"{len(frames)} frames"}
    return n0, {"source": "estimated", "steps": steps}
