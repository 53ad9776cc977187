#!/usr/bin/env bash
# Install the Bedside edge agent on Debian or Raspberry Pi OS, enrol it with a token, and enable
# its systemd service. Run as root from a Bedside checkout (or release tarball):
#
#   sudo deploy/install-agent.sh --token-file /media/usb/clinic-7.token
#
# What it does (each step is skipped when already done, so running it twice is harmless):
#   1. a system user 'bedside' (no login shell, no home of its own);
#   2. a virtual environment in /opt/bedside/venv with Bedside (edge extra; with training
#      unless --inference-only: torch is pinned to 2.13.0, CPU build);
#   3. /etc/bedside (configuration, keys, certificates; 0700, owned by the user) and
#      /var/lib/bedside (records, ledger, models; 0700);
#   4. 'bedside edge enroll --token-file' as that user: keys made on this device, its broker
#      certificate, the pinned aggregator key, the current model, /etc/bedside/agent.toml;
#   5. the hardened unit bedside-agent.service, enabled and started.
#
# Options:
#   --token-file FILE   the token (or offline bundle) from the data team ('aggregator invite')
#   --inference-only    no local training: no torch (an edge device that only serves the model)
#   --encrypt-store     encrypt the records and the outbox at rest (SQLCipher; key in
#                       /etc/bedside/keys/store.key, readable by the service user only)
#   --from SPEC         what pip installs (default: this checkout); e.g. a wheel file
#   --user NAME         the service user (default: bedside)
#   --root DIR          install into DIR instead of / (images, tests): no user is created,
#                       nothing is started, the unit is enabled with 'systemctl --root'
#   --python PYTHON     the interpreter for the venv (default: python3; 3.11 or newer)
#   --no-start          enable the service but do not start it
set -euo pipefail

die() { echo "install-agent: error: $*" >&2; exit 2; }
say() { echo "install-agent: $*"; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
TOKEN_FILE="" ; FROM="" ; SVC_USER="bedside" ; ROOT="/" ; PYTHON="python3"
EXTRAS="edge,train" ; START=1 ; ENCRYPT=0

while [ $# -gt 0 ]; do
  case "$1" in
    --token-file) TOKEN_FILE="${2:-}"; shift 2 ;;
    --inference-only) EXTRAS="edge"; shift ;;
    --encrypt-store) ENCRYPT=1; shift ;;
    --from) FROM="${2:-}"; shift 2 ;;
    --user) SVC_USER="${2:-}"; shift 2 ;;
    --root) ROOT="${2:-}"; shift 2 ;;
    --python) PYTHON="${2:-}"; shift 2 ;;
    --no-start) START=0; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[ -n "$ROOT" ] || die "--root needs a directory"
ROOT="$(realpath -m "$ROOT")"
[ "$ROOT" = "/" ] && R="" || R="$ROOT"
VENV="$R/opt/bedside/venv"
ETC="$R/etc/bedside"
DATA="$R/var/lib/bedside"
UNIT_DIR="$R/etc/systemd/system"
[ -f "$HERE/systemd/bedside-agent.service" ] || die "run this script from a Bedside checkout \
(deploy/systemd/bedside-agent.service is missing next to it)"
[ -n "$FROM" ] || FROM="$REPO"

# -- the platform ---------------------------------------------------------------------------------
if [ -r /etc/os-release ]; then
  . /etc/os-release
  case " ${ID:-} ${ID_LIKE:-} " in
    *" debian "*|*" raspbian "*) ;;
    *) say "warning: this is ${PRETTY_NAME:-an unknown system}, not Debian or Raspberry Pi OS; \
going on" ;;
  esac
fi
if [ -z "$R" ] && [ "$(id -u)" != 0 ]; then
  die "run as root (sudo): it creates a user, /etc/bedside and a systemd unit"
