# Two commands on a fresh machine: `make train` (the built-in default run) and `make test`.
# Both install the locked environment first (uv installs torch + torchvision from PyPI together).
SHELL := /bin/bash
# uv itself comes from PyPI when missing (`python3 -m uv` runs it from wherever pip put it).
UV ?= $(shell command -v uv 2>/dev/null || echo python3 -m uv)
PY := $(UV) run --frozen python
DATA := data

.PHONY: train test test-all install shapes text-encoder clip vae clean-default

# --compile-bytecode: every package's .pyc written once here, not again by every process (PYTHONDONTWRITEBYTECODE
# machines and CI would otherwise compile torch & co on each start: 35 s -> 13.6 s for a config error, issue 16)
.venv/.installed: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --user --quiet uv || python3 -m pip install --quiet uv
	$(UV) sync --frozen --compile-bytecode
	touch $@

install: .venv/.installed

# --- the built-in default: data, then three stages chained by paths (each skipped when its output exists):
#     stage 0 CLIP (data/models/clip-shapes) -> stage 1 VAE (data/models/vae-shapes) -> latent diffusion ---
$(DATA)/shapes/train/manifest.json: | .venv/.installed
	$(PY) -m ldm.data.shapes --out $(DATA)/shapes

# open_clip_config.json is written after the weights: its presence means the export is complete
# CLIP_ARGS / VAE_ARGS add overrides to stages 0 / 1 as ARGS does to stage 2 (`make train ARGS=logger=csv
# CLIP_ARGS=logger=csv VAE_ARGS=logger=csv`: no W&B anywhere)
$(DATA)/models/clip-shapes/open_clip_config.json: $(DATA)/shapes/train/manifest.json
	$(PY) -m ldm.train experiment=shapes_clip $(CLIP_ARGS)

$(DATA)/models/vae-shapes/config.json: $(DATA)/shapes/train/manifest.json
	$(PY) -m ldm.train experiment=shapes_vae $(VAE_ARGS)

# a random frozen HF CLIP text encoder (model/text_encoder=hf_clip without a pretrained one); not in `train`
$(DATA)/models/clip-tiny/text_encoder/config.json: | .venv/.installed
	$(PY) -c "from ldm.models.text_encoders import save_random_hf_clip as s; s('$(DATA)/models/clip-tiny')"

shapes: $(DATA)/shapes/train/manifest.json
clip: $(DATA)/models/clip-shapes/open_clip_config.json
vae: $(DATA)/models/vae-shapes/config.json
text-encoder: $(DATA)/models/clip-tiny/text_encoder/config.json

# Stages 0 and 1 need only the data: on a machine with an NVIDIA GPU they train side by side (each is bound by its
# own process's Python, the GPU is busy at most 15 % of a step: docs/benchmarks.md, session 23), each one's output
# shown when it ends (and as it goes in its run directory's train.log); on a CPU one after the other (they would
# share its cores). STAGE_JOBS=1 or 2 chooses.
STAGE_JOBS ?= $(if $(shell nvidia-smi -L 2>/dev/null | grep GPU),2,1)

train: shapes
	@[ "$(STAGE_JOBS)" = 1 ] || echo "stages 0 (CLIP) and 1 (VAE) train side by side; each one's log follows when it ends"
	$(MAKE) --no-print-directory -j$(STAGE_JOBS) $(if $(filter-out 1,$(STAGE_JOBS)),--output-sync=target) clip vae
	$(PY) -m ldm.train experiment=shapes $(ARGS)

# the import layers (pyproject.toml [tool.importlinter]) are checked first: a second, then the tests
test: .venv/.installed
	$(UV) run --frozen lint-imports
	$(UV) run --frozen pytest -q $(ARGS)

test-all: .venv/.installed
	$(UV) run --frozen lint-imports
	$(UV) run --frozen pytest -q -m "" $(ARGS)

