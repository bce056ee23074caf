#!/usr/bin/env bash
# What tests/test_deploy_files.py needs beyond the project's venv: a Compose implementation to
# validate deploy/compose.yaml (Debian's `docker-compose`, 1.29: `config` needs no engine) and
# nginx to `nginx -t` deploy/nginx.conf (also the load balancer of the replica benchmark).
# Debian's nginx package is installed without starting it. `systemd-analyze` (systemd) is
# expected on the machine. Safe to run again.
set -euo pipefail

missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: the deploy checks need ${missing[*]}: install them (no apt-get here)" >&2
  exit 1
fi
sudo=""
[[ "$(id -u)" -ne 0 ]] && sudo="sudo"
$sudo apt-get update -qq
# policy-rc.d 101: the packages' scripts start no service (nginx would take port 80).
policy=/usr/sbin/policy-rc.d
made_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee $policy >/dev/null
  $sudo chmod +x $policy
  made_policy=1
fi
trap 'if [[ $made_policy -eq 1 ]]; then $sudo rm -f $policy; fi' EXIT
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
