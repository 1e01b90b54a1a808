#![doc = include_str!("../README.md")]

pub mod apply;
pub mod catalog;
pub mod file;
pub mod tenants;

pub use apply::{ApplyOptions, ApplyReport, apply};
pub use file::ShardMapFile;
