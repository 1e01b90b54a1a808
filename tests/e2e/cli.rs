//! `tenantry config check` and `tenantry admin token`, including hostile input.

use crate::support::{SECRET, run, tenantry};

#[test]
fn config_check_prints_the_effective_config_with_secrets_redacted() {
    let dir = tempdir();
    let file = dir.join("c.toml");
    std::fs::write(&file, "[gateway]\nenabled = true\n[worker]\nthreads = 0\n").unwrap();
    let (code, out, err) = run(tenantry()
        .args(["config", "check", "--config"])
        .arg(&file)
        .env("TENANTRY_AUTH__JWT_SECRET", SECRET)
        .env("TENANTRY_GATEWAY__LISTEN", "127.0.0.1:9999")
        .env("TENANTRY_CATALOG__URL", "postgres://u:hunter2pw@db/x"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("enabled = true"), "file layer applied: {out}");
    assert!(
        out.contains("listen = \"127.0.0.1:9999\""),
        "env layer applied: {out}"
    );
    assert!(
        !out.contains(SECRET) && !out.contains("hunter2pw"),
        "secrets leaked: {out}"
    );
    assert!(err.contains("configuration is valid"));
}

#[test]
fn config_check_names_the_bad_key_and_exits_non_zero() {
    let dir = tempdir();
    let padding = "# padding\n".repeat(200_000);
    for (text, needle) in [
        ("[gateway]\nenabeld = true\n", "enabeld"),
        ("[api]\nsync_wait = \"soon\"\n", "sync_wait"),
        ("[gateway\n", "TOML"),
        ("[api]\nbody_limit = \"1 parsec\"\n", "body_limit"),
        ("[worker]\nthreads = 100000\n", "worker.threads"),
        // A wrong path to something large (a log, a dump) is not read into memory.
        (padding.as_str(), "at most 1 MiB"),
    ] {
        let file = dir.join("bad.toml");
        std::fs::write(&file, text).unwrap();
        let (code, _out, err) = run(tenantry()
            .args(["--dev", "config", "check", "--config"])
            .arg(&file));
        assert_eq!(code, 2, "{text:?}: {err}");
        assert!(err.contains(needle), "{text:?}: {err}");
    }
    let (code, _, err) =
        run(tenantry().args(["--dev", "config", "check", "--config", "/no/such/file.toml"]));
    assert_eq!(code, 2);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn an_insecure_config_is_refused_without_dev() {
    let (code, _, err) = run(tenantry().args(["config", "check"]));
    assert_eq!(code, 2);
    assert!(
        err.contains("auth.jwt_secret is not set") && err.contains("--dev"),
        "{err}"
    );
    let (code, _, err) = run(tenantry()
        .arg("serve")
        .env("TENANTRY_GATEWAY__ENABLED", "true"));
    assert_eq!(code, 2, "serve must refuse too: {err}");
    let (code, _, _) = run(tenantry().args(["--dev", "config", "check"]));
    assert_eq!(code, 0);
}

#[test]
fn token_rejects_malformed_arguments() {
    for args in [
        vec!["--user", "u", "--company", "not-a-uuid:admin"],
        vec![
            "--user",
            "u",
            "--company",
            "0190a000-0000-7000-8000-000000000000:owner",
        ],
        vec![
            "--user",
            "u",
            "--company",
            "0190a000-0000-7000-8000-000000000000",
        ],
        vec!["--user", "u", "--ttl", "forever"],
        vec!["--user", "u", "--ttl", "400d"],
        // Under a second: its `exp` (whole seconds) would be now, a token already dead.
        vec!["--user", "u", "--ttl", "500ms"],
        vec!["--company", "0190a000-0000-7000-8000-000000000000:admin"],
        // A token every listener would refuse (`sub` with a control character, blank).
        vec!["--user", "op\u{1b}[2J"],
        vec!["--user", "  "],
        vec!["--user", "u", "--scope", "companies:create\nshardmap:read"],
        // The same company twice: the second grant would silently replace the first.
        vec![
            "--user",
            "u",
            "--company",
            "0190a000-0000-7000-8000-000000000000:admin",
            "--company",
            "0190a000-0000-7000-8000-000000000000:viewer",
        ],
    ] {
        let (code, out, err) = run(tenantry()
            .args(["admin", "token"])
            .args(&args)
            .env("TENANTRY_AUTH__JWT_SECRET", SECRET));
        assert_eq!(code, 2, "{args:?}: {out} {err}");
        assert!(out.is_empty(), "no token printed for bad input");
    }
    let long = "u".repeat(300);
    let (code, _, err) = run(tenantry()
        .args(["admin", "token", "--user", &long])
        .env("TENANTRY_AUTH__JWT_SECRET", SECRET));
    assert_eq!(code, 2);
    assert!(err.contains("--user"), "{err}");
    let (code, _, err) = run(tenantry()
        .args(["admin", "token", "--user", "u"])
        .args(["--company", "0190a000-0000-7000-8000-000000000000:admin"])
        .args(["--company", "0190a000-0000-7000-8000-000000000000:viewer"])
        .env("TENANTRY_AUTH__JWT_SECRET", SECRET));
    assert_eq!(code, 2);
    assert!(err.contains("more than once"), "{err}");
    // The same grant twice is that one grant.
    let (code, out, err) = run(tenantry()
        .args(["admin", "token", "--user", "u"])
        .args(["--company", "0190a000-0000-7000-8000-000000000000:admin"])
        .args(["--company", "0190a000-0000-7000-8000-000000000000:admin"])
        .env("TENANTRY_AUTH__JWT_SECRET", SECRET));
    assert_eq!(code, 0, "{err}");
    assert!(!out.trim().is_empty());
}

#[test]
fn a_bad_command_line_quotes_what_was_typed_short_and_escaped() {
    // Whatever the command line got wrong, the error names the culprit, cut short and with
    // control characters escaped: a pasted 100 KB value, or one holding a terminal escape,
    // neither floods nor drives the operator's terminal.
    let huge = format!("{}\u{1b}[2J", "s".repeat(100_000));
    let escape = "x\u{1b}]0;owned\u{7}";
    let (flag, ttl) = (format!("--{huge}"), format!("1{huge}"));
    let token = ["admin", "token", "--user", "u"];
    let list = ["admin", "jobs", "list", "--shard", "s1"];
    for args in [
        vec!["admin", "jobs", "list", "--shard", &huge],
        vec!["admin", "jobs", "list", "--shard", escape],
        vec!["admin", "jobs", "show", &huge],
        vec!["admin", "shard", "list", &huge],
        vec!["admin", "shard", "list", escape],
        vec!["admin", escape],
        [&list[..], &[&flag]].concat(),
        [&token[..], &["--ttl", &huge]].concat(),
        // The uuid parser's own message names the character it did not expect.
        [&list[..], &["--company", "5\u{1b}[2J"]].concat(),
        // Humantime's and the project's own parsers quote the whole value.
        [&token[..], &["--ttl", &ttl]].concat(),
        [&token[..], &["--company", &huge]].concat(),
        [&list[..], &["--state", &huge]].concat(),
        vec!["admin", "migrate", "up", "--phase", &huge],
        vec!["admin", "migrate", "status", "--shard", &huge],
        vec!["admin", "migrate", "status", "--json", "--json"],
        vec!["admin", "companies", "finish", &huge],
        vec!["admin", "companies", "finish", escape],
        [&token[..], &["--scope", &huge]].concat(),
        vec!["serve", escape],
        // The configuration file's path, as typed.
        vec!["--config", &huge, "config", "check"],
        vec!["--config", escape, "config", "check"],
    ] {
        // As on a terminal: clap would keep its colours, and with them a raw escape.
        let (code, out, err) = run(tenantry().args(&args).env("CLICOLOR_FORCE", "1"));
        let shown: Vec<&str> = args.iter().map(|a| &a[..a.len().min(40)]).collect();
        assert_eq!(code, 2, "{shown:?}");
        assert!(out.is_empty(), "{shown:?}: {out}");
        assert!(
            err.starts_with("error: "),
            "{shown:?}: {}",
            &err[..err.len().min(500)]
        );
        assert!(err.len() < 2000, "{shown:?}: {} bytes", err.len());
        assert!(
            !err.contains('\u{1b}') && !err.contains('\u{7}'),
            "{shown:?}: {err:?}"
        );
    }
}

#[test]
fn a_shard_map_path_is_quoted_short_and_escaped() {
    // The file `admin shard apply` cannot read is named as typed, but cut short and with its
    // control characters escaped, like every other value on the command line. (Read before
    // the catalog is reached: no database is needed.)
    let huge = format!("/no/such/{}\u{1b}[2J", "s".repeat(100_000));
    let escape = "/no/such/x\u{1b}]0;owned\u{7}.toml";
    for path in [&huge[..], escape] {
        let (code, out, err) = run(tenantry().args(["admin", "shard", "apply", path]));
        let shown = &path[..path.len().min(40)];
        assert_eq!(code, 1, "{shown}: {err}");
        assert!(out.is_empty(), "{shown}: {out}");
        assert!(
            err.starts_with("error: cannot read shard map /no/such/"),
            "{shown}: {}",
            &err[..err.len().min(500)]
        );
        assert!(err.len() < 2000, "{shown}: {} bytes", err.len());
        assert!(
            !err.contains('\u{1b}') && !err.contains('\u{7}'),
            "{shown}: {err:?}"
        );
    }
}

#[test]
fn a_shard_map_or_config_that_is_a_directory_or_not_utf8_is_refused_clearly() {
    /// Removed however the test ends.
    struct TempDir(std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = std::env::temp_dir().join(format!("tenantry-cli-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let _removed = TempDir(dir.clone());
    let latin1 = dir.join("latin1.toml");
    std::fs::write(&latin1, b"environment = \"caf\xe9\"\n").unwrap();
    for (path, needle) in [(&dir, "cannot read shard map"), (&latin1, "UTF-8")] {
        let (code, out, err) = run(tenantry().args(["admin", "shard", "apply"]).arg(path));
        assert_eq!(code, 1, "{path:?}: {err}");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.starts_with("error: ") && err.contains(needle),
            "{path:?}: {err}"
        );
        let causes = err.matches("os error").count() + err.matches("valid UTF-8").count();
        assert_eq!(causes, 1, "the cause once: {err}");
    }
    for path in [&dir, &latin1] {
        let (code, out, err) = run(tenantry()
            .arg("--config")
            .arg(path)
            .args(["config", "check"]));
        assert_eq!(code, 2, "{path:?}: {err}");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.starts_with("error: ") && err.len() < 2000,
            "{path:?}: {err}"
        );
    }
}

#[test]
fn token_is_signed_with_the_configured_key() {
    let company = uuid::Uuid::now_v7();
    let (code, out, err) = run(tenantry()
        .args([
            "admin",
            "token",
            "--user",
            "alice",
            "--scope",
            "shardmap:read",
        ])
        .args(["--company", &format!("{company}:viewer")])
        .env("TENANTRY_AUTH__JWT_SECRET", SECRET));
    assert_eq!(code, 0, "{err}");
    let claims =
        tenantry_core::auth::verify_hs256(SECRET.as_bytes(), out.trim()).expect("verifies");
    assert_eq!(claims.sub, "alice");
    assert_eq!(
        claims.role_in(company),
        Some(tenantry_core::auth::Role::Viewer)
    );
    assert!(
        tenantry_core::auth::verify_hs256(b"another-key-another-key-another-key", out.trim())
            .is_err()
    );
}

/// A fresh directory under the system's temp dir, removed with everything in it when dropped.
pub fn tempdir() -> TempDir {
    let d = std::env::temp_dir().join(format!("tenantry-e2e-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

/// A directory of [`tempdir`]: derefs to its path, and is removed when dropped.
pub struct TempDir(std::path::PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn readme_lists_every_configuration_key() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut section = String::new();
    let mut keys = 0;
    for line in tenantry_core::config::DEFAULTS_TOML.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_owned();
        } else if let Some((key, value)) = line.split_once('=').filter(|_| !line.starts_with('#')) {
            let full = format!("`{section}.{}`", key.trim());
            assert!(readme.contains(&full), "README.md does not document {full}");
            // The table's default column says what the defaults file holds: `value`, or
            // "empty" for an empty string.
            let value = value.trim();
            let expected = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                Some("") => "empty".to_owned(),
                Some(text) => format!("`{text}`"),
                None => format!("`{value}`"),
            };
            // The configuration table comes last (the roles table names some keys too).
            let row = readme
                .lines()
                .rfind(|l| l.starts_with(&format!("| {full} |")))
                .unwrap_or_else(|| panic!("README.md has no table row for {full}"));
            let documented = row.split('|').nth(2).unwrap_or_default().trim();
            assert_eq!(documented, expected, "README.md's default of {full}");
            keys += 1;
        }
    }
    assert!(keys > 15, "parsed the defaults file");
}

#[test]
fn config_check_whose_reader_stops_reading_exits_quietly() {
    // `tenantry config check | head -0`: it used `print!`, which panics (exit 101) on a closed
    // standard output.
    let mut child = tenantry()
        .args(["--dev", "config", "check"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

#[test]
fn the_local_cluster_configs_pass_config_check() {
    // `make run` starts the nodes with these; a key renamed in the code would otherwise be
    // found only there (the configuration refuses unknown keys).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/local");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, _, err) = run(tenantry()
                .args(["--dev", "config", "check", "--config"])
                .arg(&path));
            assert_eq!(code, 0, "{}: {err}", path.display());
            checked += 1;
        }
    }
    assert_eq!(checked, 3, "gateway and two shards");
}
