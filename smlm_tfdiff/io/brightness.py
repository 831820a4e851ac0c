"""A movie's typical photons per emitter (N0), for a brightness-normalised phi.

A phi trained over a range of brightness cannot tell a close pair from one emitter twice as bright:
both put the same light in the same few pixels. One dye in one movie has one typical N0, and a phi
that reads frames scaled to it (PhiConfig.brightness_reference) counts the light in emitters. N0 is
estimated from the movie: photometry (io.photometry: a fixed-position PSF fit, photons) of isolated
spots, their median; first at the local maxima of the smoothed frames, then at phi's localizations
with phi normalised by the current estimate, until it settles.

For a phi also told the spread of the emitters' photons about N0 (PhiConfig.spread_input), the
spread is measured on the same isolated spots: the robust variance of log(photons) less the
photometry's own variance of it (estimate_spread).

Units: frames in photons per pixel ([N, H, W]), positions (x, y) LR px, N0 in photons, spreads
as log-sds.
"""

import math

import numpy as np
from scipy import ndimage, spatial

from smlm_tfdiff.io.photometry import photometry
from smlm_tfdiff.simulation.physics.psf import pixel_integrals_numpy

MAX_ITERATIONS = 4
TOLERANCE = 0.02  # Relative change of N0 at which the iterations stop.
ISOLATION_PX = 4.0  # A spot is isolated when no other is nearer (LR px).
EDGE_PX = 2.0  # Spots nearer the frame edge are not measured (their PSF is cut).
MIN_SPOTS = 5  # Fewer isolated spots than this do not make an estimate.
PEAK_SNR = 5.0  # Local maxima of the smoothed frame this many robust sds above its median.


def isolated_intensities(photon_frames, positions, psf_sigma, with_spots=False):
    """Photometry of the isolated spots away from the edges: a 1-D array of photons (with
    with_spots, also a dict of their "xy" [S, 2] and fitted "background" [S] photons per pixel).

    photon_frames: [N, H, W] photons; positions: a list of N [M, 2] (x, y) LR px arrays."""
    out, where, backgrounds = [], [], []
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
        fit = photometry(frame, xy, psf_sigma)
        intensity = fit["intensity"][keep]
        good = np.isfinite(intensity) & (intensity > 0)
        out.append(intensity[good])
        where.append(xy[keep][good])
        backgrounds.append(fit["background"][keep][good])
    intensities = np.concatenate(out) if out else np.zeros(0)
    if not with_spots:
        return intensities
    return intensities, {"xy": np.concatenate(where) if where else np.zeros((0, 2)),
                         "background": np.concatenate(backgrounds) if backgrounds
                         else np.zeros(0)}


def photometry_variance(xy, intensity, background, psf_sigma, readout_var=0.0, radius=3):
    """[S] variance (photons^2) of io.photometry's intensity of isolated spots: the least-squares
    fit of N PSF + b on the (2 radius + 1)^2 window, var = ((A^T A)^-1 A^T V A (A^T A)^-1)[0, 0]
    with V the pixels' variance N PSF + b + readout_var (Poisson and readout noise, photons^2),
    at each spot's own sub-pixel position (xy [S, 2] LR px; intensity, background [S]). The
    whole window is assumed: a spot within radius of a frame edge, whose window photometry clips,
    has a somewhat larger variance than this."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    side = 2 * radius + 1
    out = np.full(len(xy), np.nan)
    for i, (x, y) in enumerate(xy):
        # The window's pixels, as photometry cuts them (the spot's pixel +- radius).
        cx, cy = np.floor(x) - radius, np.floor(y) - radius
        ex = pixel_integrals_numpy(np.array([x - cx]), side, psf_sigma)[0]
        ey = pixel_integrals_numpy(np.array([y - cy]), side, psf_sigma)[0]
        psf = np.outer(ey, ex).ravel()
        a = np.stack([psf, np.ones_like(psf)], axis=1)
        v = np.maximum(intensity[i] * psf + background[i], 0.0) + readout_var
        inv = np.linalg.inv(a.T @ a)
        out[i] = (inv @ (a.T * v) @ a @ inv)[0, 0]
    return out


def estimate_spread(intensities, variances):
    """The log-sd of the emitters' photons about their typical value, from the photometry of
    isolated spots (intensities [S] photons) and its own variance there (variances [S],
    photometry_variance): sqrt(max(robust var(log N) - mean(var / N^2), 0)), the robust variance
    (1.4826 MAD)^2 so that a few merged pairs or cut spots do not set it. NaN for fewer than
    MIN_SPOTS spots."""
    n = np.asarray(intensities, np.float64)
    var = np.asarray(variances, np.float64)
    ok = np.isfinite(n) & (n > 0) & np.isfinite(var)
    if ok.sum() < MIN_SPOTS:
        return float("nan")
    log_n = np.log(n[ok])
    robust = (1.4826 * np.median(np.abs(log_n - np.median(log_n)))) ** 2
    noise = float(np.mean(var[ok] / n[ok] ** 2))
    return float(np.sqrt(max(robust - noise, 0.0)))


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
    # Measured: N0 is a median of at least MIN_SPOTS spots (the first step records its median
    # whatever the count; fewer spots leave the fallback).
    measured = len(spots) >= MIN_SPOTS
    n0 = float(np.median(spots)) if measured else float(fallback)
    for _ in range(MAX_ITERATIONS):
        spots = isolated_intensities(frames, localize(n0), psf_sigma)
        if len(spots) < MIN_SPOTS:
            steps.append({"from": "phi", "spots": int(len(spots)), "n0": None})
            break
        new = float(np.median(spots))
        steps.append({"from": "phi", "spots": int(len(spots)), "n0": new})
        settled = abs(math.log(new / n0)) < TOLERANCE
        n0, measured = new, True
        if settled:
            break
    if not measured:
        return float(fallback), {"source": "fallback", "steps": steps,
                                 "reason": f"fewer than {MIN_SPOTS} isolated spots in "
                                           f"{len(frames)} frames"}
    return n0, {"source": "estimated", "steps": steps}


def estimate_emitter_spread(photon_frames, positions, psf_sigma, readout_var=0.0):
    """(spread, spots): the log-sd of the emitters' photons about their typical value
    (estimate_spread) from the isolated spots at positions (a list of N [M, 2] (x, y) LR px, phi's
    localizations) in photon_frames [N, H, W] photons; readout_var: photons^2 per pixel. spread is
    NaN for fewer than MIN_SPOTS isolated spots."""
    frames = np.asarray(photon_frames, np.float64)
    intensities, spots = isolated_intensities(frames, positions, psf_sigma, with_spots=True)
    variances = photometry_variance(spots["xy"], intensities, spots["background"], psf_sigma,
                                    readout_var)
    return estimate_spread(intensities, variances), int(len(intensities))

