"""MultiWorkerMirroredStrategy: two local worker processes (one CPU replica each) talking over gRPC.

Each worker gets its own TF_CONFIG; both train into the same --out_dir (a shared filesystem).
"""

import glob
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--context_filters=4", "--dilations=1", "--upsample_filters=4,4", "--prediction_filters=4"]


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _run_workers(cmd, log_dir, tag, timeout=150):
    """Runs cmd as worker 0 and worker 1 of a fresh 2-worker cluster; returns both logs."""
    workers = [f"localhost:{p}" for p in _free_ports(2)]
    procs, logs = [], []
    for index in range(2):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": ROOT,
               "TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                        "task": {"type": "worker", "index": index}})}
        logs.append(os.path.join(log_dir, f"{tag}_worker{index}.log"))
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = [open(path).read() for path in logs]
    for index, proc in enumerate(procs):
        assert proc.returncode == 0, f"worker {index} exited {proc.returncode}:\n{text[index][-3000:]}"
    return text


def _train(out_dir, steps, log_dir):
    cmd = [sys.executable, os.path.join(ROOT, "trainers", "train_phi.py"), f"--out_dir={out_dir}",
           f"--steps={steps}", "--batch_size=8", "--log_every=2", "--eval_every=4",
           "--checkpoint_every=2", "--val_frames=8", "--warmup_steps=2", "--noprogress", *TINY]
    return _run_workers(cmd, log_dir, f"steps{steps}")


def _steps(folder, tag):
    acc = EventAccumulator(folder, size_guidance={"tensors": 0})
    acc.Reload()
    return [e.step for e in acc.Tensors(tag)] if tag in acc.Tags()["tensors"] else []


def _leftovers(out_dir):
    return [p for p in os.listdir(out_dir) if p.startswith(".")]


@pytest.mark.slow
def test_two_workers_train_checkpoint_and_resume(tmp_path):
    out = str(tmp_path / "run")
    chief, other = _train(out, 4, str(tmp_path))
    assert "MultiWorkerMirroredStrategy with cluster_spec" in chief
    assert "Training phi on 2 replica(s)" in chief and "Training phi on 2 replica(s)" in other
    assert os.path.exists(os.path.join(out, "checkpoints", "ckpt-4.index"))
    assert _steps(os.path.join(out, "train"), "loss") == [2, 4]
    assert _steps(os.path.join(out, "val"), "loss") == [4]  # Only the chief evaluates.
    for name in ("phi.weights.h5", "phi_config.json", "run_config.json"):
        assert os.path.exists(os.path.join(out, name))
    # The chief alone wrote TensorBoard events; the other worker's scratch folder is gone.
    events = glob.glob(os.path.join(out, "**", "events.out.tfevents.*"), recursive=True)
    assert sorted(os.path.basename(os.path.dirname(e)) for e in events) == ["train", "val"]
    assert _leftovers(out) == []
    assert "Wrote " + os.path.join(out, ".worker_1_tmp", "phi.weights.h5") in other

    # A resumed 2-worker run: both workers restore the chief's step-4 checkpoint and go on.
    chief, other = _train(out, 8, str(tmp_path))
    for log in (chief, other):
        assert "Resumed from " + os.path.join(out, "checkpoints", "ckpt-4") + " at step 4" in log
    assert _steps(os.path.join(out, "train"), "loss") == [2, 4, 6, 8]
    assert os.path.exists(os.path.join(out, "checkpoints", "ckpt-8.index"))
    assert len(glob.glob(os.path.join(out, "train", "events.out.tfevents.*"))) == 2
    assert _leftovers(out) == []


PROBE = textwrap.dedent("""
    import json, sys
    from smlm_tfdiff.models.training import Trainer, TrainerConfig, make_strategy, worker_info
    strategy = make_strategy()  # TF_CONFIG names 2 workers: MultiWorkerMirroredStrategy.
    import numpy as np, tensorflow as tf
    import smlm_tfdiff as st
    from smlm_tfdiff.models.phi import PhiConfig, build_phi
    from smlm_tfdiff.models.phi_training import phi_dataset, phi_loss
    sim = st.SimulationConfig.preset("paper")
    small = PhiConfig(context_filters=4, dilations=(1,), upsample_filters=(4, 4),
                      prediction_filters=4)
    cfg = TrainerConfig(out_dir=sys.argv[1], steps=1, batch_size=8, schedule="constant",
                        progress=False)
    trainer = Trainer(cfg, strategy, lambda: build_phi(sim, small), phi_loss,
                      lambda start: phi_dataset(sim, 8, 0, start))
    # The mean loss of the first global batch under the initial (chief-broadcast) weights, worker
    # k holding frames 4k..4k+3 (halves apart: batch normalisation uses per-replica statistics).
    batch = next(iter(phi_dataset(sim, 8, 0, 0)))
    halves = [{key: value[k:k + 4] for key, value in batch.items()} for k in (0, 4)]
    ref = float(sum(tf.reduce_sum(phi_loss(trainer.model, h, True)) for h in halves) / 8)
    loss = trainer.fit()["losses"][0]
    print("PROBE", json.dumps({"task": worker_info(strategy)[1], "loss": loss, "ref": ref}))
""")


@pytest.mark.slow
def test_two_workers_shard_the_global_batch_and_average_over_it(tmp_path):
    """Each worker trains on its own half of the global batch that a single process draws with the
    same seed, and the step's loss is the mean over the whole global batch."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    logs = _run_workers([sys.executable, str(script), str(tmp_path / "run")], str(tmp_path), "probe")
    results = [json.loads(log.split("PROBE ")[1].splitlines()[0]) for log in logs]
    assert [r["task"] for r in results] == [0, 1]
    for r in results:
        assert abs(r["loss"] - r["ref"]) <= 1e-5 * r["ref"], r
    assert _leftovers(str(tmp_path / "run")) == []
    assert tf.io.gfile.exists(os.path.join(str(tmp_path / "run"), "checkpoints", "ckpt-1.index"))
