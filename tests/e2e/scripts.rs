//! The project's own shell scripts, with the system commands they call replaced by stand-ins
//! on `PATH` (they would otherwise install packages on the machine running the tests).

use std::{os::unix::fs::PermissionsExt, process::Command};

use crate::cli::tempdir;

/// Runs `apt_install postgresql` from `scripts/lib.sh` with stand-ins for `dpkg` (whose
/// `--audit` prints `audit`, and whose `--configure -a` fails `busy` times, saying `error`,
/// before it works), `apt-get`, `sleep` and `id` (root). Returns (success, the calls in
/// order, stderr).
fn apt_install(audit: &str, busy: usize, error: &str) -> (bool, Vec<String>, String) {
    let dir = tempdir();
    let fake = |name: &str, body: &str| {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!("#!/bin/bash\necho \"{name} $*\" >> \"$CALLS\"\n{body}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    fake(
        "dpkg",
        &format!(
            r#"case "$1" in
  --audit) printf '%s' "{audit}" ;;
  --configure)
    if [ "$(grep -c '^dpkg --configure' "$CALLS")" -le {busy} ]; then
      echo "{error}" >&2; exit 2
    fi ;;
esac"#
        ),
    );
    fake("apt-get", "");
    fake("sleep", "");
    fake("id", "echo 0");
    let lib = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/lib.sh");
    let out = Command::new("bash")
        .args([
            "-c",
            r#"set -euo pipefail; say() { echo "say: $*" >&2; }; source "$LIB"; apt_install postgresql"#,
        ])
        .env("LIB", lib)
        .env("CALLS", dir.join("calls"))
        .env(
            "PATH",
            format!("{}:{}", dir.display(), std::env::var("PATH").unwrap()),
        )
        .output()
        .unwrap();
    let calls = std::fs::read_to_string(dir.join("calls")).unwrap_or_default();
    (
        out.status.success(),
        calls
            .lines()
            .filter(|c| !c.starts_with("id "))
            .map(str::to_owned)
            .collect(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_interrupted_install_is_finished_first_waiting_while_dpkg_is_busy() {
    // dpkg does not wait for its lock as apt does: on a freshly booted machine, unattended
    // upgrades hold it, and one failed `dpkg --configure -a` used to end `make run`.
    let (ok, calls, err) =
        apt_install("The following packages are only half configured", 2, LOCKED);
    assert!(ok, "{err}");
    let configure = "dpkg --configure -a";
    assert_eq!(
        calls,
        [
            "dpkg --audit",
            configure,
            "sleep 5",
            configure,
            "sleep 5",
            configure,
            "apt-get -o DPkg::Lock::Timeout=300 update -qq",
            "apt-get -o DPkg::Lock::Timeout=300 install -y -qq postgresql",
        ],
        "{err}"
    );
    assert!(
        err.contains("finishing an interrupted package installation")
            && err.matches("trying again in 5 s").count() == 2,
        "{err}"
    );
}

#[test]
fn dpkg_is_left_alone_when_nothing_was_interrupted_and_a_dpkg_that_stays_busy_ends_the_run() {
    let (ok, calls, err) = apt_install("", 0, LOCKED);
    assert!(ok, "{err}");
    assert_eq!(
        calls,
        [
            "dpkg --audit",
            "apt-get -o DPkg::Lock::Timeout=300 update -qq",
            "apt-get -o DPkg::Lock::Timeout=300 install -y -qq postgresql",
        ]
    );
    let (ok, calls, err) = apt_install("half configured", 1000, LOCKED);
    assert!(!ok, "{calls:?}");
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.starts_with("dpkg --configure"))
            .count(),
        60
    );
    assert!(!calls.iter().any(|c| c.starts_with("apt-get")), "{calls:?}");
    assert!(err.contains("stayed taken for 5 minutes"), "{err}");
}

#[test]
fn a_package_that_fails_to_configure_ends_the_run_at_once_with_dpkgs_words() {
    let broken = "dpkg: error processing package postgresql-15 (--configure): subprocess failed";
    let (ok, calls, err) = apt_install("half configured", 1000, broken);
    assert!(!ok, "{calls:?}");
    assert_eq!(calls, ["dpkg --audit", "dpkg --configure -a"]);
    assert!(
        err.contains(broken) && err.contains("finish it by hand"),
        "{err}"
    );
}

const LOCKED: &str = "dpkg: error: dpkg frontend lock was locked by another process";
