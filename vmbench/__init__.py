"""The virtual bench: a Debian guest under qemu with a kernel SocketCAN vcan0 and systemd.

``vmbench.image`` builds and caches the guest's disk image, ``vmbench.guest``
boots it and runs the suite in it, ``vmbench/guest/`` holds what runs inside.
``python bench/vm_bench.py --json`` and ``make vm-bench`` drive it; see
docs/hil-runbook.md, *The virtual bench*.
"""
