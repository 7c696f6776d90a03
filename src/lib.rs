//! rproxy: a userland port-forwarding proxy and drop-in replacement for docker-proxy, as a
//! library the `rproxy` binary runs (and the tests could reach).
//!
//! Every way in produces [`mapping::Mapping`]s; a [`supervisor::Supervisor`] runs them; the
//! data path ([`tcp`], [`udp`], [`nat`]) serves them without knowing where they came from.
//! `unsafe` lives in [`sys`] alone.

#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod allow;
pub mod backoff;
pub mod bpf;
pub mod control;
pub mod daemon;
pub mod docker;
pub mod engine;
pub mod follower;
pub mod frontend;
pub mod interfaces;
pub mod log;
#[cfg(test)]
mod manual;
pub mod mapping;
pub mod nat;
pub mod output;
pub mod prometheus;
pub mod proxy_protocol;
pub mod settings;
pub mod shim;
pub mod signals;
pub mod stats;
pub mod stop;
pub mod supervisor;
#[allow(unsafe_code)]
pub mod sys;
pub mod systemd;
pub mod takeover;
pub mod tcp;
#[cfg(test)]
mod testing;
pub mod udp;
