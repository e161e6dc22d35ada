#!/bin/sh
# resourced-emu.sh: a device's life as Tizen's resourced drives LKSM, through the sysfs
# files only (echo and cat), so it runs unchanged on an LKSM kernel's /sys/kernel/mm/ksm
# or on an lksmfs mount.
#
# usage: resourced-emu.sh [KSM_DIR [APP_CGROUP]]
#   KSM_DIR     the attribute directory (default: $KSM_SYSFS, else /run/lksm/ksm)
#   APP_CGROUP  the background app's cgroup directory (default: $APP_CGROUP); a cgroup v1
#               freezer dir (freezer.state) or a cgroup v2 dir (cgroup.freeze). Without
#               one the "app to background" step is skipped.
#   DEADLINE    seconds each step may take (environment, default 60)
#
# Steps: boot (one-shot mode, wait for the 3 initial full scans), app to background
# (freeze its cgroup, partial scan), periodic full scan, low-memory full scan, app back
# to foreground (thaw). After each step: pages_sharing in MiB and region_share.
# Exit status: 0 ok, 1 a deadline was missed, 2 usage error.

KSM=${1:-${KSM_SYSFS:-/run/lksm/ksm}}
CG=${2:-${APP_CGROUP:-}}
DEADLINE=${DEADLINE:-60}

say() { echo "resourced-emu: $*"; }
die() { say "FAILED: $*" >&2; exit 1; }

[ -r "$KSM/run" ] || { say "no KSM attributes in $KSM" >&2; exit 2; }
if [ -n "$CG" ] && [ ! -d "$CG" ]; then say "no cgroup $CG" >&2; exit 2; fi

now() { date +%s; }

# rd FILE: the attribute's value (one line)
rd() { cat "$KSM/$1"; }

# wait_for DESCRIPTION COMMAND...: run COMMAND until it succeeds, at most DEADLINE s
wait_for() {
    what=$1; shift
    end=$(( $(now) + DEADLINE ))
    until "$@"; do
        [ "$(now)" -lt "$end" ] || die "deadline ($DEADLINE s) missed: $what"
        sleep 0.1
    done
}

full_scans_at_least() { [ "$(rd full_scans)" -ge "$1" ]; }
one_shot_idle() { [ "$(rd one_shot_scanning)" = 0 ]; }
# a write fails (EINVAL) while an earlier request is still pending: retry it
request() { { echo "$1" > "$KSM/one_shot_scanning"; } 2>/dev/null; }

report() {
    p=$(rd pages_sharing)
    mib=$(( p / 256 ))
    frac=$(( (p % 256) * 100 / 256 ))
    [ "$frac" -lt 10 ] && frac="0$frac"
    line="$1: pages_sharing $mib.$frac MiB ($p pages), full_scans $(rd full_scans)"
    if [ -r "$KSM/region_share" ]; then
        line="$line, region_share $(rd region_share)"
    fi
    say "$line"
}

one_shot() {  # one_shot MODE LABEL
    wait_for "$2: request accepted" request "$1"
    wait_for "$2: scan finished" one_shot_idle
}

frozen() {
    if [ -e "$CG/freezer.state" ]; then
        [ "$(cat "$CG/freezer.state")" = FROZEN ]
    else
        while read -r key val; do
            [ "$key" = frozen ] && [ "$val" = 1 ] && return 0
        done < "$CG/cgroup.events"
        return 1
    fi
}
thawed() { ! frozen; }

freeze() {
    if [ -e "$CG/freezer.state" ]; then echo FROZEN > "$CG/freezer.state"
    else echo 1 > "$CG/cgroup.freeze"; fi
}
thaw() {
    if [ -e "$CG/freezer.state" ]; then echo THAWED > "$CG/freezer.state"
    else echo 0 > "$CG/cgroup.freeze"; fi
}

# 1. boot: one-shot mode; the crawler does its 3 initial full scans by itself
echo 8 > "$KSM/run" || die "boot: echo 8 > run"
wait_for "boot: 3 initial full scans" full_scans_at_least 3
report boot

# 2. an app goes to the background: freeze it, then a partial scan picks it up
if [ -n "$CG" ]; then
    freeze || die "background: cannot freeze $CG"
    wait_for "background: $CG frozen" frozen
    one_shot 1 background
    report background
else
    say "background: skipped (no APP_CGROUP)"
fi

# 3. the periodic full scan resourced runs now and then
before=$(rd full_scans)
one_shot 2 periodic
wait_for "periodic: full_scans counted" full_scans_at_least $(( before + 1 ))
report periodic

# 4. low memory: merge everything we can, now
before=$(rd full_scans)
one_shot 2 lowmem
wait_for "lowmem: full_scans counted" full_scans_at_least $(( before + 1 ))
report lowmem

# 5. the app comes back to the foreground
if [ -n "$CG" ]; then
    thaw || die "foreground: cannot thaw $CG"
    wait_for "foreground: $CG thawed" thawed
    report foreground
fi
say "done"
