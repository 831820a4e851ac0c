# The two commands of the README: `make demo` (the main job) and `make test`. Both set up .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean reproduce reproduce-paper reproduce-wholefield \
	reproduce-wholefield-fast

$(STAMP): setup.py setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m smlm_tfdiff.demo --out demo_output

test: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q -n 2 --dist loadfile tests

# Retrain phi and psi from scratch with the commands in smlm_tfdiff/weights/paper/MODEL.md (psi on
# the retrained phi), evaluate both, fit the calibration scale of psi's spread
# (docs/calibration.md) and redo the demo report with them. Hours on a 2-core CPU
# (MODEL.md: phi 56 min, psi 54 min and 51 min of fine-tuning on a mix with isolated emitters,
# then the evaluations); PHI_STEPS / PSI_STEPS / PSI_MIX_STEPS shorten a trial.
REPRO ?= runs/reproduce
PHI_STEPS ?= 4000
PSI_STEPS ?= 4000
PSI_MIX_STEPS ?= 3000
# `make reproduce` retrains every bundled model the commands use: the paper pair
# (reproduce-paper), then the whole-field pairs (reproduce-wholefield, then
# reproduce-wholefield-fast, analyze's default, which starts from the former's phi). Each target
# runs alone too. About 12 hours on a 2-core CPU.
reproduce: reproduce-paper reproduce-wholefield-fast
reproduce-paper: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) trainers/train_phi.py --out_dir $(REPRO)/phi_paper --preset paper \
		--steps $(PHI_STEPS) --batch_size 64 --learning_rate 2e-3 --eval_every 500 \
		--checkpoint_every 250 --val_frames 256 --noprogress
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) trainers/train_psi.py --out_dir $(REPRO)/psi_paper \
		--phi $(REPRO)/phi_paper --steps $(PSI_STEPS) --batch_size 32 --learning_rate 1e-3 \
		--ema_decay 0.998 --jit_compile --eval_every 500 --checkpoint_every 250 --val_frames 128 \
		--noprogress --log_every 50
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) trainers/train_psi.py --out_dir $(REPRO)/psi_paper_mix \
		--phi $(REPRO)/phi_paper --init_psi $(REPRO)/psi_paper --mix_preset isolated \
		--mix_fraction 0.25 --steps $(PSI_MIX_STEPS) --batch_size 32 --learning_rate 5e-4 \
		--ema_decay 0.998 --jit_compile --eval_every 1000 --checkpoint_every 250 --val_frames 128 \
		--noprogress --log_every 50
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) trainers/evaluate_phi.py --model $(REPRO)/phi_paper \
		--out_dir $(REPRO)/eval_phi
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) trainers/evaluate_psi.py --model $(REPRO)/psi_paper_mix \
		--out_dir $(REPRO)/eval_psi
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/calibration_density_scale.py \
		--model $(REPRO)/psi_paper_mix --scale_out $(REPRO)/psi_paper_mix --nocheck
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/calibration_pixel_scale.py \
		--model $(REPRO)/psi_paper_mix --scale_out $(REPRO)/psi_paper_mix --nocheck \
		--out $(REPRO)/calibration_pixel_scale.json
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m smlm_tfdiff.demo --model $(REPRO)/psi_paper_mix \
		--out $(REPRO)/demo_output

# Retrain the bundled `wholefield` pair with the commands in smlm_tfdiff/weights/wholefield/MODEL.md:
# phi with the seeds' linear input (5500 steps), psi fine-tuned from the bundled `paper` psi on
# windows after that phi, then phi fine-tuned with the variance-stabilised input (3000 steps) and
# then reading frames scaled to the movie's photons per emitter (4000 + 3000 steps, one N0 per
# frame), then on frames of which a quarter, then half hold one dense cluster (3000 + 4000
# steps) and, last, with a 12 px receptive field (dilations 1,2,4,2,2,1; 4000 steps); the model
# folder $(REPRO)/wholefield pairs that phi with the psi, and gets its calibration scale
# (benchmarks/calibration_wholefield_scale.py on cells without and with background, ~35 min).
# About 5.5 hours on a 2-core CPU.
# The run settings every whole-field phi stage shares.
TRAIN_WF_PHI := TF_CPP_MIN_LOG_LEVEL=2 $(PY) trainers/train_phi.py --batch_size 32 \
	--checkpoint_every 250 --val_frames 32 --noprogress
