#!/usr/bin/env bash
# Install edge-inspect on an edge box as a systemd service. Idempotent: run it again after
# `git pull` to upgrade; it never overwrites /etc/edge-inspect/config.toml.
#
#   sudo systemd/install.sh [--udev]        install (and the udev rules)
#   systemd/install.sh --dry-run            print every action, change nothing
#   systemd/install.sh --root DIR           install into DIR (testing, image builds): every
#                                           path is prefixed; useradd, chown, pip, udevadm
#                                           and systemctl are skipped (--with-venv: do build
#                                           the venv under DIR)
#
# What it does: a system user edge-inspect (in dialout/video/plugdev where they exist);
# /etc/edge-inspect/config.toml from config.example.toml if absent; /var/lib/edge-inspect/
# {models,images}; a venv at /opt/edge-inspect/venv with the RUNTIME extra only (never
# TensorFlow); the unit in /etc/systemd/system; daemon-reload; enable (not start: deploy a
# model first, see docs/deploy.md).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SERVICE=edge-inspect
SVC_USER=edge-inspect
PYTHON=${PYTHON:-python3}
ROOT=""
DRY=0
UDEV=0
WITH_VENV=0
ENABLE=1

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "install.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --udev) UDEV=1 ;;
        --with-venv) WITH_VENV=1 ;;
        --no-enable) ENABLE=0 ;;
        --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift ;;
        --root=*) ROOT=${1#--root=} ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PYTHON=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done

if [ -n "$ROOT" ]; then
    case "$ROOT" in /*) ;; *) ROOT="$PWD/$ROOT" ;; esac
    ROOT=${ROOT%/}
    [ "$ROOT" != "" ] || die "--root / is the real system; leave --root out instead"
fi
if [ -z "$ROOT" ] && [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo), or use --dry-run / --root DIR"
fi

ETC=$ROOT/etc/edge-inspect
STATE=$ROOT/var/lib/edge-inspect
OPT=$ROOT/opt/edge-inspect
VENV=$OPT/venv
UNIT_DST=$ROOT/etc/systemd/system/$SERVICE.service
RULES_DST=$ROOT/etc/udev/rules.d/99-edge-inspect.rules
CONFIG=$ETC/config.toml

say() { echo "$*"; }
# a command line as text, quoted only where the shell needs it
show() {
    local a out=""
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./=:,@+%-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
    done
    echo "${out% }"
}
# run CMD...: print it, then run it (not under --dry-run)
run() {
    if [ "$DRY" = 1 ]; then
        echo "would run: $(show "$@")"
    else
        echo "+ $(show "$@")"
        "$@"
    fi
}
# skip WHY CMD...: a step --root leaves out, printed so nothing happens silently
skip() {
    local why=$1; shift
    echo "skipped ($why): $(show "$@")"
}

# ownership flags for install(1): only on the real system (the user may not exist under --root)
own() { if [ -z "$ROOT" ]; then echo "-o $1 -g $2"; fi; }

# ensure_dir PATH MODE OWNER GROUP
ensure_dir() {
    local path=$1 mode=$2 owner=$3 group=$4
    if [ -d "$path" ] && [ "$(stat -c %a "$path")" = "${mode#0}" ] \
        && { [ -n "$ROOT" ] || [ "$(stat -c %U:%G "$path")" = "$owner:$group" ]; }; then
        say "ok: $path"
        return
    fi
    # shellcheck disable=SC2046
    run install -d -m "$mode" $(own "$owner" "$group") "$path"
}

# install_file SRC DST MODE OWNER GROUP -> sets CHANGED=1 when DST was (or would be) written
install_file() {
    local src=$1 dst=$2 mode=$3 owner=$4 group=$5
    CHANGED=0
    if [ -f "$dst" ] && cmp -s "$src" "$dst" && [ "$(stat -c %a "$dst")" = "${mode#0}" ]; then
        say "ok: $dst (unchanged)"
        return
    fi
    # shellcheck disable=SC2046
    run install -D -m "$mode" $(own "$owner" "$group") "$src" "$dst"
    CHANGED=1
}

echo "edge-inspect install from $REPO${ROOT:+ into root $ROOT}$( [ "$DRY" = 1 ] && echo ' (dry run: nothing is changed)')"

# --- 1. the service user ---------------------------------------------------------------
groups=()
for g in dialout video plugdev; do
    if getent group "$g" >/dev/null; then groups+=("$g"); else say "note: no group $g on this system"; fi
done
group_list=$(IFS=,; echo "${groups[*]:-}")
if [ -n "$ROOT" ]; then
    skip "--root" useradd --system --user-group --home-dir /var/lib/edge-inspect --no-create-home \
        --shell /usr/sbin/nologin ${group_list:+--groups "$group_list"} "$SVC_USER"
elif id -u "$SVC_USER" >/dev/null 2>&1; then
    say "ok: user $SVC_USER exists"
    for g in "${groups[@]}"; do
        if ! id -nG "$SVC_USER" | tr ' ' '\n' | grep -qx "$g"; then
            run usermod -a -G "$g" "$SVC_USER"
        fi
    done
else
    run useradd --system --user-group --home-dir /var/lib/edge-inspect --no-create-home \
        --shell /usr/sbin/nologin ${group_list:+--groups "$group_list"} "$SVC_USER"
fi

# --- 2. directories and the config ----------------------------------------------------------
ensure_dir "$ETC" 0750 root "$SVC_USER"
ensure_dir "$STATE" 0750 "$SVC_USER" "$SVC_USER"
ensure_dir "$STATE/models" 0750 "$SVC_USER" "$SVC_USER"
ensure_dir "$STATE/images" 0750 "$SVC_USER" "$SVC_USER"
ensure_dir "$OPT" 0755 root root

if [ -e "$CONFIG" ]; then
    say "ok: $CONFIG exists, kept as it is (compare with $REPO/config.example.toml after upgrades)"
else
    # shellcheck disable=SC2046
    run install -m 0640 $(own root "$SVC_USER") "$REPO/config.example.toml" "$CONFIG"
fi
if [ -f "$REPO/docs/deploy.md" ]; then
    install_file "$REPO/docs/deploy.md" "$OPT/docs/deploy.md" 0644 root root
fi

# --- 3. the venv: runtime extra only --------------------------------------------------------
if [ -n "$ROOT" ] && [ "$WITH_VENV" = 0 ]; then
    skip "--root without --with-venv" "$PYTHON" -m venv "$VENV"
    skip "--root without --with-venv" "$VENV/bin/pip" install "$REPO[runtime]"
else
    if [ -x "$VENV/bin/python" ]; then
        say "ok: venv $VENV exists (upgrading the package in it)"
    else
        run "$PYTHON" -m venv "$VENV"
    fi
    # Non-editable install of this checkout with the edge-box dependencies. Offline boxes:
    # PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels in the environment.
    run "$VENV/bin/pip" install --disable-pip-version-check "$REPO[runtime]"
    if [ "$DRY" = 0 ] && "$VENV/bin/python" -c \
        'import importlib.util, sys; sys.exit(importlib.util.find_spec("tensorflow") is None)'; then
        echo "install.sh: warning: TensorFlow is installed in $VENV; the edge box needs only" \
             "the runtime extra ('$VENV/bin/pip uninstall tensorflow tensorflow-cpu')" >&2
    fi
fi

# --- 4. the unit and the udev rules ---------------------------------------------------------
install_file "$REPO/systemd/$SERVICE.service" "$UNIT_DST" 0644 root root
UNIT_CHANGED=$CHANGED

if [ "$UDEV" = 1 ]; then
    install_file "$REPO/systemd/99-edge-inspect.rules" "$RULES_DST" 0644 root root
    if [ -n "$ROOT" ]; then
        skip "--root" udevadm control --reload
        skip "--root" udevadm trigger
    elif [ "$CHANGED" = 1 ]; then
        if command -v udevadm >/dev/null; then
            run udevadm control --reload
            run udevadm trigger --action=add --subsystem-match=tty --subsystem-match=usb \
                --subsystem-match=apex
        else
            say "note: udevadm not found; the rules apply at the next boot"
        fi
    fi
fi

# --- 5. systemd -------------------------------------------------------------------------------
if [ -n "$ROOT" ]; then
    skip "--root" systemctl daemon-reload
    [ "$ENABLE" = 1 ] && skip "--root" systemctl enable "$SERVICE.service"
elif ! command -v systemctl >/dev/null; then
    say "note: systemctl not found; enable $UNIT_DST with your init system"
else
    if [ -d /run/systemd/system ]; then
        if [ "$UNIT_CHANGED" = 1 ] || [ "$DRY" = 1 ]; then run systemctl daemon-reload; fi
    else
        say "note: systemd is not running here (container/chroot?); skipping daemon-reload"
    fi
    if [ "$ENABLE" = 1 ]; then
        if systemctl is-enabled --quiet "$SERVICE.service" 2>/dev/null; then
            say "ok: $SERVICE.service is enabled"
        else
            run systemctl enable "$SERVICE.service"
        fi
    fi
fi

cat <<EOF
done. Next:
  1. edit $CONFIG   (check: $VENV/bin/edge-inspect check-config $CONFIG)
  2. deploy a model: $VENV/bin/edge-inspect deploy-model /path/to/bundle --no-reload
  3. systemctl start $SERVICE; systemctl status $SERVICE; journalctl -u $SERVICE -f
EOF
