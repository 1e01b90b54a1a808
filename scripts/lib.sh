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
  if [[ -z $apt_updated ]]; then say "running apt-get update"; need_root apt-get update -qq; apt_updated=1; fi
  say "installing $* with apt-get"
  need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