reproduce-wholefield: $(STAMP)
	$(TRAIN_WF_PHI) --out_dir $(REPRO)/phi_wholefield --preset wholefield --steps 4000 \
		--learning_rate 2e-3 --eval_every 4000
	$(TRAIN_WF_PHI) --out_dir $(REPRO)/phi_wholefield --preset wholefield --steps 5500 \
		--learning_rate 2e-3 --eval_every 5500
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) trainers/train_psi.py --out_dir $(REPRO)/psi_wholefield \
		--phi $(REPRO)/phi_wholefield --preset wholefield --crop_size 20 --init_psi paper \
		--steps 2500 --batch_size 32 --learning_rate 5e-4 --ema_decay 0.998 --jit_compile \
		--eval_every 2500 --checkpoint_every 250 --val_frames 8 --noprogress --log_every 50
	$(TRAIN_WF_PHI) --out_dir $(REPRO)/phi_wf_anscombe --preset wholefield \
		--input_transform anscombe --init_phi $(REPRO)/phi_wholefield --steps 3000 \
		--learning_rate 2e-3 --eval_every 3000
	$(TRAIN_WF_PHI) --out_dir $(REPRO)/phi_wf_dye025 --preset wholefield_dye \
		--set photons_frame_spread=0.25 --input_transform anscombe --brightness_reference 700 \
		--init_phi $(REPRO)/phi_wf_anscombe --steps 4000 --learning_rate 2e-3 --eval_every 4000
	$(TRAIN_WF_PHI) --out_dir $(REPRO)/phi_wf_dye --preset wholefield_dye \
		--input_transform anscombe --brightness_reference 700 --init_phi $(REPRO)/phi_wf_dye025 \
		--steps 3000 --learning_rate 1e-3 --eval_every 3000
	$(TRAIN_WF_PHI) --out_dir $(REPRO)/phi_wf_clusters --preset wholefield_clusters \
		--input_transform anscombe --brightness_reference 700 --init_phi $(REPRO)/phi_wf_dye \
		--steps 3000 --learning_rate 1e-3 --eval_every 3000
	$(TRAIN_WF_PHI) --out_dir $(REPRO)/phi_wf_clusters50 --preset wholefield_clusters \
		--set cluster_fraction=0.5 --input_transform anscombe --brightness_reference 700 \
		--init_phi $(REPRO)/phi_wf_clusters --steps 4000 --learning_rate 1e-3 --eval_every 4000
	$(TRAIN_WF_PHI) --out_dir $(REPRO)/phi_wf_rf12 --preset wholefield_clusters \
		--set cluster_fraction=0.5 --input_transform anscombe --brightness_reference 700 \
		--dilations 1,2,4,2,2,1 --init_phi $(REPRO)/phi_wf_clusters50 --steps 4000 \
		--learning_rate 2e-3 --eval_every 4000
	rm -rf $(REPRO)/wholefield && mkdir -p $(REPRO)/wholefield
	cp $(REPRO)/psi_wholefield/psi.weights.h5 $(REPRO)/psi_wholefield/psi_config.json \
		$(REPRO)/psi_wholefield/diffusion.json $(REPRO)/phi_wf_rf12/phi.weights.h5 \
		$(REPRO)/phi_wf_rf12/phi_config.json $(REPRO)/phi_wf_rf12/sim_config.json \
		$(REPRO)/wholefield/
	cp smlm_tfdiff/weights/wholefield/detection.json $(REPRO)/wholefield/
	rm -f $(REPRO)/wf_scale_bg0.npz $(REPRO)/wf_scale_bg.npz
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/calibration_wholefield_scale.py \
		--model $(REPRO)/wholefield --nocheck --densities 400,40,15 \
		--photons 150,400,1000-5000 --seed_offset 40 --scores_cache $(REPRO)/wf_scale_bg0.npz
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/calibration_wholefield_scale.py \
		--model $(REPRO)/wholefield --nocheck --densities 400,40,15 \
		--photons 150,400,1000-5000 --background 8,25 --scores_cache $(REPRO)/wf_scale_bg.npz
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/calibration_wholefield_scale.py \
		--model $(REPRO)/wholefield --nocheck --background_term --scale_out $(REPRO)/wholefield \
		--scores_cache $(REPRO)/wf_scale_bg0.npz,$(REPRO)/wf_scale_bg.npz
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/phi_wholefield.py --models $(REPRO)/wholefield,wholefield

