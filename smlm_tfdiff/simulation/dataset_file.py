"""A finite simulated dataset on disk: one .npz (arrays + config JSON), frames also as a TIFF stack.

Writes go to a temporary name in the same folder and are renamed on success, so a failed or
interrupted write never leaves a half-written file under the final name.
"""

import os
import tempfile

import numpy as np
import tifffile

from smlm_tfdiff.simulation.config import SimulationConfig, typical_photons, typical_spread
from smlm_tfdiff.simulation.simulate import ELEMENT_KEYS


def _atomic_write(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_dataset(path, data, config, write_tiff=True):
    """Write `data` (the dict simulate() returns) to `path` (.npz) and frames to `path`.tif.

    Returns the list of files written.
    """
    if not str(path).endswith(".npz"):
        raise ValueError(f"dataset path must end in .npz (got {path!r})")
    missing = [k for k in ELEMENT_KEYS if k not in data]
    if missing:
        raise ValueError(f"data is missing keys {missing}; expected {list(ELEMENT_KEYS)}")
    arrays = {k: np.asarray(data[k]) for k in ELEMENT_KEYS}
    n = arrays["frames"].shape[0]
    arrays["frame_background"] = np.asarray(data.get("frame_background", np.zeros(n, np.float32)))
    arrays["frame_photons"] = np.asarray(data.get(
        "frame_photons", np.full(n, typical_photons(config), np.float32)))
    arrays["frame_spread"] = np.asarray(data.get(
        "frame_spread", np.full(n, typical_spread(config), np.float32)))
    bad = [k for k, v in arrays.items() if v.shape[0] != n]
    if bad:
        raise ValueError(f"arrays {bad} do not have {n} frames like 'frames'")

    def write_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, config_json=np.array(config.to_json()), **arrays)

    _atomic_write(path, write_npz)
    written = [str(path)]
    if write_tiff:
        tif = str(path)[:-4] + ".tif"
        _atomic_write(tif, lambda tmp: tifffile.imwrite(
            tmp, arrays["frames"][..., 0].astype(np.float32), photometric="minisblack",
            metadata={"axes": "TYX"}))
        written.append(tif)
    return written


def load_dataset(path):
    """Read a dataset written by save_dataset -> (dict of arrays, SimulationConfig)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no dataset at {path!r}; write one with save_dataset()")
    with np.load(path, allow_pickle=False) as f:
        if "config_json" not in f:
            raise ValueError(f"{path!r} is not an smlm_tfdiff dataset (no config_json entry)")
        config = SimulationConfig.from_json(str(f["config_json"]))
        data = {k: f[k] for k in ELEMENT_KEYS}
        # Files written before per-frame backgrounds existed: none.
        data["frame_background"] = (f["frame_background"] if "frame_background" in f
                                    else np.zeros(len(data["frames"]), np.float32))
        # Files written before per-frame N0 existed: the scene's typical N0.
        data["frame_photons"] = (f["frame_photons"] if "frame_photons" in f
                                 else np.full(len(data["frames"]), typical_photons(config),
                                              np.float32))
        # Files written before per-frame spreads existed: the scene's typical spread.
        data["frame_spread"] = (f["frame_spread"] if "frame_spread" in f
                                else np.full(len(data["frames"]), typical_spread(config),
                                             np.float32))
    return data, config
