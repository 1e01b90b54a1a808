# Tenantry — `make` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo

.DEFAULT_GOAL := help
.PHONY: help run test services build lint fmt clean-test-dbs bench-queue bench-gateway

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

run: ## start the local cluster (PostgreSQL, RabbitMQ, catalog, 2 shards, gateway); Ctrl-C stops it
	@bash deploy/local/run.sh

test: ## everything: fmt check, clippy, unit and end-to-end tests against real services
	@bash -c 'say() { echo "make test: $$*" >&2; }; source scripts/lib.sh; need_rust'
	@bash scripts/services.sh
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --quiet -- -D warnings
	$(CARGO) test --workspace --no-fail-fast

services: ## make sure PostgreSQL and RabbitMQ are running (start or install them)
	@bash scripts/services.sh

bench-queue: ## queue throughput and latency side by side with graphile-worker (same PostgreSQL, same run)
	@bash scripts/bench-queue.sh

bench-gateway: ## gateway vs direct vs nginx (req/s, p50/p99), map invalidation latency, memory with 1M companies
	@bash scripts/bench-gateway.sh

build: ## build the tenantry binary (release)
	$(CARGO) build --release --bin tenantry

lint: ## clippy with warnings as errors
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## format the code
	$(CARGO) fmt --all

clean-test-dbs: ## drop the databases (and test templates) that killed test or benchmark runs left behind
	@bash scripts/clean-test-dbs.sh
