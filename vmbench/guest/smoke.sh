#!/bin/sh
# The arm64 smoke (make vm-bench-arm64), in the guest from the host's 9p share:
#   install  the project from its sdist, as docs/deploy-pi.md says but building the
#            cffi extension here with the guest's C compiler (no wheel from the host)
#   run      cngmrv sim --duration 60, cngmrv verify of its batches, cngmrv replay of
#            the real recording, and the C integrator's tests
set -eux
B=/mnt/bench
W=$B/wheelhouse
R=$B/results
V=/opt/cngmrv/venv
case "$1" in
install)
    python3 -m venv $V
    # pip builds the sdist in an isolated env from the wheelhouse (setuptools, wheel, cffi).
    # With the office (run.py's SMOKE_EXTRAS): cngmrv sim runs the ingest beside the agent.
    sdist=$(ls "$B"/src/cngmrv-*.tar.gz)
    $V/bin/pip install --no-index --find-links "$W" "cngmrv[office] @ file://$sdist"
    $V/bin/pip install --no-index --find-links "$W" pytest hypothesis
    # The extension is the guest's own build: an aarch64 ELF under the venv.
    so=$($V/bin/python -c 'import cngmrv.native._integrator as m; print(m.__file__)')
    od -An -tx1 -j18 -N2 "$so" | tee "$R/extension_machine"
    ;;
run)
    work=$(mktemp -d)
    start=$(date +%s)
    $V/bin/cngmrv sim --duration 60 --workdir "$work/sim" --json > "$R/sim.json"
    $V/bin/cngmrv verify --db "$work/sim/store.sqlite" --pubkey "$work/sim/keys/device.pub" \
        --json > "$R/verify.json"
    $V/bin/cngmrv replay "$B/src/recording.log" --json --no-progress > "$R/replay.json"
    cd "$B/src"
    $V/bin/python -m pytest -v -p no:cacheprovider --junitxml="$R/hil.xml" -o junit_family=xunit1 \
        tests/test_integrator.py tests/test_integrator_kinds.py
    echo "smoke seconds: $(( $(date +%s) - start ))"
    ;;
esac
