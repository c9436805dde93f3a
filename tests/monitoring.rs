//! deploy/monitoring/: the alert rules pass `promtool check rules` and their unit tests, the
//! PrometheusRule is generated from the plain rules file, and every metric the rules and the
//! dashboard name is one the service exports. And traces: what a real `thermostat serve`
//! exports over OTLP to a receiver built from the published OpenTelemetry protos.

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

/// A trace collector: the OTLP/gRPC trace service, keeping every span it is sent with its
/// resource's `service.name`.
mod collector {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::common::v1::KeyValue;
    pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    pub use opentelemetry_proto::tonic::trace::v1::Span;

    #[derive(Clone, Default)]
    pub struct Collector {
        spans: Arc<Mutex<Vec<(String, Span)>>>,
    }

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut spans = self.spans.lock().unwrap();
            for resource in request.into_inner().resource_spans {
                let service = resource
                    .resource
                    .and_then(|r| attribute(&r.attributes, "service.name"))
                    .unwrap_or_default();
                for scope in resource.scope_spans {
                    spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    impl Collector {
        pub async fn start() -> (Self, SocketAddr) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let collector = Self::default();
            let server = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
            tokio::spawn(server);
            (collector, addr)
        }

        pub fn spans(&self) -> Vec<(String, Span)> {
            self.spans.lock().unwrap().clone()
        }
    }

    /// An attribute's value as text (integers in decimal).
    pub fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
        let value = attributes.iter().find(|a| a.key == key)?.value.as_ref()?;
        match value.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            Value::BoolValue(b) => Some(b.to_string()),
            Value::DoubleValue(d) => Some(d.to_string()),
            _ => None,
        }
    }

    pub fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// `thermostat send-reading` against the cluster's topics, with a `traceparent` if given.
