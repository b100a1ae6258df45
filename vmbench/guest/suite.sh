#!/bin/sh
# The bench suite in the guest: hil_tests on the kernel's vcan0, as root, with systemd as PID 1.
set -u
B=/mnt/bench
R=$B/results
ip link show vcan0 >/dev/null 2>&1 || ip link add dev vcan0 type vcan
ip link set vcan0 up
cd "$B/src"
export CNGMRV_HIL_CAN=vcan0 CNGMRV_HIL_KIT=sim CNGMRV_HIL_SYSTEMD=1
export CNGMRV_HIL_RECORDING="$B/src/recording.log"
export CNGMRV_HIL_RESULTS="$R"
# pytest-args: CNGMRV_VM_PYTEST_ARGS from the host (e.g. -k to run a few tests).
/opt/bench/venv/bin/python -m pytest hil_tests -v -rs -p no:cacheprovider \
    --junitxml="$R/hil.xml" -o junit_family=xunit1 $(cat "$B/pytest-args" 2>/dev/null)
rc=$?
journalctl -o short-monotonic --no-pager > "$R/journal.txt" 2>&1
exit $rc
