//! Settings: everything a user says, and where they say it, turned into values the rest of
//! the program reads. One group, so a newcomer looking for "where is this flag parsed" finds
//! it here:
//!
//! - [`cli`]: the subcommands' flags (clap), and which mode argv asks for;
//! - [`goflags`]: docker-proxy's single-dash flags, with Go's flag package's rules (and its
//!   ParseBool);
//! - [`config`]: the daemon's flags and config file, as one `Settings`;
//! - [`env`]: the `RPROXY_*` variables (dockerd's per-port processes have no other way in);
//! - [`options`]: one mapping's options, whichever of the above set them.

pub mod cli;
pub mod config;
pub mod env;
pub mod goflags;
pub mod options;
