#![doc = include_str!("../README.md")]

pub mod auth;
pub mod config;
pub mod db;
pub mod error;
pub mod http;
pub mod metrics;
pub mod relay;
pub mod secret;
pub mod shutdown;
pub mod size;
pub mod telemetry;
pub mod text;

pub use config::Config;
pub use error::ApiError;

/// The version every role reports in `/readyz`-adjacent places and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
