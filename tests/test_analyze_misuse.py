"""`analyze` under damaged input and the usual mistakes: every frame or a clear error, nothing
overwritten by surprise, results that do not depend on memory settings (issue 20)."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from smlm_tfdiff import SimulationConfig
from smlm_tfdiff.simulation.simulate import simulate
from smlm_tfdiff.analyze import Camera, StackAnalyzer
from smlm_tfdiff.io.stacks import (OutputError, OutputSet, StackError, TiffStack,
                                  output_folders)

FRAMES = np.random.default_rng(0).poisson(100, (12, 20, 20)).astype(np.uint16)
WRITERS = {"zlib": dict(compression="zlib"), "imagej_zlib": dict(compression="zlib", imagej=True),
           "imagej": dict(imagej=True), "uncompressed": dict(photometric="minisblack"),
           "ome": dict(ome=True)}


def _truncated(path, kind, frames=FRAMES, fraction=0.5):
    tifffile.imwrite(path, frames, **WRITERS[kind])
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))
    return path


# ------------------------------------------------------------------- every frame, or an error
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_truncated_stack_is_refused_naming_file_and_counts(tmp_path, kind):
    path = _truncated(tmp_path / f"{kind}.tif", kind)
    with pytest.raises(StackError) as info:
        TiffStack(path)
    message = str(info.value)
    assert str(path) in message and "truncated or damaged" in message
    assert "--allow_partial" in message and "mmap" not in message
    if kind != "ome":  # The OME header itself is cut off: the file no longer says its count.
        assert "declares 12 frames" in message


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_allow_partial_reads_the_intact_frames_and_records_the_loss(tmp_path, kind):
    path = _truncated(tmp_path / f"{kind}.tif", kind)
    with TiffStack(path, allow_partial=True) as stack:
        got = np.concatenate([b for _, b in stack.batches(4)])
        loss = stack.loss
    assert 1 <= len(got) < 12
    np.testing.assert_array_equal(got, FRAMES[:len(got)])
    assert loss["frames_readable"] == len(got)
    if kind != "ome":
        assert loss["frames_declared"] == 12 and loss["frames_lost"] == 12 - len(got)


def test_intact_stacks_still_read_whole(tmp_path):
    for kind, kw in WRITERS.items():
        tifffile.imwrite(tmp_path / f"{kind}.tif", FRAMES, **kw)
        with TiffStack(tmp_path / f"{kind}.tif") as stack:
            assert stack.loss is None and stack.notes == []
            np.testing.assert_array_equal(np.concatenate([b for _, b in stack.batches(5)]),
                                          FRAMES)


def test_several_series_are_refused_or_read_all_in_order(tmp_path):
    path = tmp_path / "two.tif"
    with tifffile.TiffWriter(path) as w:
        w.write(FRAMES[:2], photometric="minisblack")
        w.write(FRAMES[2:5], photometric="minisblack")
    with pytest.raises(StackError, match=r"2 image series .*2 frames.*3 frames.*--series all"):
        TiffStack(path)
    with TiffStack(path, series="all") as stack:
        assert stack.num_frames == 5 and "2 series" in stack.notes[0]
        np.testing.assert_array_equal(np.concatenate([b for _, b in stack.batches(2)]),
                                      FRAMES[:5])
    with TiffStack(path, series=1) as stack:
        np.testing.assert_array_equal(stack.read(0, 3), FRAMES[2:5])
    with pytest.raises(StackError, match="--series 2 does not exist"):
        TiffStack(path, series=2)


@pytest.mark.parametrize("frames", [3, 4])
def test_stack_tagged_rgb_is_named_as_a_possibly_mistagged_stack(tmp_path, frames):
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, FRAMES[:frames], photometric="rgb", planarconfig="separate")
    with pytest.raises(StackError) as info:
        TiffStack(path)
    assert f"{frames}-frame grayscale stack that was saved as RGB" in str(info.value)
    assert "photometric='minisblack'" in str(info.value)


# --------------------------------------------------------------------- nothing overwritten
def test_same_stem_inputs_get_distinct_folders(tmp_path):
    paths = [str(tmp_path / "a" / "movie.tif"), str(tmp_path / "b" / "movie.tif"),
             str(tmp_path / "c" / "other.tif"), str(tmp_path / "a" / "movie.tif")]
    got = output_folders(paths)
    assert [n for _, n in got] == ["a_movie", "b_movie", "other"]  # The repeat is kept once.
    same_dir = output_folders([str(tmp_path / "m.tif"), str(tmp_path / "m.tiff")])
    assert len({n for _, n in same_dir}) == 2


def test_output_set_refuses_results_and_replaces_them_whole(tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    (out / "old_maps.tif").write_text("earlier run")
    with pytest.raises(OutputError, match="already holds results.*--overwrite"):
        OutputSet(out)
    with OutputSet(out, overwrite=True) as outputs:
        with open(outputs.path("new.csv"), "w") as f:
            f.write("x")
        outputs.commit()
    assert sorted(os.listdir(out)) == ["new.csv"]  # No mix of the two runs.
    assert sorted(os.listdir(tmp_path)) == ["res"]  # No staging folder left.
    with pytest.raises(OutputError, match="already holds"), OutputSet(out, overwrite=False):
        pass
    # A failed run leaves the earlier results as they were.
    with pytest.raises(RuntimeError), OutputSet(out, overwrite=True) as outputs:
        with open(outputs.path("half.csv"), "w") as f:
            f.write("x")
        raise RuntimeError("boom")
    assert sorted(os.listdir(out)) == ["new.csv"] and sorted(os.listdir(tmp_path)) == ["res"]


def test_unwritable_output_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write to the output folder.*writable --out"):
        OutputSet(tmp_path / "file" / "res")
    with pytest.raises(OutputError, match="is a file"):
        OutputSet(tmp_path / "file")


# --------------------------------------------------------------------------- with the model
def _movie(path, frames=5, seed=3):
    data = simulate(SimulationConfig.preset("paper"), frames, seed=seed)
    tifffile.imwrite(path, np.round(data["frames"][..., 0]).astype(np.uint16),
                     photometric="minisblack")
    return path


def test_results_do_not_depend_on_batch_frames(tmp_path, backend):
    stack = _movie(tmp_path / "m.tif")
    texts = []
    for batch in (2, 8):
        analyzer = StackAnalyzer(backend, Camera(100.0, 1.0), num_samples=3, num_steps=2,
                                 batch_frames=batch, seed=7, progress=False)
        summary = analyzer.analyze(stack, tmp_path / f"b{batch}")
        assert summary["camera_check"]["warnings"] == []  # The right camera: no warning.
        texts.append((tmp_path / f"b{batch}" / "m.csv").read_bytes())
        texts.append(tifffile.imread(tmp_path / f"b{batch}" / "m_posterior_std.tif").tobytes())
    assert texts[0] == texts[2] and texts[1] == texts[3]
    assert len(texts[0].splitlines()) > 1


def test_small_frames_are_analyzed_or_named_clearly(tmp_path, backend, cli):
    analyzer = StackAnalyzer(backend, Camera(100.0, 1.0), num_samples=2, num_steps=1,
                             progress=False, maps=False)
    frames = np.full((2, 10, 12), 102, np.uint16)
    frames[:, 5, 6] = 180
    tifffile.imwrite(tmp_path / "small.tif", frames, photometric="minisblack")
    summary = analyzer.analyze(tmp_path / "small.tif", tmp_path / "o1")
    assert summary["frame_size"] == [10, 12]
    tifffile.imwrite(tmp_path / "tiny.tif", frames[:, :3, :3], photometric="minisblack")
    with pytest.raises(StackError, match=r"frames are 3x3 camera pixels; analyze needs at least "):
        analyzer.analyze(tmp_path / "tiny.tif", tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
    # The command's default, a whole-field model, says so.
    res = _cli(cli, "--input", tmp_path / "tiny.tif", "--out", tmp_path / "o3")
    assert res.returncode == 2 and "whole-field model reads whole frames" in res.stderr, res
    assert not (tmp_path / "o3" / "tiny").exists()


def _cli(cli, *args):
    return cli("analyze", "--offset_adu", "100", "--gain_adu_per_photon", "1", "--noprogress",
               "--num_samples", "2", "--num_steps", "1", "--nomaps", "--nojit_compile", *args)


def test_command_line_damaged_input_and_existing_results(tmp_path, cli):
    # In this process: an uncaught exception (a traceback) would propagate out of cli().
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _movie(tmp_path / "a" / "movie.tif", frames=2)
    data = simulate(SimulationConfig.preset("paper"), 6, seed=4)
    _truncated(tmp_path / "b" / "movie.tif", "imagej",
               np.round(data["frames"][..., 0]).astype(np.uint16))
    out = tmp_path / "out"
    args = ["--out", str(out), "--input", str(tmp_path / "a" / "movie.tif"), "--input",
            str(tmp_path / "b" / "movie.tif")]
    res = _cli(cli, *args)
    assert res.returncode == 2
    assert "truncated or damaged" in res.stderr and "declares 6 frames" in res.stderr
    assert not (out / "b_movie").exists()
    res = _cli(cli, *args, "--allow_partial")
    assert res.returncode == 2 and "already holds results" in res.stderr  # a_movie, from run 1.
    res = _cli(cli, *args, "--allow_partial", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert "warning:" in res.stderr and "readable of 6 declared frames" in res.stderr
    summary = json.loads((out / "b_movie" / "movie_summary.json").read_text())
    assert summary["input_loss"]["frames_declared"] == 6
    assert summary["frames"] == summary["input_loss"]["frames_readable"] < 6
    a = json.loads((out / "a_movie" / "movie_summary.json").read_text())
    assert a["frames"] == 2 and "input_loss" not in a
    assert sorted(os.listdir(out)) == ["a_movie", "b_movie"]
    (tmp_path / "file").write_text("x")
    res = _cli(cli, "--out", tmp_path / "file" / "o", "--input", tmp_path / "a" / "movie.tif")
    assert res.returncode == 2
    assert "cannot write to the output folder" in res.stderr


# ---------------------------------------------------------------------------- camera sanity
def _camera_frames(background=0.0, emitters=10, size=20, gain=1.0, offset=100.0, frames=10):
    config = SimulationConfig.preset("paper", background=background, frame_height=size,
                                     frame_width=size, region="frame", num_emitters=emitters)
    data = simulate(config, frames, seed=1)["frames"][..., 0]
    return np.round((data - config.offset) * gain + offset)


@pytest.mark.parametrize("case", [dict(), dict(gain=2.5, offset=400.0),
                                  dict(background=10.0, size=32, emitters=25),
                                  dict(emitters=3, size=32)])
def test_correct_camera_settings_do_not_warn(case):
    from smlm_tfdiff.analyze import check_camera

    frames = _camera_frames(**case)
    camera = Camera(case.get("offset", 100.0), case.get("gain", 1.0))
    warns, est = check_camera(frames, camera, SimulationConfig.preset("paper"))
    assert warns == [], warns
    assert abs(est["likely_offset_adu"] - camera.offset_adu) < 3 * camera.gain_adu_per_photon


@pytest.mark.parametrize("offset, gain, case, expect", [
    (150.0, 1.0, dict(), r"--offset_adu 150 .*likely offset is about (99|100|101) ADU"),
    (150.0, 1.0, dict(background=10.0, size=32, emitters=25), r"--offset_adu 150 .*likely offset"
     r" is about (9[89]|10[0-2]) ADU"),
    (115.0, 1.0, dict(emitters=3, size=32), r"--offset_adu 115 .*likely offset is about "
     r"(99|100|101) ADU"),
    (100.0, 100.0, dict(), r"does not fit --gain_adu_per_photon 100 .*likely gain is about "
     r"(0\.[89]\d*|1(\.[0-2]\d*)?) ADU/photon"),
    (100.0, 100.0, dict(emitters=3, size=32),
     r"likely gain is about (0\.[89]\d*|1(\.[0-2]\d*)?) "),
    (85.0, 1.0, dict(background=10.0, size=32, emitters=25), r"background is about 2\d\.\d "
     r"photons.*offset is about (9[89]|10[0-2]) ADU"),
])
def test_wrong_camera_settings_warn_with_the_likely_value(offset, gain, case, expect):
    from smlm_tfdiff.analyze import check_camera

    warns, _ = check_camera(_camera_frames(**case), Camera(offset, gain),
                            SimulationConfig.preset("paper"))
    assert any(__import__("re").search(expect, w) for w in warns), warns


def test_background_is_checked_against_the_models_training_range():
    """A model trained over a range of backgrounds (wholefield: 0-30 photons per pixel) takes
    any background in it; one far above it is named with the range."""
    from smlm_tfdiff.analyze import check_camera

    model = SimulationConfig.preset("wholefield")
    assert model.background_range == (0.0, 30.0)
    warns, est = check_camera(_camera_frames(background=25.0, size=32, emitters=10),
                              Camera(100.0, 1.0), model)
    assert warns == [] and 22 < est["background_photons"] < 28, (warns, est)
    warns, _ = check_camera(_camera_frames(background=60.0, size=32, emitters=10),
                            Camera(100.0, 1.0), model)
    assert any("background is about" in w and "training range (0-30)" in w for w in warns), warns


# ----------------------------------------------------------------------------- Picasso files
def _picasso_load_locs(hdf5_path):
    """What Picasso 0.11's io.load_locs keeps: the YAML read with yaml.load_all, then
    lib.ensure_sanity (rows with NaN/Inf, negative x, y, lpx, lpy, photons, sx, sy, or x >= Width,
    y >= Height dropped)."""
    import h5py
    import yaml

    with h5py.File(hdf5_path, "r") as f:
        locs = f["locs"][...]
    with open(os.path.splitext(hdf5_path)[0] + ".yaml") as f:
        info = list(yaml.load_all(f, Loader=yaml.UnsafeLoader))
    keep = np.ones(len(locs), bool)
    for name in locs.dtype.names:
        keep &= np.isfinite(locs[name].astype(np.float64))
    keep &= (locs["x"] < info[0]["Width"]) & (locs["y"] < info[0]["Height"])
    for name in ("x", "y", "lpx", "lpy", "photons", "sx", "sy"):
        keep &= locs[name] >= 0
    return locs, locs[keep], info


def test_picasso_files_are_read_whole_with_any_file_name(tmp_path, backend):
    name = "[run 1] #2 scan: x"
    data = simulate(SimulationConfig.preset("paper", frame_height=24, frame_width=24,
                                           region="frame", num_emitters=14), 3, seed=8)
    tifffile.imwrite(tmp_path / f"{name}.tif", np.round(data["frames"][..., 0]).astype(np.uint16),
                     photometric="minisblack")
    analyzer = StackAnalyzer(backend, Camera(100.0, 1.0, readout_noise_adu=2.24), num_samples=2,
                             num_steps=1, picasso=True, maps=False, progress=False, seed=1)
    summary = analyzer.analyze(tmp_path / f"{name}.tif", tmp_path / "out")
    locs, kept, info = _picasso_load_locs(str(tmp_path / "out" / f"{name}_locs.hdf5"))
    assert len(locs) == summary["localizations"] > 0
    assert len(kept) == len(locs)  # Picasso keeps every localization.
    assert len(info) == 1 and info[0]["Source"] == f"{name}.tif"
    assert (info[0]["Frames"], info[0]["Width"], info[0]["Height"]) == (3, 24, 24)
    assert info[0]["Data Type"] == "uint16" and info[0]["Baseline"] == 100.0
    assert info[0]["Camera"]["readout_noise_adu"] == 2.24
    assert info[0]["Analysis"]["num_samples"] == 2 and 1 in info[0]["Flags"]
    import csv

    with open(tmp_path / "out" / f"{name}.csv") as f:
        rows = list(csv.DictReader(f))
    no_post = np.array([not np.isfinite(float(r["uncertainty_x [nm]"])) for r in rows])
    # With 2 samples some localizations are in no sample: CRLB-filled and flagged.
    assert no_post.any()
    assert np.all((locs["flags"][no_post] & 3) > 0) and np.all((locs["flags"][~no_post] & 3) == 0)
    crlb = np.array([float(r["crlb_xy [nm]"]) for r in rows]) / summary["pixel_size_nm"]
    filled = no_post & np.isfinite(crlb)
    np.testing.assert_allclose(locs["lpx"][filled], crlb[filled], rtol=1e-5)


# ------------------------------------------------------------------------------- kill, resume
class _Killed(KeyboardInterrupt):
    pass


def test_interrupted_run_resumes_to_byte_identical_results(tmp_path, backend):
    stack = _movie(tmp_path / "m.tif", frames=6)

    def analyzer():
        a = StackAnalyzer(backend, Camera(100.0, 1.0), num_samples=2, num_steps=1,
                          batch_frames=2, seed=5, picasso=True, progress=False)
        a.checkpoint_seconds = 0.0  # A checkpoint after every batch.
        return a

    analyzer().analyze(stack, tmp_path / "whole")
    killed = analyzer()
    real = killed.backend.posterior
    calls = []

    def dying(*args):  # Killed in the third batch, after two checkpoints.
        calls.append(1)
        if len(calls) == 5:
            raise _Killed()
        return real(*args)

    killed.backend = copy.copy(backend)
    killed.backend.posterior = dying
    with pytest.raises(KeyboardInterrupt):
        killed.analyze(stack, tmp_path / "res")
    staging = tmp_path / ".res.partial"
    assert not (tmp_path / "res").exists() and staging.is_dir()
    # A kill -9 can also leave half-written rows behind the checkpoint.
    with open(staging / "m.csv", "a") as f:
        f.write("99,3,1.0,2.")
    with open(staging / "m_posterior_std.tif.raw", "ab") as f:
        f.write(b"\0" * 1000)
    with pytest.warns(UserWarning, match="resuming an interrupted run from frame 5 of 6"):
        summary = analyzer().analyze(stack, tmp_path / "res")
    assert summary["resumed_from_frame"] == 5 and not staging.exists()
    for name in ("m.csv", "m_kde_estimate.tif", "m_posterior_mean.tif", "m_posterior_std.tif",
                 "m_locs.hdf5", "m_locs.yaml", "m_super_resolution.png", "m_uncertainty.png"):
        assert (tmp_path / "res" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), \
            name
    assert sorted(os.listdir(tmp_path / "res")) == sorted(os.listdir(tmp_path / "whole"))
    # Other settings: the interrupted run's files are removed, with a message.
    with pytest.raises(KeyboardInterrupt):
        killed = analyzer()
        calls.clear()
        killed.backend = copy.copy(backend)
        killed.backend.posterior = dying
        killed.analyze(stack, tmp_path / "res2")
    other = analyzer()
    other.seed = 6
    with pytest.warns(UserWarning, match="removed the files of an interrupted run"):
        other.analyze(stack, tmp_path / "res2")


@pytest.mark.slow
def test_command_line_killed_runs_resume(tmp_path, cli):
    """A run stopped by SIGTERM (in this process: analyze's handler turns it into Ctrl-C), then
    one killed by SIGKILL (a process of its own: the process boundary is what is tested there),
    then the resume to the end and the uninterrupted reference run."""
    import signal
    import threading
    import time

    _movie(tmp_path / "movie.tif", frames=8)
    base = [sys.executable, "-m", "smlm_tfdiff.analyze", "--offset_adu", "100",
            "--gain_adu_per_photon", "1", "--noprogress", "--num_samples", "2", "--num_steps", "1",
            "--batch_frames", "1", "--checkpoint_seconds", "0", "--picasso", "--nojit_compile",
            "--input", str(tmp_path / "movie.tif")]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    state = tmp_path / "out" / ".movie.partial" / "checkpoint.json"

    def frames_done():
        try:
            return json.loads(state.read_text())["frames_done"]
        except (OSError, ValueError):
            return 0

    def whole(out):
        return cli("analyze", *base[3:], "--out", out)

    # SIGTERM once 2 frames are done. The test's own handler is in place before and after the
    # run (run_cli restores it), so a signal that came late would be caught here, not kill pytest.
    late = []
    previous = signal.signal(signal.SIGTERM, lambda *a: late.append(a))
    stop = threading.Event()

    def send_sigterm():
        while not stop.wait(0.05):
            if frames_done() >= 2:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    watcher = threading.Thread(target=send_sigterm)
    watcher.start()
    try:
        res = whole(tmp_path / "out")
    finally:
        stop.set()
        watcher.join()
        signal.signal(signal.SIGTERM, previous)
    assert not late, "the run ended before it could be stopped"
    assert res.returncode == 130 and "run the same command again to resume" in res.stderr, res
    stopped_at = frames_done()
    assert 2 <= stopped_at < 8

    proc = subprocess.Popen(base + ["--out", str(tmp_path / "out")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and frames_done() < stopped_at + 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)  # Resumes, then dies without a word.
    assert proc.wait(60) == -signal.SIGKILL and "resuming an interrupted run" in proc.stderr.read()
    done = frames_done()
    res = whole(tmp_path / "out")
    assert res.returncode == 0 and f"resuming an interrupted run from frame {done + 1}" in res.stderr
    assert whole(tmp_path / "whole").returncode == 0
    for name in ("movie.csv", "movie_posterior_std.tif", "movie_locs.hdf5", "movie_locs.yaml",
                 "movie_super_resolution.png"):
        assert ((tmp_path / "out" / "movie" / name).read_bytes()
                == (tmp_path / "whole" / "movie" / name).read_bytes()), name
    assert sorted(os.listdir(tmp_path / "out")) == ["movie"]


def test_command_accepts_the_analyze_subcommand_and_help_lists_its_flags(entry_point_run):
    """`smlm-tfdiff analyze --help` (the console script's entry point, app.run included) lists
    the command's flags without --helpfull; a misspelt subcommand is named."""
    from smlm_tfdiff.analyze import run

    code, out, err = entry_point_run(run, ["smlm-tfdiff", "analyze", "--help"])
    assert code in (0, 1), err[-2000:]  # absl's --help exits with 1.
    assert "Traceback" not in err
    for flag in ("--input", "--offset_adu", "--model", "--num_samples", "--num_steps", "--seed",
                 "--method", "--restart_t", "--[no]allow_partial", "--[no]jit_compile"):
        assert flag in out, flag
    code, out, err = entry_point_run(run, ["smlm-tfdiff", "analyse", "--input", "x.tif"])
    assert code != 0 and "the only subcommand is `analyze`" in err
