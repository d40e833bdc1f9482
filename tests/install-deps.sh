#!/usr/bin/env bash
# Installs the Debian packages whose programs the tests start (the harness runs private
# servers from them on loopback; nothing is pre-started). Arguments: PROGRAM=PACKAGE pairs.
# PROGRAM is a name looked up on PATH, or an absolute path pattern for a program Debian
# keeps off PATH (PostgreSQL's initdb and postgres live in /usr/lib/postgresql/VERSION/bin;
# only the client's psql is on PATH): `/usr/lib/postgresql/*/bin/initdb=postgresql`.
# As root with apt, missing packages are installed; otherwise this fails naming them.
set -euo pipefail

installed() {
  if [[ $1 == /* ]]; then
    local file
    # Unquoted on purpose: the pattern expands to the matching paths (or stays as it is).
    for file in $1; do [[ -x $file ]] && return 0; done
    return 1
  fi
  # Debian puts some servers in /usr/sbin (nats-server), which is not on a user's PATH.
  command -v "$1" >/dev/null 2>&1 || [[ -x /usr/sbin/$1 ]]
}

missing=()
for pair in "$@"; do
  program=${pair%%=*}; package=${pair#*=}
  installed "$program" || missing+=("$package")
done
(( ${#missing[@]} == 0 )) && exit 0
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "installing Debian packages the tests need: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
else
  echo "the tests need these Debian packages: ${missing[*]}" >&2
  echo "install them with: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