# Retrain the bundled `wholefield_fast` (smlm_tfdiff/weights/wholefield_fast/MODEL.md): psi on
# the camera grid, from scratch on windows after the variance-stabilised wholefield phi (the
# bundled one before it read frames scaled to N0; reproduce-wholefield runs first), then with
# its output head (about 2.4 hours on a 2-core CPU); its phi, reproduce-wholefield's last one
# fine-tuned to be told the spread of the emitters' photons, then with half the frames' emitters
# all alike (~25 min each); paired with its sampling
# defaults (8 samples x 5 steps, refits in the samples), calibration scale (~13 min) and map
# scale (~3 min).
# The settings both stages of its phi told the spread share.
TRAIN_SPREAD_PHI := $(TRAIN_WF_PHI) --preset wholefield_clusters --set cluster_fraction=0.5 \
	--set photons_frame_spread=null --set 'photons_frame_spread_range=[0,0.6]' \
	--input_transform anscombe --brightness_reference 700 --spread_input \
	--dilations 1,2,4,2,2,1 --steps 4000 --learning_rate 1e-3 --eval_every 4000
reproduce-wholefield-fast: reproduce-wholefield
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) trainers/train_psi.py --out_dir $(REPRO)/psi_wf_s2d4 \
		--phi $(REPRO)/phi_wf_anscombe --preset wholefield --crop_size 20 --space_to_depth 4 \
		--base_channels 32 --channel_multipliers 1,2 --attention_resolutions "" --steps 9000 \
		--batch_size 32 --learning_rate 1e-3 --ema_decay 0.999 --jit_compile --eval_every 1500 \
		--checkpoint_every 250 --val_frames 8 --noprogress
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) trainers/train_psi.py --out_dir $(REPRO)/psi_wf_s2d4_head \
		--phi $(REPRO)/phi_wf_anscombe --preset wholefield --crop_size 20 --space_to_depth 4 \
		--base_channels 32 --channel_multipliers 1,2 --attention_resolutions "" --output_head 8 \
		--init_psi $(REPRO)/psi_wf_s2d4 --steps 3000 --batch_size 32 --learning_rate 5e-4 \
		--ema_decay 0.999 --jit_compile --eval_every 1500 --checkpoint_every 250 --val_frames 8 \
		--noprogress
	$(TRAIN_SPREAD_PHI) --out_dir $(REPRO)/phi_wf_spread --init_phi $(REPRO)/phi_wf_rf12
	$(TRAIN_SPREAD_PHI) --out_dir $(REPRO)/phi_wf_spread_z50 --init_phi $(REPRO)/phi_wf_spread \
		--set photons_frame_spread_zero_fraction=0.5
	rm -rf $(REPRO)/wholefield_fast && mkdir -p $(REPRO)/wholefield_fast
	cp $(REPRO)/psi_wf_s2d4_head/psi.weights.h5 $(REPRO)/psi_wf_s2d4_head/psi_config.json \
		$(REPRO)/phi_wf_spread_z50/phi.weights.h5 $(REPRO)/phi_wf_spread_z50/phi_config.json \
		$(REPRO)/phi_wf_spread_z50/sim_config.json \
		smlm_tfdiff/weights/wholefield_fast/diffusion.json \
		smlm_tfdiff/weights/wholefield_fast/detection.json $(REPRO)/wholefield_fast/
	rm -f $(REPRO)/wff_scale.npz
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/calibration_wholefield_scale.py \
		--model $(REPRO)/wholefield_fast --densities 400,40,15 --photons 150,400,1000-5000 \
		--background 0,8,25 --background_term --photons_squared_term --interaction_term \
		--scores_cache $(REPRO)/wff_scale.npz \
		--scale_out $(REPRO)/wholefield_fast --out $(REPRO)/calibration_wholefield_fast_scale.json
	rm -f $(REPRO)/wff_pixel_scale.npz
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/calibration_pixel_scale.py \
		--model $(REPRO)/wholefield_fast --intercept --photons_term --fit_photons 200,1000,3000 \
		--cache $(REPRO)/wff_pixel_scale.npz --scale_out $(REPRO)/wholefield_fast \
		--out $(REPRO)/calibration_pixel_scale_wholefield_fast.json

bench: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/simulate.py

clean:
	rm -rf demo_output .pytest_cache
