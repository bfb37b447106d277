"""QEMU's savevm protocol: the container (savevm.py), the ram live section (ram.py), records."""
