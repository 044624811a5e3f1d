//! End-to-end scenarios live in `tests/e2e/`: they start the real binaries on loopback
//! with real certificates and check disks byte for byte.
