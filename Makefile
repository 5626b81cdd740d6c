# dishpatch developer entry points. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Build output lives outside the clone so every clone (and CI) reuses it.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/dishpatch/target
export KUBECONFIG := $(CURDIR)/.dev/kubeconfig
CARGO ?= cargo

.PHONY: help deps up down status clean test test-unit lint fmt crds build bins bench soak images helm-test helm-test-node kind-up node-up node-down node-load node-status test-node

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

deps: ## Install what is missing (Debian packages, Python and npm tools, control-plane binaries); idempotent
	@hack/deps.sh

up: deps bins ## Start the local platform (control plane, RabbitMQ, CRDs, operator, examples); safe to run twice
	@hack/cluster.sh up
	@hack/cluster.sh platform
	@kubectl apply -f examples/restaurant.yaml -f examples/couriers.yaml >/dev/null
	@echo
	@echo "dishpatch is up. Point kubectl at it with:"
	@echo "  export KUBECONFIG=$(KUBECONFIG)"
	@echo "then try: kubectl apply -f examples/ && kubectl get dishpatch"
	@echo "Traces: Jaeger's API at http://127.0.0.1:16686/api/traces/<trace id> (README: \"An order's trace\")"

down: ## Stop everything `make up` started (state is kept in .dev/)
	@hack/cluster.sh down

status: ## Show what runs
	@hack/cluster.sh status

clean: ## Stop everything and delete local state (.dev/)
	@hack/cluster.sh clean

bins: ## Build the binaries
	$(CARGO) build --workspace --bins

build: ## Build every crate
	$(CARGO) build --workspace --all-targets

test: deps ## Run every test (unit, property and integration) against the real local control plane
	@hack/cluster.sh up
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

bench: deps ## Benchmarks (docs/benchmarks.md): apiserver write ceiling; operator writes/order and accept rate; end-to-end throughput and latency; façade reads
	@hack/cluster.sh up
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p dishpatch-e2e --bench ceiling
	$(CARGO) bench -p dishpatch-operator --bench acceptance
	$(CARGO) bench -p dishpatch-e2e --bench throughput
	$(CARGO) bench -p dishpatch-e2e --bench reads

# The soak's build profile: dev reuses the binaries `make test` builds; SOAK_PROFILE=release measures release builds.
SOAK_PROFILE ?= dev
soak: deps ## Steady load through every component for SOAK_DURATION (10m) at SOAK_RATE (1/s); RSS, errors, queues, unfinished orders (docs/benchmarks.md); not in CI
	@hack/cluster.sh up
	$(CARGO) build --profile $(SOAK_PROFILE) --workspace --bins
	$(CARGO) bench --profile $(SOAK_PROFILE) -p dishpatch-e2e --bench soak

images: ## Container images, one per component, tagged from git (docs/images.md)
	$(CARGO) build --release --workspace --bins
	@hack/images.sh build

node-up: ## A real single node on this machine (kubelet, containerd, CoreDNS) joined to the control plane (hack/node.sh); needs root
	@hack/deps.sh
	@hack/node.sh up

node-load: ## Import the `make images` images into the node's containerd (like `kind load docker-image`)
	@hack/node.sh load

node-down: ## Stop the node and remove its iptables rules, bridge and mounts
	@hack/node.sh down

node-status: ## Show what the node runs
	@hack/node.sh status

test-node: ## The node test: node-up, images, node-load, then each image as a restricted pod (e2e/node/test.sh)
	@e2e/node/test.sh

test-unit: ## Run only the tests that need no control plane
	$(CARGO) test --workspace --lib --bins

lint: ## cargo fmt --check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

crds: ## Regenerate crds/ from the Rust types
	$(CARGO) run -q -p dishpatch-operator -- crds --out-dir crds

helm-test: ## Helm chart and kind-config.yaml: kind's loader, lint, schema, server dry-run, install, RBAC table (e2e/helm/test.sh)
	@hack/cluster.sh up
	@e2e/helm/test.sh

helm-test-node: ## The chart on the real node (after make node-up, images, node-load): install under restricted, helm test, upgrade with orders in flight, failover, uninstall
	@e2e/helm/test.sh node

# kind writes its own kubeconfig, never this project's .dev/kubeconfig.
KIND_KUBECONFIG := $(HOME)/.kube/config
kind-up: ## kind cluster from kind-config.yaml, images loaded, chart installed, façade on localhost:8080 (needs Docker and kind)
	KUBECONFIG=$(KIND_KUBECONFIG) kind create cluster --config kind-config.yaml
	$(MAKE) images
	docker build -q -t dishpatch/chart-test:1 -f helm/images/chart-test.Dockerfile helm/images
	for c in operator payment kitchen delivery notification facade; do KUBECONFIG=$(KIND_KUBECONFIG) kind load docker-image --name dishpatch dishpatch/$$c:$$(hack/images.sh tag); done
	KUBECONFIG=$(KIND_KUBECONFIG) kind load docker-image --name dishpatch dishpatch/chart-test:1
	hack/tools.sh helm
	KUBECONFIG=$(KIND_KUBECONFIG) $$(hack/tools.sh path helm) install dishpatch helm/dishpatch -n dishpatch --create-namespace --set-string image.tag=$$(hack/images.sh tag) --set facade.devLogin=true --wait
	KUBECONFIG=$(KIND_KUBECONFIG) kubectl -n dishpatch apply -f examples/restaurant.yaml -f examples/couriers.yaml
	@echo "façade: http://localhost:8080   (helm test dishpatch -n dishpatch places an order)"
