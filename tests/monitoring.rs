//! deploy/monitoring/: the alert rules pass `promtool check rules` and their unit tests, the
//! PrometheusRule is generated from the plain rules file, and every metric the rules and the
//! dashboard name is one the service exports.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Output};

use common::{http_get, repo_root, TestApp};

const RULES: &str = "deploy/monitoring/thermostat-rules.yaml";
const OPERATOR_RULES: &str = "deploy/monitoring/prometheusrule.yaml";
const RULE_TESTS: &str = "deploy/monitoring/tests/thermostat-rules.test.yaml";
const DASHBOARD: &str = "deploy/monitoring/grafana-dashboard.json";

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({})\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

/// promtool, installed from Debian's `prometheus` package on first use.
fn promtool() -> String {
    let out = run("bash", &["scripts/monitoring-tools.sh"]);
    assert_ok("scripts/monitoring-tools.sh", &out);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn read(file: &str) -> String {
    std::fs::read_to_string(repo_root().join(file)).unwrap_or_else(|e| panic!("read {file}: {e}"))
}

#[test]
fn rules_pass_promtool_check_and_their_unit_tests() {
    let promtool = promtool();
    assert_ok(
        "promtool check rules",
        &run(&promtool, &["check", "rules", RULES]),
    );
    assert_ok(
        "promtool test rules",
        &run(&promtool, &["test", "rules", RULE_TESTS]),
    );
}

/// promtool cannot read a PrometheusRule: its groups are checked by being the plain file's.
#[test]
fn the_prometheus_rule_is_generated_from_the_rules_file() {
    let out = run("bash", &["scripts/monitoring-rules.sh", "--stdout"]);
    assert_ok("scripts/monitoring-rules.sh --stdout", &out);
    assert!(
        String::from_utf8_lossy(&out.stdout) == read(OPERATOR_RULES),
        "{OPERATOR_RULES} differs from what scripts/monitoring-rules.sh makes of {RULES}: run it"
    );
}

#[test]
fn the_dashboard_is_json_with_a_row_for_each_part() {
    let dashboard: serde_json::Value = serde_json::from_str(&read(DASHBOARD)).expect("JSON");
    let rows: Vec<&str> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    let wanted = [
        "Control loop",
        "API",
        "Subscribers",
        "Database",
        "Broker",
        "Heaters",
    ];
    assert_eq!(rows, wanted, "the dashboard's rows");
}

/// Every `thermostat_…` name in `text`: metric names (alert names are CamelCase, labels and
/// Kafka headers use no underscore after `thermostat`).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("thermostat_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// The names src/telemetry.rs declares (`pub const X: &str = "thermostat_…"`), with the
/// `_bucket`, `_sum` and `_count` series of those it describes as histograms.
fn declared_names() -> BTreeSet<String> {
    let source = read("src/telemetry.rs");
    let mut names = BTreeSet::new();
    for line in source.lines() {
        let Some(decl) = line.strip_prefix("pub const ") else {
            continue;
        };
        let Some((ident, value)) = decl.split_once(": &str = \"") else {
            continue;
        };
        let name = value.trim_end_matches("\";");
        names.insert(name.to_owned());
        let histogram = source
            .split("describe_histogram!(")
            .skip(1)
            .any(|call| call.trim_start().starts_with(&format!("{ident},")));
        if histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// Chosen: the names declared in src/telemetry.rs (counters that have not moved are absent from
/// a scrape), checked against a live scrape: every `thermostat_` series scraped is declared.
#[tokio::test(flavor = "multi_thread")]
async fn rules_and_dashboard_use_only_exported_metrics() {
    let declared = declared_names();
    assert!(
        declared.len() > 30,
        "src/telemetry.rs declares {declared:?}"
    );

    let app = TestApp::spawn().await;
    let (status, scrape) = http_get(app.admin, "/metrics").await;
    assert_eq!(status, 200);
    let scraped: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(metric_names)
        .collect();
    assert!(
        scraped.contains("thermostat_readings_consumed_total"),
        "scrape:\n{scrape}"
    );
    let undeclared: Vec<_> = scraped.difference(&declared).collect();
    assert!(
        undeclared.is_empty(),
        "scraped but not in src/telemetry.rs: {undeclared:?}"
    );

    for file in [RULES, OPERATOR_RULES, RULE_TESTS, DASHBOARD] {
        let used = metric_names(&read(file));
        assert!(!used.is_empty(), "{file} names no metric");
        let unknown: Vec<_> = used.difference(&declared).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics the service does not export: {unknown:?}"
        );
    }
    app.stop().await;
}
