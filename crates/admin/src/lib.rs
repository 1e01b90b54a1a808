#![doc = include_str!("../README.md")]

/// `print!` for the commands' output: a write that fails returns from the enclosing function
/// with the error ([`StdoutClosed`] when the reader went away) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::write_out(format_args!($($arg)*))?
    };
}

/// `println!` the same way (see [`out!`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::write_out(format_args!("{}\n", format_args!($($arg)*)))?
    };
}

/// `println!` for a command that goes on working after it prints (`migrate up`): a reader that
/// went away ends the output, not the work (see [`write_note`]).
macro_rules! note {
    ($($arg:tt)*) => {
        $crate::write_note(format_args!("{}\n", format_args!($($arg)*)))?
    };
}

/// `eprintln!` that never panics: a closed standard error (`… 2>&1 | head -1`) loses the
/// line instead of turning the command's exit code into a panic's 101.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::write_err(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod companies;
mod jobs;
mod migrate;
mod shard;
pub mod table;
mod token;

use clap::Subcommand;
use tenantry_core::Config;

/// `tenantry admin …`: the operator's commands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Schema migrations of the catalog and the shards.
    #[command(subcommand)]
    Migrate(migrate::MigrateCommand),
    /// Shards: apply the shard map as code, list what the catalog holds.
    #[command(subcommand)]
    Shard(shard::ShardCommand),
    /// Jobs on a shard: list, show, retry or resolve dead letters.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Companies in the catalog: list them, finish a creation left half-way.
    #[command(subcommand)]
    Companies(companies::CompaniesCommand),
    /// Mint a JWT signed with the configured key (for development and tests).
    Token(token::TokenArgs),
}

/// Standard output was closed by whatever read it (`tenantry admin jobs list … | head`). The
/// command stops printing; the binary exits 0 without a message, as the output's reader chose
/// to stop, and whatever the command changed is done.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct StdoutClosed;

/// A command line whose arguments parse one by one but not together (the same company granted
/// twice, say): the binary exits 2, as for any other bad command line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A `--shard` value: a well-formed shard id (as the catalog requires of every shard), so a
/// mistyped or hostile one is refused with the rule (exit 2) before any database is read.
fn shard_arg(s: &str) -> Result<String, String> {
    tenantry_core::config::validate_shard_id(s).map(|()| s.to_string())
}

/// Writes to standard output; see [`out!`].
pub fn write_out(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_fmt(args) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}

/// Writes to standard output for a command whose work outlasts its output: once the reader has
/// gone, the rest is dropped and the command carries on (it would otherwise stop half-way,
/// say with the catalog migrated and every shard not, and still exit 0).
fn write_note(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    match write_out(args) {
        Err(e) if e.is::<StdoutClosed>() => Ok(()),
        other => other,
    }
}

/// Writes to standard error, dropping the text if it cannot (see [`errln!`]).
pub fn write_err(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// Runs an admin command. `cfg` was loaded by the binary; `dev` is the `--dev` switch.
pub async fn run(cmd: AdminCommand, cfg: &Config, dev: bool) -> anyhow::Result<()> {
    match cmd {
        AdminCommand::Migrate(c) => migrate::run(c, cfg).await,
        AdminCommand::Shard(c) => shard::run(c, cfg).await,
        AdminCommand::Jobs(c) => jobs::run(c, cfg).await,
        AdminCommand::Companies(c) => companies::run(c, cfg).await,
        AdminCommand::Token(a) => token::run(a, cfg, dev),
    }
}
