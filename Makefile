# `make test` and `make demo` create .venv when it is missing and install what they need.
# torch and torchvision are pinned here (not in pyproject.toml) because these releases
# install from the local disk on the development machines; any torch >= 2.1 works.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
FASHION_MNIST := /usr/share/datasets/fashion-mnist
PAPERMILL := $(BIN)/papermill --kernel python3

.PHONY: install test fashion-mnist demo figures dynamics-figures clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

# Installs Debian's Fashion-MNIST package when the files are absent (needs root and apt).
fashion-mnist:
	@if [ ! -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing from $(FASHION_MNIST): run 'sudo apt-get install dataset-fashion-mnist'" >&2; exit 1; \
	  fi; \
	fi

demo: install fashion-mnist
	$(BIN)/python -m bpcnn demo --runs-dir runs/demo --figure figures/demo_fashion_mnist.png

# Reruns both convergence simulations on the full grid and rewrites figures/dynamics_*.png.
dynamics-figures: install
	mkdir -p runs/dynamics
	$(PAPERMILL) --cwd notebooks notebooks/weight_sharing_dynamics.ipynb runs/dynamics/weight_sharing_dynamics.ipynb

# Trains the CPU sweep (12 runs on Fashion-MNIST; finished runs are skipped, interrupted ones resume),
# then writes the comparison table and figures into figures/ even if some runs failed, and exits
# with the sweep's status. FIGURES_SWEEP and FIGURES_DIR select another sweep file and output
# folder, e.g. for a quick check; the runs folder is runs/<sweep file name without .yaml>, which
# is where the sweep writes when the file's `name` is that name or absent.
FIGURES_SWEEP ?= sweeps/fashion_mnist_cpu.yaml
FIGURES_DIR ?= figures
FIGURES_RUNS = runs/$(basename $(notdir $(FIGURES_SWEEP)))
# One torch thread per run: these small networks gain little from a second thread, and on a
# busy machine extra threads made runs several times slower.
figures: install fashion-mnist
	OMP_NUM_THREADS=1 $(BIN)/python -m bpcnn sweep $(FIGURES_SWEEP) --runs-dir runs --workers 1; status=$$?; \
	$(PAPERMILL) notebooks/figures.ipynb $(FIGURES_RUNS)/figures.ipynb \
	  -p runs_dir $(FIGURES_RUNS) -p output_dir $(FIGURES_DIR) && exit $$status

clean:
	rm -rf $(VENV) .pytest_cache
