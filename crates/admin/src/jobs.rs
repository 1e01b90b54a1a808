//! `tenantry admin jobs list|show|retry|resolve`: the dead-letter desk.

use anyhow::Context;
use clap::{Args, Subcommand};
use tenantry_core::{Config, db, text::escape_controls};
use tenantry_queue::{JobRecord, JobState, store};
use tenantry_shardmap::catalog;
use uuid::Uuid;

use crate::table;

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List a shard's jobs, newest first.
    List(ListArgs),
    /// Show one job in full.
    Show(OneArgs),
    /// Send a job in `error` back to `waiting` with a fresh round of attempts.
    Retry(OneArgs),
    /// Mark a job in `error` as `error_resolved`, with a note saying why.
    Resolve(ResolveArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// The shard to list.
    #[arg(long, value_parser = crate::shard_arg)]
    shard: String,
    /// Only jobs in this state (waiting, processing, done, error, error_resolved).
    #[arg(long, value_parser = parse_state)]
    state: Option<JobState>,
    /// Only this company's jobs.
    #[arg(long)]
    company: Option<Uuid>,
    /// At most this many (1-1000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=1000))]
    limit: i64,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct OneArgs {
    /// The job id.
    id: Uuid,
    /// The shard holding it (default: look on every shard).
    #[arg(long, value_parser = crate::shard_arg)]
    shard: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ResolveArgs {
    #[command(flatten)]
    one: OneArgs,
    /// Why it is resolved (kept on the job): 1 to 2000 characters.
    #[arg(long, value_parser = parse_note)]
    note: String,
}

/// The note, trimmed: 1 to 2000 characters.
fn parse_note(s: &str) -> Result<String, String> {
    let note = s.trim();
    if note.is_empty() || note.chars().count() > 2000 {
        return Err("--note must say why, in 1 to 2000 characters".into());
    }
    Ok(note.to_owned())
}

fn parse_state(s: &str) -> Result<JobState, String> {
    JobState::parse(s).ok_or_else(|| {
        format!("unknown state {s:?} (waiting, processing, done, error, error_resolved)")
    })
}

/// The catalog's shards, or just `only` (which must be one of them).
async fn shards(cfg: &Config, only: Option<&str>) -> anyhow::Result<Vec<catalog::ShardRow>> {
    let cat = db::connect(&cfg.catalog.url, &cfg.database, "tenantry-admin")
        .await
        .context("connecting to the catalog")?;
    let shards = catalog::list_shards(&cat).await.context("listing shards")?;
    if let Some(id) = only
        && !shards.iter().any(|s| s.id == id)
    {
        anyhow::bail!("shard {id:?} is not in the catalog (see `tenantry admin shard list`)");
    }
    Ok(shards
        .into_iter()
        .filter(|s| only.is_none_or(|id| id == s.id))
        .collect())
}

async fn connect(
    cfg: &Config,
    shard: &catalog::ShardRow,
) -> anyhow::Result<tokio_postgres::Client> {
    db::connect(&shard.database_url, &cfg.database, "tenantry-admin")
        .await
        .with_context(|| format!("connecting to shard {}", shard.id))
}

/// Looks for the job on `shard`, or on every shard one at a time. Without `--shard`, a shard
/// that cannot be reached is skipped with a warning, so one shard being down does not hide a
/// job on another; it is named if the job is not found.
async fn find(
    cfg: &Config,
    id: Uuid,
    shard: Option<&str>,
) -> anyhow::Result<(String, tokio_postgres::Client, JobRecord)> {
    let mut unreachable = Vec::new();
    for s in shards(cfg, shard).await? {
        let found = async {
            let client = connect(cfg, &s).await?;
            let job = store::get_any(&client, id)
                .await
                .with_context(|| format!("reading shard {}", s.id))?;
            Ok::<_, anyhow::Error>(job.map(|job| (client, job)))
        }
        .await;
        match found {
            Ok(Some((client, job))) => return Ok((s.id, client, job)),
            Ok(None) => {}
            Err(e) if shard.is_none() => {
                errln!("warning: skipping shard {}: {e:#}", s.id);
                unreachable.push(s.id);
            }
            Err(e) => return Err(e),
        }
    }
    match (shard, unreachable.is_empty()) {
        (Some(s), _) => anyhow::bail!("no job {id} on shard {s}"),
        (None, true) => anyhow::bail!("no job {id} on any shard"),
        // Unreachable, or reachable and failing (say, not migrated yet): the warnings above
        // say which.
        (None, false) => anyhow::bail!(
            "no job {id} on the shards that could be read; could not read (see the warnings \
             above): {}",
            unreachable.join(", ")
        ),
    }
}

pub async fn run(cmd: JobsCommand, cfg: &Config) -> anyhow::Result<()> {
    match cmd {
        JobsCommand::List(a) => {
            let shard = shards(cfg, Some(&a.shard)).await?;
            let shard = shard.first().context("shard not found")?;
            let client = connect(cfg, shard).await?;
            // The table shows no payloads: up to `queue.max_result_size` a row is not read
            // for it.
            let jobs = store::list(&client, a.state, a.company, a.limit, a.json).await?;
            if a.json {
                outln!("{}", serde_json::to_string_pretty(&jobs)?);
            } else if jobs.is_empty() {
                outln!("no jobs match");
            } else {
                let rows: Vec<Vec<String>> = jobs
                    .iter()
                    .map(|j| {
                        vec![
                            j.view.id.to_string(),
                            j.company_id.to_string(),
                            j.view.kind.clone(),
                            j.view.state.as_str().into(),
                            format!("{}/{}", j.view.attempts, j.max_attempts),
                            j.view.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                            j.view
                                .error
                                .clone()
                                .unwrap_or_default()
                                .chars()
                                .take(60)
                                .collect(),
                        ]
                    })
                    .collect();
                out!(
                    "{}",
                    table::render(
                        &[
                            "ID", "COMPANY", "KIND", "STATE", "ATTEMPTS", "CREATED", "ERROR"
                        ],
                        &rows
                    )
                );
            }
        }
        JobsCommand::Show(a) => {
            let (shard, _, job) = find(cfg, a.id, a.shard.as_deref()).await?;
            print_job(&shard, &job, a.json)?;
        }
        JobsCommand::Retry(a) => {
            let (shard, client, _) = find(cfg, a.id, a.shard.as_deref()).await?;
            let job = store::retry(&client, a.id).await?;
            if !a.json {
                outln!(
                    "retried job {} ({} on shard {shard}): back to waiting with a fresh round of attempts",
                    job.view.id,
                    escape_controls(&job.view.kind)
                );
            }
            print_job(&shard, &job, a.json)?;
        }
        JobsCommand::Resolve(a) => {
            let note = a.note.as_str();
            let (shard, client, _) = find(cfg, a.one.id, a.one.shard.as_deref()).await?;
            let job = store::resolve(&client, a.one.id, note).await?;
            if !a.one.json {
                outln!(
                    "resolved job {} ({} on shard {shard}) as error_resolved",
                    job.view.id,
                    escape_controls(&job.view.kind)
                );
            }
            print_job(&shard, &job, a.one.json)?;
        }
    }
    Ok(())
}

fn print_job(shard: &str, job: &JobRecord, json: bool) -> anyhow::Result<()> {
    if json {
        // The job as the store has it, plus the shard it was found on (as the table shows).
        let mut value = serde_json::to_value(job)?;
        if let Some(fields) = value.as_object_mut() {
            fields.insert("shard".into(), shard.into());
        }
        outln!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let opt = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into())
    };
    let rows = vec![
        vec!["id".into(), job.view.id.to_string()],
        vec!["shard".into(), shard.to_owned()],
        vec!["company".into(), job.company_id.to_string()],
        vec!["kind".into(), job.view.kind.clone()],
        vec!["state".into(), job.view.state.as_str().into()],
        vec![
            "attempts".into(),
            format!("{}/{}", job.view.attempts, job.max_attempts),
        ],
        vec![
            "retried after".into(),
            if job.retried_after == 0 {
                "-".into()
            } else {
                format!("attempt {} (jobs retry)", job.retried_after)
            },
        ],
        vec!["request id".into(), job.request_id.clone()],
        vec![
            "idempotency key".into(),
            job.idempotency_key.clone().unwrap_or_else(|| "-".into()),
        ],
        vec![
            "worker".into(),
            job.worker_id.clone().unwrap_or_else(|| "-".into()),
        ],
        vec!["lease expires".into(), opt(job.lease_expires_at)],
        vec!["runnable from".into(), job.run_at.to_rfc3339()],
        vec!["user".into(), job.user_context.to_string()],
        vec!["params".into(), job.params.to_string()],
        vec![
            "result".into(),
            job.view
                .result
                .as_ref()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
        ],
        vec![
            "error".into(),
            job.view.error.clone().unwrap_or_else(|| "-".into()),
        ],
        vec![
            "note".into(),
            job.resolution_note.clone().unwrap_or_else(|| "-".into()),
        ],
        vec!["created".into(), job.view.created_at.to_rfc3339()],
        vec!["started".into(), opt(job.view.started_at)],
        vec!["finished".into(), opt(job.view.finished_at)],
    ];
    out!("{}", table::render(&["FIELD", "VALUE"], &rows));
    Ok(())
}
