//! End-to-end tests: the real `tenantry` binary and libraries against real PostgreSQL and
//! RabbitMQ. Each test owns its databases and broker names (see `tenantry-testkit`).
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

#[macro_use]
mod support;
mod cli;
mod gateway;
mod harness;
mod http_errors;
mod jobs_api;
mod migrations;
mod queue;
mod scripts;
mod serve;
mod shard_apply;