fn send_reading(topics: &common::kafka::Topics, sensor: &str, celsius: &str, parent: Option<&str>) {
    let mut args = vec!["send-reading", sensor, celsius];
    if let Some(parent) = parent {
        args.extend(["--traceparent", parent]);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_thermostat"))
        .args(&args)
        .env("KAFKA_BROKERS", common::kafka::brokers())
        .env("SENSOR_TOPIC", &topics.sensors)
        .output()
        .expect("run thermostat");
    assert_ok("thermostat send-reading", &out);
}

#[tokio::test]
async fn traces_follow_a_call_and_a_reading_through_the_decision_to_the_command() {
    use collector::{attribute, hex, Collector, SpanKind};
    use common::chaos::{state_request, Cluster, BUILDING};
    use common::kafka::{decode_command, header, TopicReader};
    use common::{eventually, put, setpoint};
    use std::time::Duration;
    use thermostat::proto::v1 as pb;

    let (collector, addr) = Collector::start().await;
    let endpoint = format!("http://{addr}");
    let cluster = Cluster::start(
        1,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let replica = &cluster.replicas[0];
    let (plain, unsampled, traced) = ("hq/plain", "hq/unsampled", "hq/traced");
    cluster
        .put_setpoints(&[plain.to_owned(), unsampled.to_owned()], 20.0)
        .await;

    // A call continues its caller's trace: `traceparent` in the gRPC metadata.
    let (call_trace, call_parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut request = tonic::Request::new(put(setpoint(traced, BUILDING, 20.0), None));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{call_trace}-{call_parent}-01").parse().unwrap(),
    );
    let revision = replica
        .setpoints()
        .put_setpoint(request)
        .await
        .expect("put")
        .into_inner()
        .revision;
    let cached = eventually(Duration::from_secs(20), || async {
        let state = replica
            .heaters()
            .get_sensor_state(state_request(traced))
            .await;
        state.is_ok_and(|s| s.into_inner().setpoint.is_some())
    })
    .await;
    assert!(cached, "the setpoint never reached the cache");

    let mut live = replica
        .heaters()
        .subscribe_heater_commands(pb::SubscribeHeaterCommandsRequest {
            sensor_ids: vec![plain.into(), unsampled.into(), traced.into()],
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();

    // Readings: one without a trace, one whose caller did not sample its trace, one traced.
    let (unsampled_trace, reading_trace, reading_parent) = (
        "11111111111111111111111111111111",
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
    );
    send_reading(&cluster.topics, plain, "15", None);
    let unsampled_parent = format!("00-{unsampled_trace}-2222222222222222-00");
    send_reading(&cluster.topics, unsampled, "15", Some(&unsampled_parent));
    let traced_parent = format!("00-{reading_trace}-{reading_parent}-01");
    send_reading(&cluster.topics, traced, "15", Some(&traced_parent));

    let mut events = std::collections::BTreeMap::new();
    while events.len() < 3 {
        let event = common::next_event(&mut live).await;
        events.insert(event.sensor_id.clone(), event);
    }

    // The spans: the decision arrives last, so the others have been exported by then.
    let decided = eventually(Duration::from_secs(20), || async {
        collector
            .spans()
            .iter()
            .any(|(_, s)| s.name == "thermostat.decide" && hex(&s.trace_id) == reading_trace)
    })
    .await;
    let spans = collector.spans();
    let names: Vec<_> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
    assert!(
        decided,
        "no decision span for the traced reading; spans: {names:?}"
    );

    let (service, call) = spans
        .iter()
        .find(|(_, s)| hex(&s.trace_id) == call_trace && hex(&s.parent_span_id) == call_parent)
        .unwrap_or_else(|| panic!("no child of the caller's span; spans: {names:?}"));
    assert_eq!(service, "thermostat");
    assert_eq!(call.name, "/thermostat.v1.SetpointService/PutSetpoint");
    assert_eq!(call.kind, SpanKind::Server as i32);
    assert_eq!(
        attribute(&call.attributes, "rpc.system").as_deref(),
        Some("grpc")
    );
    let store = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.parent_span_id == call.span_id)
        .unwrap_or_else(|| panic!("no child of the call's span; spans: {names:?}"));
    assert_eq!(store.trace_id, call.trace_id);
    assert_eq!(
        attribute(&store.attributes, "sensor_id").as_deref(),
        Some(traced)
    );

    let decision = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "thermostat.decide" && hex(&s.trace_id) == reading_trace)
        .unwrap();
    assert_eq!(
        hex(&decision.parent_span_id),
        reading_parent,
        "child of the reading's span"
    );
    let event = &events[traced];
    for (key, value) in [
        ("sensor.id", traced.to_owned()),
        ("heater.command", "HEATER_COMMAND_ON".to_owned()),
        ("command.reason", "COMMAND_REASON_TOO_COLD".to_owned()),
        ("setpoint.revision", revision.to_string()),
        ("command.sequence", event.sequence.to_string()),
    ] {
        assert_eq!(
            attribute(&decision.attributes, key).as_deref(),
            Some(value.as_str()),
            "{key}"
        );
    }
    assert_eq!(event.setpoint_revision, revision);
    let next_hop = format!("00-{reading_trace}-{}-01", hex(&decision.span_id));
    assert_eq!(
        event.trace_parent, next_hop,
        "the subscriber event names the decision"
    );

    // Nothing exported for the untraced reading, nor for the trace its caller did not sample.
    for (_, span) in &spans {
        assert_ne!(
            hex(&span.trace_id),
            unsampled_trace,
            "an unsampled trace was exported"
        );
        assert_ne!(
            attribute(&span.attributes, "sensor.id").as_deref(),
            Some(plain),
            "a reading without a trace was traced"
        );
    }
    assert_eq!(events[plain].trace_parent, "");
    assert!(
        events[unsampled]
            .trace_parent
            .starts_with(&format!("00-{unsampled_trace}-"))
            && events[unsampled].trace_parent.ends_with("-00"),
        "the unsampled trace goes on, unsampled: {:?}",
        events[unsampled].trace_parent
    );

    // The command records carry the same `traceparent` header as their events.
    let records = TopicReader::new(&cluster.topics.commands, cluster.topics.partitions)
        .read_all(Duration::from_secs(2))
        .await;
    for sensor in [plain, unsampled, traced] {
        let record = records
            .iter()
            .find(|r| decode_command(r).sensor_id == sensor)
            .unwrap_or_else(|| panic!("no command record of {sensor}"));
        let expected = Some(events[sensor].trace_parent.clone()).filter(|t| !t.is_empty());
        assert_eq!(header(record, "traceparent"), expected, "{sensor}");
    }
}

#[tokio::test]
async fn with_traces_off_a_readings_traceparent_goes_no_further() {
    use common::kafka::{header, TopicReader, Topics};
    use std::time::Duration;
    use thermostat::proto::v1 as pb;

    // No trace provider in this process: traces are off, as by default.
    let app = TestApp::spawn().await;
    let mut live = app.band_and_subscribe("room-1", 20.0).await;
    let topics = Topics::of(&app.config);
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    send_reading(&topics, "room-1", "15", Some(parent));
    let on = common::next_event(&mut live).await;
    assert_eq!(
        (on.command(), on.trace_parent.as_str()),
        (pb::HeaterCommand::On, "")
    );
    let records = TopicReader::new(&topics.commands, topics.partitions)
        .read_all(Duration::from_secs(2))
        .await;
    assert_eq!(records.len(), 1);
    assert_eq!(header(&records[0], "traceparent"), None);
    app.stop().await;
}
