#!/usr/bin/env bash
# Installs the Debian packages whose programs the tests start (the harness runs private
# servers from them on loopback; nothing is pre-started). Arguments: PROGRAM=PACKAGE pairs.
# As root with apt, missing packages are installed; otherwise this fails naming them.
set -euo pipefail
missing=()
for pair in "$@"; do
  program=${pair%%=*}; package=${pair#*=}
  command -v "$program" >/dev/null 2>&1 || missing+=("$package")
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
