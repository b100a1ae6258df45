#!/bin/sh
# Runs in the guest (vmbench.service), from the host's 9p share at /mnt/bench:
# install the project as docs/deploy-pi.md says, then run the suite, then power off.
# Progress goes to the serial console as "VMBENCH stage=<name>" lines, which the
# host reads to say where a guest stopped.
set -u
B=/mnt/bench
R=$B/results
mkdir -p "$R"
stage() { echo "VMBENCH stage=$1"; echo "$1" >> "$R/stages"; }
finish() { echo "VMBENCH done rc=$1"; sync; systemctl poweroff --no-block; exit 0; }
phase="$(cat "$B/phase")"

stage "boot-ok $(uname -r)"
uname -r > "$R/kernel"
uname -m > "$R/arch"

if [ "$phase" = "after-power-loss" ]; then
    stage "power-loss-check"
    /opt/bench/venv/bin/python "$B/guest/power_loss.py" check > "$R/power_loss_check.log" 2>&1
    finish $?
fi

if [ "$phase" = "smoke" ]; then
    # The arm64 smoke (vmbench/guest/smoke.sh): the cffi extension built here, then the smoke suite.
    stage smoke-install
    sh "$B/guest/smoke.sh" install > "$R/install.log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
        echo "VMBENCH failed stage=smoke-install rc=$rc"; tail -20 "$R/install.log"
        finish $rc
    fi
    stage smoke
    sh "$B/guest/smoke.sh" run > "$R/smoke.log" 2>&1
    rc=$?
    tail -30 "$R/smoke.log"
    finish $rc
fi

stage install
sh "$B/guest/install.sh" > "$R/install.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
    echo "VMBENCH failed stage=install rc=$rc"; tail -20 "$R/install.log"
    finish $rc
fi

stage suite
sh "$B/guest/suite.sh" > "$R/suite.log" 2>&1
rc=$?
tail -30 "$R/suite.log"

stage full-load
# A measurement, not a test: its figures go into the JSON, its failure only leaves them null.
/opt/bench/venv/bin/python "$B/src/bench/vm_full_load.py" --log "$B/src/busload.log" \
    > "$R/figure-full_load.json" 2> "$R/full_load.log" || echo "VMBENCH full-load failed (see full_load.log)"
cat "$R/figure-full_load.json"

if [ "$phase" = "suite+power-loss" ]; then
    stage power-loss-arm
    # Leaves the agent acquiring and prints the marker the host kills qemu on.
    if /opt/bench/venv/bin/python "$B/guest/power_loss.py" arm > "$R/power_loss_arm.log" 2>&1; then
        echo "VMBENCH power-loss-ready"
        sleep 600
    fi
    echo "VMBENCH failed stage=power-loss-arm"; tail -20 "$R/power_loss_arm.log"
fi
finish $rc
