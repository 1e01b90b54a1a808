#![doc = include_str!("../README.md")]

pub mod job;
pub mod listen;
pub mod metrics;
pub mod relay;
pub mod shard;
pub mod store;
pub mod worker;

pub use job::{ClaimedJob, JobError, JobFinishedEvent, JobRecord, JobState, JobView, NewJob};
pub use listen::{Listener, Notifier, WaitError, Waiter, WhenFull};
pub use shard::ShardQueue;
pub use worker::{Handler, Registry, Worker, WorkerOptions};
