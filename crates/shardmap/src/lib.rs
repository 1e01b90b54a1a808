#![doc = include_str!("../README.md")]

pub mod apply;
pub mod catalog;
pub mod file;

pub use apply::{ApplyOptions, ApplyReport, apply};
pub use file::ShardMapFile;
