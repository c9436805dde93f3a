//! deploy/monitoring/: the alert rules pass `promtool check rules` and their unit tests, the
//! PrometheusRule is generated from the plain rules file, and every metric the rules and the
//! dashboard name is one the service exports.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
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
    let out = run(
        "bash",
        &["scripts/debian-tools.sh", "promtool", "prometheus"],
    );
    assert_ok("scripts/debian-tools.sh", &out);
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

/// The constants src/telemetry.rs declares (`pub const X: &str = "thermostat_…"`): (X, name).
fn declared_consts() -> Vec<(String, String)> {
    read("src/telemetry.rs")
        .lines()
        .filter_map(|line| line.strip_prefix("pub const "))
        .filter_map(|decl| decl.split_once(": &str = \""))
        .map(|(ident, value)| (ident.to_owned(), value.trim_end_matches("\";").to_owned()))
        .collect()
}

/// The declared names, with the `_bucket`, `_sum` and `_count` series of those described as
/// histograms.
fn declared_names() -> BTreeSet<String> {
    let source = read("src/telemetry.rs");
    let mut names = BTreeSet::new();
    for (ident, name) in declared_consts() {
        let histogram = source
            .split("describe_histogram!(")
            .skip(1)
            .any(|call| call.trim_start().starts_with(&format!("{ident},")));
        if histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names.insert(name);
    }
    names
}

fn rust_files(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("read src/").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(std::fs::read_to_string(&path).expect("read source"));
        }
    }
}

/// The labels src/ sets on each declared metric: `"key" =>` in a `counter!`/`gauge!`/
/// `histogram!` call and `.label("key", …)` on a `telemetry::Count`, read up to the next `;`.
fn exported_labels() -> BTreeMap<String, BTreeSet<String>> {
    let mut sources = Vec::new();
    rust_files(&repo_root().join("src"), &mut sources);
    let declared = declared_names();
    let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (ident, name) in declared_consts() {
        let keys = labels.entry(name.clone()).or_default();
        for source in &sources {
            for (at, _) in source.match_indices(ident.as_str()) {
                let before = source[..at].chars().next_back().unwrap_or(' ');
                let after = source[at + ident.len()..].chars().next().unwrap_or(' ');
                let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '"';
                if word(before) || word(after) {
                    continue;
                }
                let rest = &source[at + ident.len()..];
                let end = [";", "telemetry::", "Count::new("]
                    .iter()
                    .filter_map(|stop| rest.find(stop))
                    .min()
                    .unwrap_or(rest.len());
                let call = &rest[..end];
                for (i, _) in call.match_indices("\" =>") {
                    let start = call[..i].rfind('"').expect("a string before =>");
                    keys.insert(call[start + 1..i].to_owned());
                }
                for piece in call.split(".label(\"").skip(1) {
                    keys.insert(piece[..piece.find('"').unwrap_or(0)].to_owned());
                }
            }
        }
        let keys = keys.clone();
        if !declared.contains(&format!("{name}_bucket")) {
            continue;
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            let mut keys = keys.clone();
            if suffix == "_bucket" {
                keys.insert("le".into());
            }
            labels.insert(format!("{name}{suffix}"), keys);
        }
    }
    labels
}

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

/// Every label key in `metric{key="…", …}` selectors of `text`, with its metric.
fn selector_labels(text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for name in metric_names(text) {
        let opening = format!("{name}{{");
        for (at, _) in text.match_indices(&opening) {
            let body = &text[at + opening.len()..];
            let body = &body[..body.find('}').unwrap_or(0)];
            for matcher in body.split(',').filter(|m| !m.trim().is_empty()) {
                let key = matcher.split(['=', '!']).next().unwrap_or("").trim();
                found.push((name.clone(), key.to_owned()));
            }
        }
    }
    found
}

/// Every label in `by (…)` and `without (…)` clauses of `text`.
fn grouping_labels(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for clause in ["by (", "without ("] {
        for piece in text.split(clause).skip(1) {
            let list = &piece[..piece.find(')').unwrap_or(0)];
            found.extend(
                list.split(',')
                    .map(|l| l.trim().to_owned())
                    .filter(|l| !l.is_empty()),
            );
        }
    }
    found
}

/// Chosen: the names declared in src/telemetry.rs and the labels src/ sets on them (counters that
/// have not moved are absent from a scrape), checked against a live scrape's names and labels.
#[tokio::test(flavor = "multi_thread")]
async fn rules_and_dashboard_use_only_exported_metrics() {
    let declared = declared_names();
    let labels = exported_labels();
    assert_eq!(
        labels["thermostat_commands_emitted_total"],
        BTreeSet::from(["command".to_owned(), "reason".to_owned()]),
        "reading the labels src/ sets"
    );
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
    for (metric, key) in selector_labels(&scrape) {
        assert!(
            labels
                .get(&metric)
                .is_some_and(|known| known.contains(&key)),
            "scraped {metric} with label {key:?}, not found in src/: {labels:?}"
        );
    }
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
        let text = read(file);
        for (metric, key) in selector_labels(&text) {
            let known = &labels[&metric];
            assert!(
                known.contains(&key) || TARGET_LABELS.contains(&key.as_str()),
                "{file} selects {metric} by label {key:?}, which src/ never sets on it ({known:?})"
            );
        }
        let all: BTreeSet<&String> = labels.values().flatten().collect();
        for key in grouping_labels(&text) {
            assert!(
                all.contains(&key) || TARGET_LABELS.contains(&key.as_str()),
                "{file} groups by label {key:?}, which src/ sets on no metric"
            );
        }
    }
    app.stop().await;
}
