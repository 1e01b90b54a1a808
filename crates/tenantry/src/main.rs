#![doc = include_str!("../README.md")]

mod serve;

/// mimalloc instead of the system allocator: the request path allocates many small,
/// short-lived buffers, and glibc's malloc/free were about a tenth of the gateway's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tenantry_core::{
    Config,
    config::{ConfigError, Mode},
    text::{escape_controls, shorten},
};

/// Tenantry: one binary for every role of a sharded multi-tenant backend.
#[derive(Debug, Parser)]
#[command(name = "tenantry", version, about)]
struct Cli {
    /// Configuration file layered over the built-in defaults (TENANTRY_* variables win).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Development mode: allow a missing JWT key and use the public development key instead.
    #[arg(long, global = true)]
    dev: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the roles enabled in the configuration (gateway, api, workers) until SIGTERM/SIGINT.
    Serve,
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Operator commands: migrations, shards, tokens.
    #[command(subcommand)]
    Admin(tenantry_admin::AdminCommand),
}

/// The longest line of a command-line error printed (see `main`).
const MAX_ERROR_LINE: usize = 400;

/// A command-line error quotes what was typed, and a value 100 KB long or holding a terminal
/// escape would be printed whole and raw: each quoted value or argument is shown cut to 100
/// characters, its control characters escaped. (The tip that repeats an argument is left to
/// the line limit, so its advice is not cut in half.)
fn tame_quoted_input(e: &mut clap::Error) {
    use clap::error::{ContextKind, ContextValue};
    let tame = |s: &str| escape_controls(&shorten(s, 100));
    // The pieces that hold what was typed, each a string or a list of them (the usage line
    // and the valid names are clap's own).
    for kind in [
        ContextKind::InvalidValue,
        ContextKind::InvalidArg,
        ContextKind::InvalidSubcommand,
        ContextKind::PriorArg,
    ] {
        let tamed = match e.get(kind) {
            Some(ContextValue::String(s)) => ContextValue::String(tame(s)),
            Some(ContextValue::Strings(v)) => {
                ContextValue::Strings(v.iter().map(|s| tame(s)).collect())
            }
            _ => continue,
        };
        e.insert(kind, tamed);
    }
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and print it (secrets redacted); exit non-zero on a problem.
    Check,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(mut e) if e.use_stderr() => {
            tame_quoted_input(&mut e);
            // A value parser's own message may quote the input too (the uuid crate names the
            // character it did not expect, humantime the whole unit it did not know): the
            // error is printed without colour, each line cut short, every control character but
            // the line breaks escaped.
            let text = e.render().to_string();
            let lines: Vec<String> = text
                .trim_end()
                .lines()
                .map(|l| escape_controls(&shorten(l, MAX_ERROR_LINE)))
                .collect();
            tenantry_admin::errln!("{}", lines.join("\n"));
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
        // --help and --version
        Err(e) => e.exit(),
    };
    let mode = if cli.dev { Mode::Dev } else { Mode::Strict };
    // Admin commands other than `token` never use the JWT key, so they do not insist on one.
    let load_mode = match &cli.command {
        Command::Admin(tenantry_admin::AdminCommand::Token(_))
        | Command::Serve
        | Command::Config(_) => mode,
        Command::Admin(_) => Mode::Dev,
    };
    let cfg = match Config::load(cli.config.as_deref(), load_mode) {
        Ok(cfg) => cfg,
        Err(e) => return fail_config(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tenantry_admin::errln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Config(ConfigCommand::Check) => {
            // Not `print!`: a reader that went away (`config check | head -1`) would make it
            // panic and exit 101.
            tenantry_admin::write_out(format_args!("{}", cfg.to_redacted_toml()))
                .map(|()| tenantry_admin::errln!("configuration is valid"))
        }
        Command::Serve => {
            tenantry_core::telemetry::init(&cfg.log);
            if cli.dev {
                tracing::warn!("running with --dev: insecure settings are allowed");
            }
            runtime.block_on(serve::run(cfg))
        }
        Command::Admin(cmd) => {
            // Admin output goes to stdout; logs only when asked for with RUST_LOG.
            if std::env::var_os("RUST_LOG").is_some() {
                tenantry_core::telemetry::init(&cfg.log);
            }
            runtime.block_on(tenantry_admin::run(cmd, &cfg, cli.dev))
        }
    };
    // Buffered log lines first, so the error below is the last thing printed (a line still
    // logged after this, by a handler the runtime has not dropped yet, is written at once).
    tenantry_core::telemetry::finish();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of an admin command's output stopped reading (`… | head`): not a failure.
        Err(e) if e.chain().any(|c| c.is::<tenantry_admin::StdoutClosed>()) => ExitCode::SUCCESS,
        Err(e) if e.chain().any(|c| c.is::<tenantry_admin::UsageError>()) => {
            tenantry_admin::errln!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            tenantry_admin::errln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn fail_config(e: &ConfigError) -> ExitCode {
    tenantry_admin::errln!("error: {e}");
    ExitCode::from(2)
}
