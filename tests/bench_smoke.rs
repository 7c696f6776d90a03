//! The benchmark harness (benches/proxy/) in its smoke mode: every workload once, briefly,
//! through every proxy. It checks that the harness works (a table row per workload, no failed
//! measurement), not the figures. Needs root and the tools from .ci/install-deps; skips
//! (saying why) without them.
//!
//! The harness is compiled into this test rather than run through `cargo bench`, which would
//! wait for the build directory lock that `cargo test` holds while tests run.

mod common;
#[path = "../benches/proxy/main.rs"]
mod harness;

use std::time::Instant;

#[test]
fn bench_smoke() {
    if !nix::unistd::geteuid().is_root() {
        common::skip(
            "bench_smoke",
            "needs root (network namespaces, a bridge, iptables)",
        );
        return;
    }
    let missing = harness::missing_tools();
    if !missing.is_empty() {
        common::skip(
            "bench_smoke",
            &format!("missing {} (run .ci/install-deps)", missing.join(", ")),
        );
        return;
    }
    let started = Instant::now();
    let report = harness::run(&["--smoke".to_string()]).expect("benchmark harness");
    println!("{}", report.table);
    assert!(
        report.errors.is_empty(),
        "failed measurements:\n{}",
        report.errors.join("\n")
    );
    let expected = [
        "tcp-bulk-1",
        "tcp-bulk-1-rev",
        "tcp-bulk-4",
        "tcp-bulk-4-rev",
        "remote-bulk-1",
        "remote-bulk-4",
        "rr",
        "rr-pinned",
        "conn-rate",
        "conn-fixed",
        "udp-bulk",
        "udp-bulk-rev",
        "udp-500m",
        "udp-flows",
        "idle-conns",
        "ports",
    ];
    assert_eq!(report.workloads, expected);
    for w in expected {
        let rows: Vec<&str> = report
            .table
            .lines()
            .filter(|l| l.starts_with(&format!("| {w} |")))
            .collect();
        assert!(!rows.is_empty(), "no table row for {w}:\n{}", report.table);
        for row in rows {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            // | workload | metric | direct | rproxy | docker-proxy | socat | ratios… |
            let rproxy = cells[4];
            assert!(rproxy.parse::<f64>().is_ok(), "no rproxy figure in {row:?}");
            assert!(!row.contains("ERR"), "failed measurement in {row:?}");
            if w.starts_with("remote-") {
                // | … | socat | rproxy-daemon | rproxy-nat |: checked to be kernel-served.
                let nat = cells[8];
                assert!(
                    nat.parse::<f64>().is_ok(),
                    "no rproxy-nat figure in {row:?}"
                );
            }
        }
    }
    eprintln!("bench_smoke: {:.0?}", started.elapsed());
}
