# Two entry points for a fresh machine (see README):
#   make quickstart   venv + install [data] + the main job (VARIANT=smoke: the 1-minute version)
#   make test         venv + install [dev] + the test suite
# Installs use constraints.txt: the jax/flax/optax/orbax/chex versions of the GPU machines.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
WORKDIR ?= /tmp/jaxsun_quickstart
PYTEST_WORKERS ?= 2

.PHONY: quickstart test venv install install-dev clean

$(PY):
	@py=$$(scripts/find_python.sh) || exit 1; \
	echo "creating $(VENV) with $$py ($$($$py --version))"; \
	$$py -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	$(PIP_INSTALL) -e '.[data]'
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[dev]'
	@touch $@

venv: $(PY)
install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

quickstart: $(VENV)/.installed
	$(PY) -m experiments.launch --config=configs/quickstart.py$(if $(VARIANT),:$(VARIANT)) --workdir=$(WORKDIR)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

clean:
	rm -rf $(VENV) .pytest_cache
