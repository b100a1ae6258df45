#!/bin/sh
# The install of docs/deploy-pi.md section 4, from the host's wheelhouse (the guest has no network).
set -eux
B=/mnt/bench
W=$B/wheelhouse
id cngmrv >/dev/null 2>&1 || useradd --system --home /var/lib/cngmrv --shell /usr/sbin/nologin cngmrv
usermod -aG dialout cngmrv
python3 -m venv /opt/cngmrv/venv
/opt/cngmrv/venv/bin/pip install --no-index --find-links "$W" cngmrv
install -d -o cngmrv -g cngmrv -m 0700 /var/lib/cngmrv /var/lib/cngmrv/keys
install -d /etc/cngmrv
python3 "$B/src/hil_tests/hil_support.py" "$B/src/deploy/agent.example.toml" > /etc/cngmrv/agent.toml
cp "$B/src/deploy/cngmrv.service" /etc/systemd/system/
# The one change to the shipped unit: emulation (TCG) makes each Python start tens of
# times slower than on a Pi, and ExecStartPre plus the agent's start share the 60 s.
mkdir -p /etc/systemd/system/cngmrv.service.d
printf '[Service]\nTimeoutStartSec=300\n' > /etc/systemd/system/cngmrv.service.d/vm-bench.conf
sudo_cngmrv() { setpriv --reuid=cngmrv --regid=cngmrv --init-groups "$@"; }
sudo_cngmrv /opt/cngmrv/venv/bin/cngmrv keygen --out /var/lib/cngmrv/keys
sudo_cngmrv /opt/cngmrv/venv/bin/cngmrv config check /etc/cngmrv/agent.toml
# docs/performance.md's socket buffer setting: under emulation the agent's stalls (a
# batch signed and committed) last tens of times longer than on a Pi, and Debian's
# 208 KiB holds about two seconds of the recording's filtered frames.
echo 'net.core.rmem_default = 1048576' > /etc/sysctl.d/80-cngmrv-vm-bench.conf
sysctl -q -p /etc/sysctl.d/80-cngmrv-vm-bench.conf
systemctl daemon-reload

# The bench's own tools beside the agent's venv, not in it: the bus's install stays as shipped.
# (no pip of its own: ensurepip costs a minute under TCG; the agent venv's pip installs into it)
python3 -m venv --without-pip /opt/bench/venv
site=$(/opt/cngmrv/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
bsite=$(/opt/bench/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$site" > "$bsite/cngmrv-venv.pth"
/opt/cngmrv/venv/bin/pip --python /opt/bench/venv/bin/python install --no-index --find-links "$W" pytest
/opt/bench/venv/bin/python -c 'import cngmrv.agent.cli, pytest'
