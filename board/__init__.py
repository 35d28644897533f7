"""The device (to come): identity, write-once key slots, boarding and credential storage, A/B slots,
the U-Boot environment, the SMP serial provisioning responder, the simulated board and bootloader, and
the `mers-board` CLI."""
