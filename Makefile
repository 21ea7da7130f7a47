# r4 — make targets. `make test` is what CI runs (through .ci/run) and what a newcomer types.
CARGO   ?= cargo
# The debug binary, wherever cargo puts it (CARGO_TARGET_DIR is honoured).
R4_DEV  := $(or $(CARGO_TARGET_DIR),target)/debug/r4
SAMPLES := $(wildcard config/samples/*.yaml)
IMAGE   ?= r4:dev
# The simulated agent image (`make sim-agent-image`; the e2e's agent containers on a cluster).
SIM_AGENT_IMAGE ?= r4-sim-agent:dev

.PHONY: all build test deps lint crds check-crds rbac validate-samples readme check-readme run bench e2e e2e-dev docker sim-agent-image clean chart-check install-yaml check-install-yaml rules-check

all: build

## build: the release binary target/release/r4
build:
	$(CARGO) build --release --locked --bin r4

## deps: what the tests need on a fresh Debian/Ubuntu machine (redis-server, promtool, the
##       Python checkers of scripts/requirements-tools.txt in .tools/venv)
deps:
	@./scripts/install-deps.sh

## lint: formatting and clippy with warnings as errors
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

## test: lint, every test (against a real redis-server), fresh CRDs, valid samples, the chart
##       linted, rendered and checked, a fresh install.yaml, the alerting rules, e2e on r4 dev
test: deps lint
	$(CARGO) test --locked --all-targets -- --skip crash_test
	@# The crash test prints its figures (submitted, completed, lost, duplicates, kills): show them.
	$(CARGO) test --locked --test crash -- --nocapture
	$(MAKE) --no-print-directory check-crds validate-samples check-readme chart-check check-install-yaml rules-check e2e-dev

## crds: regenerate crds/ from the Rust types (and the chart's copy in charts/r4/crds)
crds:
	$(CARGO) run --locked -q --bin r4 -- crds --out-dir crds
	cp crds/*.yaml charts/r4/crds/

## rbac: regenerate config/rbac/role.yaml from the controller's list of API calls (and the
##       chart's copy, whose rules charts/r4 installs)
rbac:
	@mkdir -p config/rbac
	$(CARGO) run --locked -q --bin r4 -- rbac > config/rbac/role.yaml
	cp config/rbac/role.yaml charts/r4/files/rbac/role.yaml

check-crds:
	@$(CARGO) build --locked -q --bin r4
	@tmp=$$(mktemp -d) && $(R4_DEV) crds --out-dir $$tmp >/dev/null && \
	  diff -ru crds $$tmp >/dev/null || { echo "crds/ is stale: run 'make crds'"; rm -rf $$tmp; exit 1; }; \
	  rm -rf $$tmp; echo "crds/ is fresh"

validate-samples:
	@$(CARGO) build --locked -q --bin r4
	$(R4_DEV) validate --require-refs $(foreach f,$(SAMPLES),-f $(f))

## readme: regenerate the README's worked example from what r4 run prints (two 20,000-task runs)
readme:
	@$(CARGO) build --locked -q --bin r4
	R4=$(R4_DEV) ./scripts/worked-example.sh

check-readme:
	@$(CARGO) build --locked -q --bin r4
	@R4=$(R4_DEV) ./scripts/worked-example.sh --check

## chart-check: charts/r4 linted and rendered (default and HA values) by the Helm engine of
##              helm-python-sdk, every object validated (kubernetes-validate --strict), checkov
chart-check:
	@./scripts/check-chart.sh

## install-yaml: regenerate config/install.yaml (the chart rendered with default values)
install-yaml:
	@./scripts/check-chart.sh --write-install-yaml

check-install-yaml:
	@./scripts/check-chart.sh --check-install-yaml

## rules-check: the PrometheusRules through `promtool check rules` and `promtool test rules`
rules-check:
	@./scripts/check-rules.sh

## run: the worked example on this machine, no cluster
run:
	$(CARGO) run --locked --release -q --bin r4 -- run -f config/samples/payment-disputes.yaml

## bench: the benchmark suite, JSON out
bench: deps
	$(CARGO) build --locked --release -q --bin r4
	./scripts/bench.sh

## e2e: against a real cluster (kind or k3d) with the controller installed; needs a kubeconfig,
##      R4_IMAGE loaded into it, and two tags of an agent image in E2E_AGENT_IMAGE and
##      E2E_AGENT_IMAGE_NEXT (make sim-agent-image; README, "Installing on a cluster")
e2e:
	E2E_TARGET=cluster ./e2e/run.sh

## e2e-dev: the same scenario against `r4 dev` (part of `make test`)
e2e-dev:
	@$(CARGO) build --locked -q --bin r4
	E2E_TARGET=dev R4=$(R4_DEV) ./e2e/run.sh

## docker: the runtime image
docker:
	docker build -t $(IMAGE) .

## sim-agent-image: the simulated agent image (`r4 sim-agent`, same binary) as r4-sim-agent:dev;
##                  tag it twice for `make e2e` (E2E_AGENT_IMAGE, E2E_AGENT_IMAGE_NEXT)
sim-agent-image:
	docker build --target sim-agent -t $(SIM_AGENT_IMAGE) .

clean:
	$(CARGO) clean
