//! rproxy: a userland port-forwarding proxy and drop-in replacement for docker-proxy.
//!
//! argv → mode → run. Today the one mode is docker-proxy's command line (Go-style flags).

mod docker;
mod goflags;
mod log;
mod mapping;
mod signals;
mod sys;
mod tcp;
mod udp;

fn main() {
    // Before anything opens a descriptor.
    let inherited = docker::Inherited::take();
    let mut args = std::env::args();
    let prog = args.next().unwrap_or_else(|| "rproxy".into());
    let args: Vec<String> = args.collect();
    log::init();
    std::process::exit(docker::main(&prog, &args, inherited));
}
