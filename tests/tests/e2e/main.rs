//! End-to-end scenarios over the real binaries, real TLS and real files.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod auth;
mod block_device;
mod crash;
mod failback;
mod faults;
mod groups;
mod harness;
mod lifecycle;
mod metrics;
mod nbd;
mod plans;
mod protect;
mod web;
