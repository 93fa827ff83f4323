# The README's two commands: `make demo` and `make test`. Each builds .venv on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch is installed first so that pip never resolves the multi-GB CUDA build,
# and onnxruntime's CPU build (the cpu extra). Users with a GPU:
#   make TORCH_SPEC=torch EXTRAS=dev,gpu test
# Where plain `torch==2.13.0` resolves to a CUDA build (PyPI on Linux), name the CPU wheel index:
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu test
# (an extra index for the torch step only: pip takes the highest matching build, 2.13.0+cpu).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev,cpu
TORCH_INDEX_ARG := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
# One stamp per (torch spec, index, extras): changing any reinstalls.
STAMP := $(VENV)/.installed-$(shell echo '$(TORCH_SPEC) $(EXTRAS)$(if $(TORCH_INDEX), $(TORCH_INDEX))' | cksum | cut -d' ' -f1)

.PHONY: test demo reliability venv clean

venv: $(STAMP)

# Rebuilt from scratch when pyproject.toml, the torch spec or the extras change: pip would keep
# what an earlier spec installed (a CPU torch, or onnxruntime beside onnxruntime-gpu).
$(STAMP): pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX_ARG) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# KServe's Python model server and SDK clients, in an environment of their own: kserve pins
# protobuf < 7, which the stubs of .venv refuse. The peer benchmark (bench/serve/peer.py) and the
# tests that run KServe's clients against `serve` use it; without it they skip. onnxruntime is
# pinned to .venv's build and version, so both servers run the same kernels. Rebuilt only when
# that pin or KSERVE_SPEC changes (the stamp holds the requirement line).
KSERVE_VENV := .venv-kserve
KSERVE_SPEC ?= kserve==0.21.0
.PHONY: kserve-env
kserve-env: $(STAMP)
	@ort=$$($(PY) -c "import importlib.metadata as m, sys; \
	names = [n for n in ('onnxruntime', 'onnxruntime-gpu') if any(d.metadata['Name'] == n for d in m.distributions())]; \
	print(f'{names[0]}=={m.version(names[0])}') if names else sys.exit('no onnxruntime in $(VENV)')") || exit 1; \
	want="$(KSERVE_SPEC) $$ort"; \
	if [ "$$(cat $(KSERVE_VENV)/.installed 2>/dev/null)" != "$$want" ]; then \
		echo "building $(KSERVE_VENV): $$want"; \
		rm -rf $(KSERVE_VENV) && $(PYTHON) -m venv $(KSERVE_VENV) \
		&& $(KSERVE_VENV)/bin/python -m pip install --quiet --upgrade pip \
		&& $(KSERVE_VENV)/bin/python -m pip install --quiet $$want \
		&& echo "$$want" > $(KSERVE_VENV)/.installed \
		|| { rm -rf $(KSERVE_VENV); exit 1; }; \
	fi

# The full reliability suite (make test runs its quick subset).
reliability: $(STAMP)
	ZOO_RELIABILITY=full $(PY) -m pytest -q tests/reliability

demo: $(STAMP)
	$(PY) -m bench.demo

# The gRPC stubs in serve/_proto, from protos/ (needs grpcio-tools, in .[dev]). They are checked
# in, so a fresh clone needs no step; rerun after editing a .proto (tests/serve diffs them).
# -Iserve/_proto=protos makes the generated imports package-qualified (serve._proto.zoo...);
# -Icontract/_proto=protos lets the service import the one ModelConfig where contract has it.
# CONTRACT_PROTOS are messages only (no services, so no gRPC stubs) for the torch-free contract
# package, generated once into contract/_proto: protobuf refuses a second registration of the
# same message from another file in one process.
PROTO_OUT ?= .
PROTOS := protos/zoo/serving/v1/classifier.proto protos/inference/grpc_predict_v2.proto
CONTRACT_PROTOS := protos/inference/model_config.proto
.PHONY: protos
protos:
	$(PY) -m grpc_tools.protoc -Iserve/_proto=protos -Icontract/_proto=protos --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) $(PROTOS)
	$(PY) -m grpc_tools.protoc -Icontract/_proto=protos --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		$(CONTRACT_PROTOS)

clean:
	rm -rf $(VENV) $(KSERVE_VENV) runs build *.egg-info
