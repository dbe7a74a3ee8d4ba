# make          set up .venv if needed, then the main job (python reconstruct.py)
# make test     set up .venv if needed, then the tests (python -m pytest)
# make install  set up .venv only: python3 -m venv, then pip install -e ".[dev]"
# make lint     ruff format --check and ruff check
# make slow     the tests plus the slow ones
# make gpu-check  scripts/gpu_check.sh, on a CUDA machine (docs/scale.md, "GPU check")
# make gpu-wheels  here: the wheels that check installs there, offline, into .gpu-wheels/
#
# Nothing needs a virtual environment to be active: every command runs the venv's own python.
# Set-up is stamped: it runs again only when pyproject.toml or requirements.txt change (or the
# venv is gone). Variables:
#   VENV=.ci-venv             another venv (.ci/run uses a fresh one)
#   ARGS="logger=none ..."    overrides for the main job
#   PYTEST_ARGS="-k em -x"    arguments for pytest
#   PYTHON=python3.12         the interpreter that makes the venv
#   SYSTEM_SITE=1             the venv sees the packages of $(PYTHON) (a GPU image's CUDA torch);
#                             pip then installs only what is missing
#   PIP_ARGS=... INSTALL=...  what pip is given: offline, e.g. PIP_ARGS="--no-index
#                             --find-links DIR --no-deps" INSTALL="DIR/*.whl"

PYTHON ?= python3
VENV ?= .venv
ARGS ?=
PYTEST_ARGS ?=
SYSTEM_SITE ?= 0
PIP_ARGS ?=
INSTALL ?= -e '.[dev]'
# What a GPU image lacks of the dependencies (it has torch, lightning, numpy, scipy, einops,
# pandas, matplotlib, pytest; wandb is left out: the GPU check runs logger=none), as wheels of
# the versions installed here, for a GPU machine with no registry (scripts/gpu_check.sh).
GPU_WHEELS ?= .gpu-wheels
GPU_MISSING := hydra-core|omegaconf|antlr4-python3-runtime|mrcfile|starfile|mlxtend

BIN := $(VENV)/bin
STAMP := $(VENV)/.mtd-installed

.DEFAULT_GOAL := run
.PHONY: run install test lint slow gpu-check gpu-wheels

run: $(STAMP)
	$(BIN)/python reconstruct.py $(ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
ifeq ($(SYSTEM_SITE),1)
	# --without-pip: pip comes from $(PYTHON)'s packages. The .pth file: when $(PYTHON) is itself
	# a venv, --system-site-packages alone would reach its base interpreter's packages, not its own.
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages --without-pip $(VENV)
	$(PYTHON) -c "import site; print('\n'.join(site.getsitepackages()))" \
		> "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_parent_site.pth"
else
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
endif
	$(BIN)/python -m pip install $(PIP_ARGS) $(INSTALL)
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

gpu-check:
	VENV=$(VENV) bash scripts/gpu_check.sh

gpu-wheels: $(STAMP)
	rm -rf $(GPU_WHEELS)
	$(BIN)/python -m pip wheel --no-deps --wheel-dir $(GPU_WHEELS) \
		$$($(BIN)/python -m pip freeze | grep -i -E '^($(GPU_MISSING))==')
