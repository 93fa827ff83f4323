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
	rm -rf $(VENV) runs build *.egg-info