clean-default:
	rm -rf $(DATA)/shapes $(DATA)/models/clip-tiny $(DATA)/models/clip-shapes $(DATA)/models/vae-shapes

# --- CIFAR-10 from ../shared/datasets/cifar10 (class folders) -> data/cifar10/{train,test} shards ---
CIFAR10_SRC ?= ../shared/datasets/cifar10
$(DATA)/cifar10/%/manifest.json: | .venv/.installed
	rm -rf $(DATA)/cifar10/src-$* && mkdir -p $(DATA)/cifar10/src-$*
	tar xzf $(CIFAR10_SRC)/$*.tar.gz -C $(DATA)/cifar10/src-$*
	$(PY) scripts/make_shards.py $(DATA)/cifar10/src-$*/$* $(DATA)/cifar10/$* --source classes \
		--template "a photo of a {label}" --samples-per-shard 2500 --format keep --shuffle-seed 0 --resume
	rm -rf $(DATA)/cifar10/src-$*

.PHONY: cifar10 cifar10-text cifar10-vae cifar10-train
cifar10: $(DATA)/cifar10/train/manifest.json $(DATA)/cifar10/test/manifest.json

# --- the CIFAR-10 recipe (one GPU; README "CIFAR-10"): a text tower for the ten class captions (random, frozen),
#     the f=2 VAE (experiment=cifar10_vae, 3 minutes), then the latent-diffusion U-Net (experiment=cifar10, 12 minutes)
$(DATA)/models/clip-cifar10/text_encoder/config.json: | .venv/.installed
	$(PY) -c "from ldm.models.text_encoders import save_random_hf_clip as s; \
		s('$(DATA)/models/clip-cifar10', hidden_size=256, num_layers=2, num_heads=4, max_length=16)"

# Stage 1 (extra overrides in VAE_ARGS, e.g. VAE_ARGS=logger=csv) runs beside stage 2's compile warm-up: experiment=cifar10 for 3 steps on an untrained VAE of stage 1's shapes
# (model/vae=cifar10), writing nothing but its log (runs/cifar10_warmup.log) and Inductor's compile cache
# (/tmp/torchinductor_$USER), from which stage 2 then compiles in seconds instead of ~2 minutes (docs/benchmarks.md,
# session 19). Its compiler gets half the cores; if it fails, stage 2 compiles itself as before.
CIFAR10_WARMUP := experiment=cifar10 model/vae=cifar10 +model.vae.frozen=true trainer.max_steps=3 \
	trainer.max_time=null logger=none callbacks.fid=null callbacks.val_loss=null callbacks.sample_grid=null \
	callbacks.export=null callbacks.checkpoint=null +trainer.enable_checkpointing=false hydra.run.dir=runs/cifar10_warmup
$(DATA)/models/vae-cifar10/config.json: $(DATA)/cifar10/train/manifest.json $(DATA)/cifar10/test/manifest.json \
		$(DATA)/models/clip-cifar10/text_encoder/config.json
	mkdir -p runs && (TORCHINDUCTOR_COMPILE_THREADS=$$(( ($$(nproc) + 1) / 2 )) $(PY) -m ldm.train $(CIFAR10_WARMUP) \
		> runs/cifar10_warmup.log 2>&1 || echo "stage 2's compile warm-up failed (runs/cifar10_warmup.log)") & \
	$(PY) -m ldm.train experiment=cifar10_vae $(VAE_ARGS); rc=$$?; wait; exit $$rc

cifar10-text: $(DATA)/models/clip-cifar10/text_encoder/config.json
cifar10-vae: $(DATA)/models/vae-cifar10/config.json

cifar10-train: cifar10 cifar10-text cifar10-vae
	$(PY) -m ldm.train experiment=cifar10 $(ARGS)

# --- GPU training throughput of an SD-1.5-shaped model vs a diffusers-example-style step (docs/benchmarks.md) ---
.PHONY: bench
bench: .venv/.installed
	$(PY) scripts/bench_train.py $(ARGS)
