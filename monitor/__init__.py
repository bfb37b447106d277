"""The human side of qmon: QEMU's monitor dialect over the simulated machine."""