fi
command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python 3.11 or newer \
(apt-get install python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PYTHON is $("$PYTHON" -V 2>&1); Bedside needs Python 3.11 or newer"
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  if [ -z "$R" ] && command -v apt-get >/dev/null; then
    say "installing python3-venv"
    apt-get install -y -qq python3-venv >/dev/null
  else
    die "the venv module is missing; install python3-venv"
  fi
fi

# -- 1. the service user --------------------------------------------------------------------------
if ! id -u "$SVC_USER" >/dev/null 2>&1; then
  [ -z "$R" ] || die "user $SVC_USER does not exist (with --root, name an existing --user)"
  say "creating system user $SVC_USER"
  useradd --system --home-dir /var/lib/bedside --no-create-home --shell /usr/sbin/nologin \
    "$SVC_USER"
fi
as_user() {  # run a command as the service user (directly when we are that user)
  if [ "$(id -un)" = "$SVC_USER" ]; then "$@"
  elif command -v runuser >/dev/null; then runuser -u "$SVC_USER" -- "$@"
  else setpriv --reuid="$SVC_USER" --regid="$SVC_USER" --init-groups -- "$@"; fi
}

# -- 2. the virtual environment -------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if [[ ",$EXTRAS," == *",train,"* ]] && ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  # first, and pinned: anything else pulls a CUDA build of several GB
  if [ "$(uname -m)" = "x86_64" ]; then
    TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
  fi
  say "installing torch 2.13.0 (CPU)"
  "${PIP[@]}" install "torch==2.13.0" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
fi
if [ "$ENCRYPT" = 1 ] && ! "$VENV/bin/python" -c 'import sqlcipher3' 2>/dev/null; then
  if [ "$(uname -m)" = "x86_64" ]; then
    EXTRAS="$EXTRAS,encryption"  # a binary wheel with SQLCipher inside
  elif [ -z "$R" ] && command -v apt-get >/dev/null; then
    say "building sqlcipher3 against Debian's libsqlcipher (no binary wheel for $(uname -m))"
    apt-get install -y -qq libsqlcipher-dev python3-dev build-essential >/dev/null
    "${PIP[@]}" install sqlcipher3
  else
    die "--encrypt-store on $(uname -m): install libsqlcipher-dev and pip install sqlcipher3"
  fi
fi
if [ -d "$FROM" ]; then SPEC="$FROM[$EXTRAS]"; else SPEC="$FROM"; fi
say "installing Bedside ($EXTRAS) from $FROM"
"${PIP[@]}" install --upgrade "$SPEC"
"$VENV/bin/bedside" --version >/dev/null || die "the installed bedside does not run"

# -- 3. directories -------------------------------------------------------------------------------
install -d -m 0700 -o "$SVC_USER" -g "$(id -gn "$SVC_USER")" "$ETC" "$DATA"

# -- 4. enrollment --------------------------------------------------------------------------------
if [ -f "$ETC/agent.toml" ]; then
  say "already enrolled ($ETC/agent.toml): enrollment skipped"
else
  [ -n "$TOKEN_FILE" ] || die "--token-file is required for the first installation (ask the \
data team: bedside aggregator invite --device-id ID)"
  [ -r "$TOKEN_FILE" ] || die "--token-file $TOKEN_FILE cannot be read"
  # the service user reads a private copy (the original may sit on removable media)
  COPY="$(mktemp "$ETC/.token.XXXXXX")"
  trap 'rm -f "$COPY"' EXIT
  cat "$TOKEN_FILE" > "$COPY"
  chown "$SVC_USER" "$COPY"
  chmod 0600 "$COPY"
  say "enrolling"
  ENROLL_ARGS=(--token-file "$COPY" --dir "$ETC" --data-dir "$DATA")
  [ "$ENCRYPT" = 1 ] && ENROLL_ARGS+=(--encrypt-store)
  as_user "$VENV/bin/bedside" edge enroll "${ENROLL_ARGS[@]}" \
    || die "enrollment failed (the message above says why); nothing is enabled"
  rm -f "$COPY"
fi

# -- 5. the service -------------------------------------------------------------------------------
mkdir -p "$UNIT_DIR"
UNIT="$UNIT_DIR/bedside-agent.service"
NEW="$(sed -e "s/^User=bedside$/User=$SVC_USER/" -e "s/^Group=bedside$/Group=$(id -gn "$SVC_USER")/" \
  "$HERE/systemd/bedside-agent.service")"
if [ ! -f "$UNIT" ] || [ "$(cat "$UNIT")" != "$NEW" ]; then
  say "installing $UNIT"
  printf '%s\n' "$NEW" > "$UNIT"
  chmod 0644 "$UNIT"
fi
if [ -n "$R" ]; then
  if command -v systemctl >/dev/null; then
    systemctl --root="$ROOT" enable bedside-agent.service >/dev/null 2>&1 \
      || die "systemctl --root=$ROOT enable failed"
  else
    mkdir -p "$UNIT_DIR/multi-user.target.wants"
    ln -sfn /etc/systemd/system/bedside-agent.service \
      "$UNIT_DIR/multi-user.target.wants/bedside-agent.service"
  fi
  say "enabled bedside-agent.service in $ROOT (not started: not this machine's root)"
elif [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable bedside-agent.service
  if [ "$START" = 1 ]; then
    systemctl restart bedside-agent.service
    say "started: journalctl -u bedside-agent -f shows what it does"
  fi
else
  say "systemd is not running here: start the agent with $VENV/bin/bedside edge run --config \
$ETC/agent.toml"
fi
say "done. Status: sudo -u $SVC_USER $VENV/bin/bedside edge status --config $ETC/agent.toml"
say "Before the first round, store this clinic's records: sudo -u $SVC_USER $VENV/bin/bedside \
edge ingest FILE.csv --config $ETC/agent.toml"
