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
        "host-bulk-1",
        "host-bulk-1-rev",
        "host-bulk-4",
        "host-bulk-4-rev",
        "host-rr",
        "host-rr-pinned",
        "host-conn-rate",
        "host-udp-bulk",
    ];
    assert_eq!(report.workloads, expected);
    let cells = |line: &str| -> Vec<String> {
        line.split('|')
            .map(|c| c.trim().to_string())
            .collect::<Vec<_>>()
    };
    let header = report
        .table
        .lines()
        .find(|l| l.starts_with("| workload |"))
        .map(cells)
        .unwrap_or_else(|| panic!("no table header:\n{}", report.table));
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no {name} column in {header:?}"))
    };
    for w in expected {
        let rows: Vec<&str> = report
            .table
            .lines()
            .filter(|l| l.starts_with(&format!("| {w} |")))
            .collect();
        assert!(!rows.is_empty(), "no table row for {w}:\n{}", report.table);
        for row in rows {
            let cells = cells(row);
            let figure = |name: &str| {
                assert!(
                    cells[column(name)].parse::<f64>().is_ok(),
                    "no {name} figure in {row:?}"
                )
            };
            figure("rproxy");
            assert!(!row.contains("ERR"), "failed measurement in {row:?}");
            if w.starts_with("remote-") {
                // Checked to have been served by the kernel rules.
                figure("rproxy-nat");
            }
            if w.starts_with("host-") {
                // Checked to have been served by the socket hooks.
                figure("rproxy-socket");
                figure("direct");
            }
        }
    }
    eprintln!("bench_smoke: {:.0?}", started.elapsed());
}
