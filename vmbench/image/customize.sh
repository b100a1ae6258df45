#!/bin/sh
# mmdebstrap --customize-hook: turns the fresh Debian tree ($1) into the bench guest.
# Everything specific to one run (the project, the tests) comes later over the 9p share.
set -eu
root="$1"
here="$(dirname "$0")"

echo cngmrv-vm > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 cngmrv-vm\n' > "$root/etc/hosts"
# The root filesystem is the virtio disk qemu is given; the share is the host's run folder.
cat > "$root/etc/fstab" <<'FSTAB'
/dev/vda  /           ext4  rw,errors=remount-ro  0 1
bench     /mnt/bench  9p    trans=virtio,version=9p2000.L,msize=262144,nofail  0 0
FSTAB
mkdir -p "$root/mnt/bench"
chroot "$root" passwd -d root >/dev/null

# SocketCAN and the share's transport, loaded at boot.
printf 'can\ncan_raw\nvcan\n9p\n9pnet_virtio\n' > "$root/etc/modules-load.d/vmbench.conf"

# The one unit that runs the bench: it starts the run's script from the share.
install -m 0644 "$here/vmbench.service" "$root/etc/systemd/system/vmbench.service"
chroot "$root" systemctl enable vmbench.service
# Nothing else competes for the console or the CPU (TCG has little to spare).
chroot "$root" systemctl mask serial-getty@ttyS0.service getty@tty1.service \
    systemd-logind.service e2scrub_reap.service \
    apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true
# A journal that survives a reset, as docs/deploy-pi.md allows, for the power-loss test.
mkdir -p "$root/var/log/journal"

rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
