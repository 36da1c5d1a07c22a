"""instaclone: VMware-style instant clones for QEMU/KVM through libvirt."""

__version__ = "0.1.0"
