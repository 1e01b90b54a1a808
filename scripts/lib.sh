# lib.sh — helpers shared by the project's scripts: `source` it after defining `say`.
# Running as root: commands run directly; otherwise through sudo, and without sudo the script
# stops and names the command it needed root for.

need_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    say "this needs root and sudo is not installed: $*"
    exit 1
  fi
}

apt_updated=""
# apt_install PACKAGE... — installs Debian packages, running `apt-get update` once first.
apt_install() {
  command -v apt-get >/dev/null || { say "apt-get not found: install $* yourself"; exit 1; }
  # A freshly booted machine's unattended upgrades hold apt's lock for a while: wait for it.
  local lock=(-o DPkg::Lock::Timeout=300)
  if [[ -z $apt_updated ]]; then
    # An install interrupted earlier (Ctrl-C) leaves dpkg half-configured, and apt refuses
    # until it is finished. dpkg itself does not wait for its lock as apt does, so while
    # unattended upgrades hold it, try again every 5 s for up to 5 minutes; any other failure
    # is for a person to look at.
    if [[ -n $(dpkg --audit 2>/dev/null) ]]; then
      say "finishing an interrupted package installation (dpkg --configure -a)"
      local tries=1 out
      until out=$(need_root env DEBIAN_FRONTEND=noninteractive dpkg --configure -a 2>&1); do
        printf '%s\n' "$out" >&2
        if ! grep -qi 'lock' <<<"$out"; then
          say "dpkg --configure -a failed (above): finish it by hand, then run this again"
          exit 1
        fi
        if (( tries++ >= 60 )); then
          say "dpkg's lock stayed taken for 5 minutes (another package manager running?)"
          exit 1
        fi
        say "dpkg is busy (another package manager holds its lock); trying again in 5 s"
        sleep 5
      done
      [[ -z $out ]] || printf '%s\n' "$out" >&2
    fi
    say "running apt-get update"; need_root apt-get "${lock[@]}" update -qq; apt_updated=1
  fi
  say "installing $* with apt-get"
  need_root env DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" install -y -qq "$@" >/dev/null
}

# need_rust — stops with what to do unless a cargo new enough for this workspace is on PATH
# (Debian's own cargo is older than the workspace's rust-version).
need_rust() {
  local want have
  want=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$(dirname "${BASH_SOURCE[0]}")/../Cargo.toml")
  if ! have=$(cargo --version 2>/dev/null); then
    say "cargo not found: install Rust with rustup (https://rustup.rs) and a C compiler"
    say "(apt-get install build-essential), then run this again"
    exit 1
  fi
  have=$(awk '{print $2}' <<<"$have")
  if [[ $(printf '%s\n%s\n' "$want" "$have" | sort -V | head -1) != "$want" ]]; then
    say "cargo $have is older than this workspace's rust-version $want (Debian's own cargo is);"
    say "install Rust with rustup (https://rustup.rs), which puts a current cargo first on PATH"
    exit 1
  fi
  # rustup brings no C compiler and linker, which the build needs (ring, mimalloc, linking).
  if ! command -v cc >/dev/null; then
    say "no C compiler (cc) found, which the build needs"
    apt_install build-essential
  fi
}
