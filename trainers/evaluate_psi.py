"""Evaluate psi on fixed, seeded held-out paper-preset frames: is the posterior mean at least as
accurate as phi's y_hat, and how does the seeds' recipe compare with the guided one?

    python trainers/evaluate_psi.py --model paper --out_dir runs/eval_psi

--model is a bundled name or a psi run folder. Writes metrics.json (atomically) and
posterior.png (frame, y_hat, truth, posterior samples, mean and std: the seeds' Figures 3-4).
  accuracy:  KDE MSE against the true KDE and localization metrics of detect() on y_hat, on the
             posterior mean of the default recipe, and on the mean of the same samples projected
             onto KDEs of the emitters detected in them, over --num_frames frames.
  recipes:   on the first --recipe_frames frames, the seeds' recipe (100 ancestral steps from
             N(0, I), 100 samples) and the guided recipes: KDE MSE of their means and std-map
             agreement (Pearson r, ratio of means) with the seeds' recipe and the full guided chain.
"""

import json
import os

from absl import app, flags, logging
from smlm_tfdiff import flags as shared_flags
import numpy as np

shared_flags.define_model_flag()
shared_flags.define_sampling_flags(num_samples=32)
flags.DEFINE_string("out_dir", None, "Where metrics.json and the figure go.")
flags.DEFINE_integer("num_frames", 100, "Held-out frames for the accuracy comparison.")
flags.DEFINE_integer("recipe_frames", 2, "Frames for the recipe comparison (the seeds' recipe "
                     "costs 10,000 network evaluations per frame).")
flags.DEFINE_integer("recipe_samples", 100, "Samples per frame in the recipe comparison.")
flags.DEFINE_integer("seed", 20_000, "Seed of the held-out set (never used for training).")
flags.DEFINE_float("tolerance_hr", 5.0, "Matching radius in HR pixels (the seeds: 5).")
flags.mark_flag_as_required("out_dir")
FLAGS = flags.FLAGS

def figure(data, post, path, num=2, num_samples=3):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = ["frame", "y_hat (phi)", "truth"] + [f"sample {i + 1}" for i in range(num_samples)] \
        + ["posterior mean", "posterior std"]
    fig, axes = plt.subplots(num, len(cols), figsize=(2.2 * len(cols), 2.3 * num), squeeze=False)
    for r in range(num):
        top = float(data["kde"][r].max())
        images = [data["frames"][r], post["y_hat"][r], data["kde"][r]] \
            + [post["samples"][r, i] for i in range(num_samples)] + [post["mean"][r]]
        for c, image in enumerate(images):
            axes[r, c].imshow(image[..., 0], cmap="gray" if c == 0 else "magma",
                              vmin=None if c == 0 else 0, vmax=None if c == 0 else top)
        im = axes[r, -1].imshow(post["std"][r, ..., 0], cmap="viridis")
        fig.colorbar(im, ax=axes[r, -1], fraction=0.046)
        for c, title in enumerate(cols):
            axes[0, c].set_title(title, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    plt.close(fig)


def main(argv):
    del argv
    from smlm_tfdiff.pretrained import load_phi_source
    from smlm_tfdiff.diffusion.sampler import PosteriorSampler, default_recipe
    from smlm_tfdiff.simulation.simulate import simulate
    from smlm_tfdiff.diffusion.projection import project_samples
    from smlm_tfdiff.uncertainty import evaluation as ev

    models = load_phi_source(FLAGS.model)
    if models.psi is None:
        raise app.UsageError(f"--model {FLAGS.model!r} has no psi; train one with "
                             "trainers/train_psi.py")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    config = models.scene_config("paper")
    data = simulate(config, FLAGS.num_frames, FLAGS.seed)
    sampler = PosteriorSampler(models, jit_compile=FLAGS.jit_compile)
    recipe = dict(num_steps=FLAGS.num_steps or default_recipe(models)[1], method=FLAGS.method,
                  start="guided")
    post = sampler(data["frames"], FLAGS.num_samples, seed=0, return_samples=True, **recipe)
    truth = ev.truth_positions(data["positions"], data["mask"])
    acc = {}
    # The same samples projected onto KDEs of the emitters detected in them (projection.py).
    projected_mean = project_samples(post["samples"], config)["samples"].mean(axis=1)
    for name, kde in (("y_hat", post["y_hat"]), ("posterior_mean", post["mean"]),
                      ("projected_posterior_mean", projected_mean)):
        acc[name] = a = ev.kde_accuracy(kde, data["kde"], truth, config, FLAGS.tolerance_hr)
        logging.info("%s: KDE MSE %.3e, P=%.4f R=%.4f JAC=%.4f RMSE=%.2f nm", name,
                     a["kde_mse"], a["precision"], a["recall"], a["jaccard"],
                     a["rmse_lateral_nm"])
    metrics = {"model": FLAGS.model, "num_frames": FLAGS.num_frames, "seed": FLAGS.seed,
               "num_samples": FLAGS.num_samples, "t_start": models.t_start, **recipe,
               "weighting": models.weighting, "accuracy": acc,
               "posterior_std_mean": float(post["std"].mean())}
    figure(data, post, os.path.join(FLAGS.out_dir, "posterior.png"))

    n = FLAGS.recipe_frames
    if n > 0:
        frames = data["frames"][:n]
        recipes = {"seeds_noise_ddpm100": dict(start="noise", method="ddpm", num_steps=100),
                   "guided_full_ddpm": dict(start="guided", method="ddpm",
                                            num_steps=models.t_start),
                   "default": recipe}
        out = {name: sampler(frames, FLAGS.recipe_samples, seed=1, **kw)
               for name, kw in recipes.items()}
        rows = ev.recipe_agreement(out, data["kde"][:n],
                                   {"vs_seeds": "seeds_noise_ddpm100",
                                    "vs_guided_full": "guided_full_ddpm"})
        for name, row in rows.items():
            logging.info("%s: %s", name, row)
        metrics["recipes"] = {"num_frames": n, "num_samples": FLAGS.recipe_samples,
                              "kde_mse_y_hat":
                              float(np.mean((out["default"]["y_hat"] - data["kde"][:n]) ** 2)),
                              **rows}
    path = os.path.join(FLAGS.out_dir, "metrics.json")
    with open(path + ".tmp", "w") as f:
        json.dump(metrics, f, indent=2, default=float)
    os.replace(path + ".tmp", path)
    print(json.dumps(metrics, indent=1, default=float))


if __name__ == "__main__":
    app.run(main)
