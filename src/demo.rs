//! `thermostat demo`: the service and a simulated building in one process — the main job. The
//! broker is `KAFKA_BROKERS`, or with `--embedded-broker` librdkafka's in-process mock cluster,
//! so a newcomer without Tansu is running in minutes.
//!
//! Authentication stays on: unless the configuration names its own credentials (or disables
//! them), the demo makes a random operator token for this run, writes its hash to a
//! static-identities file, and prints it with the example commands. The token may change every
//! building (`*`), so that the README's examples for building `hq` work as written.
//!
//! The simulated heaters are protected as real ones are: unless the configuration sets
//! `MIN_ON_TIME` or `MIN_OFF_TIME`, the demo holds each switch for a few simulated minutes
//! (`DEMO_MIN_ON_TIME`, `DEMO_MIN_OFF_TIME`), so that a normal run shows switches deferred.
//! They also report their state (to `heater-reports` unless HEATER_REPORT_TOPIC is given), and
//! one of them sticks during the run (`SIM_STUCK_AFTER`), so that the service flags it.

use std::net::SocketAddr;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use tokio_util::sync::CancellationToken;

use crate::sim::{self, BuildingConfig, SimConfig, COMFORT, ECO, SCHEDULE_ID};
use thermostat::config::{ControlConfig, KafkaConfig, ServeConfig};
use thermostat::error::error_chain;
use thermostat::startup::Application;
use thermostat::stream::topics::create_topics;

/// Partitions of the demo's topics.
const PARTITIONS: i32 = 3;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoConfig {
    #[command(flatten)]
    pub serve: ServeConfig,
    #[command(flatten)]
    pub building: BuildingConfig,
    #[command(flatten)]
    pub holds: HeaterHolds,
    /// Run an in-process mock Kafka cluster instead of connecting to KAFKA_BROKERS.
    #[arg(long, env = "DEMO_EMBEDDED_BROKER")]
    pub embedded_broker: bool,
    /// Which of the service's options the operator gave (set by the caller from the parse).
    #[arg(skip)]
    pub given: Given,
}

/// Which of the service's options the operator gave, on the command line or in the
/// environment: the demo's own values replace only those left at their defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Given {
    pub heater_report_topic: bool,
    pub report_timeout: bool,
}

impl Given {
    /// From the `demo` subcommand's matches.
    pub fn of(matches: &clap::ArgMatches) -> Self {
        let given = |id: &str| {
            matches
                .value_source(id)
                .is_some_and(|source| source != clap::parser::ValueSource::DefaultValue)
        };
        Self {
            heater_report_topic: given("heater_report_topic"),
            report_timeout: given("report_timeout"),
        }
    }
}

/// The demo's heater report topic, unless HEATER_REPORT_TOPIC is given.
pub const DEMO_REPORT_TOPIC: &str = "heater-reports";
/// 5 simulated minutes: a simulated heater reports within a tick (a simulated minute at the
/// defaults) of its command, so one silent or contrary for five is stuck.
const DEMO_REPORT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Real time a command and its report take through the broker, besides the simulator's tick.
const REPORT_LATENCY: Duration = Duration::from_secs(2);

/// The service's REPORT_TIMEOUT in the demo: [`DEMO_REPORT_TIMEOUT`] divided by `time_scale`,
/// but at least a tick of the simulator (`reading_interval`) and [`REPORT_LATENCY`], which
/// do not scale, and at most a day.
pub fn report_timeout(time_scale: f64, reading_interval: Duration) -> Duration {
    let floor = reading_interval.saturating_add(REPORT_LATENCY);
    Duration::try_from_secs_f64(DEMO_REPORT_TIMEOUT.as_secs_f64() / time_scale)
        .unwrap_or(Duration::MAX)
        .min(LONGEST_HOLD)
        .max(floor)
}

/// Has the simulated heaters report their state: the demo's report topic and timeout, for those
/// of HEATER_REPORT_TOPIC and REPORT_TIMEOUT that the operator did not give.
pub fn turn_reports_on(serve: &mut ServeConfig, building: &BuildingConfig, given: Given) {
    if !given.heater_report_topic {
        serve.kafka.heater_report_topic = DEMO_REPORT_TOPIC.into();
    }
    if !given.report_timeout {
        serve.control.report_timeout =
            report_timeout(building.time_scale, building.reading_interval);
    }
}

/// The demo heaters' minimum on time, in simulated time, unless configured otherwise.
const DEMO_MIN_ON: &str = "4m";
/// The demo heaters' minimum off time, in simulated time, unless configured otherwise.
const DEMO_MIN_OFF: &str = "4m";

/// The simulated heaters' minimum on and off times, in simulated time (the service holds in
/// real time: divided by `SIM_TIME_SCALE`). A little longer than a room takes to cross its
/// band, so that a run shows deferred switches while rooms stay near their bands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct HeaterHolds {
    /// Minimum on time of the demo's simulated heaters, in simulated time: the service's
    /// MIN_ON_TIME becomes this divided by SIM_TIME_SCALE (4m at the default 60: 4s), unless
    /// MIN_ON_TIME is set (above 0s), which is taken as it is. 0s: none.
    #[arg(long, env = "DEMO_MIN_ON_TIME", default_value = DEMO_MIN_ON, value_parser = humantime::parse_duration)]
    pub demo_min_on_time: Duration,
    /// Minimum off time of the demo's simulated heaters, in simulated time; as
    /// DEMO_MIN_ON_TIME, for MIN_OFF_TIME.
    #[arg(long, env = "DEMO_MIN_OFF_TIME", default_value = DEMO_MIN_OFF, value_parser = humantime::parse_duration)]
    pub demo_min_off_time: Duration,
}

impl Default for HeaterHolds {
    /// The demo's defaults, as the options give them.
    fn default() -> Self {
        let parse = |d| humantime::parse_duration(d).expect("a demo default");
        Self {
            demo_min_on_time: parse(DEMO_MIN_ON),
            demo_min_off_time: parse(DEMO_MIN_OFF),
        }
    }
}

impl HeaterHolds {
    /// Sets `control`'s minimum on and off times that the configuration left at 0s to these
    /// holds, in real time at `time_scale` simulated seconds per second (a positive number).
    /// Refused if that is longer than a day.
    pub fn apply(&self, control: &mut ControlConfig, time_scale: f64) -> Result<(), DemoError> {
        let real = |simulated: Duration| {
            Duration::try_from_secs_f64(simulated.as_secs_f64() / time_scale)
                .ok()
                .filter(|hold| *hold <= LONGEST_HOLD)
                .ok_or(DemoError::Unsupported(
                    "DEMO_MIN_ON_TIME and DEMO_MIN_OFF_TIME, divided by SIM_TIME_SCALE, must be \
                     at most a day",
                ))
        };
        if control.min_on_time.is_zero() {
            control.min_on_time = real(self.demo_min_on_time)?;
        }
        if control.min_off_time.is_zero() {
            control.min_off_time = real(self.demo_min_off_time)?;
        }
        Ok(())
    }
}

/// The longest real hold the demo makes of its simulated one.
const LONGEST_HOLD: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("embedded broker")]
    Broker(#[source] rdkafka::error::KafkaError),
    #[error("topics")]
    Topics(#[from] thermostat::stream::StreamError),
    #[error("service")]
    Service(#[from] thermostat::StartupError),
    #[error("simulator")]
    Simulator(#[from] sim::SimError),
    #[error("writing the demo's identities file")]
    Identities(#[source] std::io::Error),
    #[error("the service's task failed: {0}")]
    ServiceTask(String),
    #[error("{0}")]
    Unsupported(&'static str),
}

/// Whether the operator brought credentials of their own (else the demo makes its own).
fn own_credentials(auth: &thermostat::config::AuthConfig) -> bool {
    auth.auth_jwks_file.is_some() || auth.auth_static_file.is_some()
}

/// Why the demo's simulator could not call this service, if it could not: it connects in
/// plaintext, and with credentials the operator brought it needs one of their tokens.
fn check_simulator_access(config: &DemoConfig) -> Result<(), DemoError> {
    if config.serve.tls.tls_cert_file.is_some() {
        return Err(DemoError::Unsupported(
            "the demo's simulator connects without TLS: unset TLS_CERT_FILE (or run `serve` \
             and `simulate` apart)",
        ));
    }
    let auth = &config.serve.auth;
    if own_credentials(auth) && !auth.auth_disabled && config.building.api_token.is_none() {
        return Err(DemoError::Unsupported(
            "with AUTH_STATIC_FILE or AUTH_JWKS_FILE, set SIM_API_TOKEN to an operator's token \
             for the simulator's setpoints",
        ));
    }
    Ok(())
}

/// A freshly made token and the static-identities file that admits it, removed on drop.
struct DemoCredentials {
    token: String,
    dir: std::path::PathBuf,
}

impl DemoCredentials {
    fn create() -> Result<Self, DemoError> {
        let token = format!("demo-{:032x}", rand::random::<u128>());
        let dir = std::env::temp_dir().join(format!("thermostat-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(DemoError::Identities)?;
        let file = serde_json::json!({
            "tokens": [{
                "sha256": thermostat::security::static_file::hash_token(&token),
                "subject": "demo-operator",
                "role": "operator",
                "buildings": ["*"],
            }]
        });
        std::fs::write(dir.join("identities.json"), file.to_string())
            .map_err(DemoError::Identities)?;
        Ok(Self { token, dir })
    }

    fn file(&self) -> std::path::PathBuf {
        self.dir.join("identities.json")
    }
}

impl Drop for DemoCredentials {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The embedded mock cluster with the demo's topics (returned: dropping it stops it), or the
/// topics created on the configured broker.
async fn prepare_broker(
    config: &mut DemoConfig,
) -> Result<Option<MockCluster<'static, rdkafka::producer::DefaultProducerContext>>, DemoError> {
    if config.embedded_broker {
        let mock = MockCluster::new(1).map_err(DemoError::Broker)?;
        for (topic, partitions) in mock_topics(&config.serve.kafka) {
            mock.create_topic(topic, partitions, 1)
                .map_err(DemoError::Broker)?;
        }
        config.serve.kafka.kafka_brokers = mock.bootstrap_servers();
        // It does not describe topic settings, and nothing it holds outlives the demo.
        config.serve.kafka.allow_command_topic_deletion = true;
        tracing::info!(brokers = %config.serve.kafka.kafka_brokers, "embedded mock Kafka cluster");
        Ok(Some(mock))
    } else {
        create_topics(&config.serve.kafka, PARTITIONS, 1).await?;
        Ok(None)
    }
}

/// The topics the embedded mock cluster holds, as `create_topics` makes them on a broker (the
/// heater report topic only if set), with their partitions.
fn mock_topics(kafka: &KafkaConfig) -> Vec<(&str, i32)> {
    let mut topics = vec![
        (kafka.sensor_topic.as_str(), PARTITIONS),
        (kafka.command_topic.as_str(), PARTITIONS),
        (kafka.dead_letter_topic.as_str(), 1),
    ];
    if !kafka.heater_report_topic.is_empty() {
        topics.push((kafka.heater_report_topic.as_str(), PARTITIONS));
    }
    topics
}

/// The simulated heaters as the demo runs them: held ([`HeaterHolds`]) and reporting their
/// state ([`turn_reports_on`]); logged in real time.
fn prepare_heaters(config: &mut DemoConfig) -> Result<(), DemoError> {
    config
        .holds
        .apply(&mut config.serve.control, config.building.time_scale)?;
    turn_reports_on(&mut config.serve, &config.building, config.given);
    let control = &config.serve.control;
    let real = humantime::format_duration;
    tracing::info!(
        min_on_time = %real(control.min_on_time),
        min_off_time = %real(control.min_off_time),
        max_run_time = %real(control.max_run_time),
        report_topic = %config.serve.kafka.heater_report_topic,
        report_timeout = %real(control.report_timeout),
        "heaters held and reporting (real time; the plot marks the switches deferred)"
    );
    Ok(())
}

/// Runs until `shutdown` (or the simulation's duration), then stops the service gracefully.
pub async fn run(mut config: DemoConfig, shutdown: CancellationToken) -> Result<(), DemoError> {
    // Before anything starts: options that describe no building, or a service the simulator
    // could not call.
    config.building.check()?;
    check_simulator_access(&config)?;
    prepare_heaters(&mut config)?;
    // Kept alive until the end: dropping it stops the mock brokers.
    let _mock = prepare_broker(&mut config).await?;
    let auth = &config.serve.auth;
    let credentials = if auth.auth_disabled || own_credentials(auth) {
        None
    } else {
        let credentials = DemoCredentials::create()?;
        config.serve.auth.auth_static_file = Some(credentials.file());
        config.building.api_token = Some(credentials.token.clone());
        Some(credentials)
    };
    let kafka = config.serve.kafka.clone();
    let Some(app) = Application::build_until(config.serve, &shutdown).await? else {
        return Ok(());
    };
    let mut building = config.building;
    building.api_addr = Some(app.local_addr().to_string());
    let simulated = SimConfig { kafka, building };
    print_examples(
        &app,
        &simulated,
        credentials.as_ref().map(|c| c.token.as_str()),
    );
    let service_stop = CancellationToken::new();
    let mut service = tokio::spawn(app.run_until_stopped(service_stop.clone()));

    // The simulator stops with the service: a building without its thermostat is no demo.
    let simulator_stop = shutdown.child_token();
    let simulator = sim::run(simulated, simulator_stop.clone());
    tokio::pin!(simulator);
    let (simulated, service_ended) = tokio::select! {
        simulated = &mut simulator => (simulated, None),
        ended = &mut service => {
            simulator_stop.cancel();
            (simulator.await, Some(ended))
        }
    };
    service_stop.cancel();
    let service_ended = match service_ended {
        Some(ended) => ended,
        None => service.await,
    };
    match service_ended {
        // Stopped by the demo, or by itself without an error (e.g. its own signal handling).
        Ok(Ok(())) => {}
        // The service's failure is the demo's: the simulator's, if any, is its consequence
        // (a call refused by a service that is gone).
        Ok(Err(e)) => {
            log_simulator_failure(&simulated);
            return Err(DemoError::Service(e));
        }
        Err(e) => {
            log_simulator_failure(&simulated);
            return Err(DemoError::ServiceTask(e.to_string()));
        }
    }
    log_summary(&simulated?);
    Ok(())
}

fn log_summary(summary: &sim::Summary) {
    let stuck = summary.stuck.map(|s| summary.rooms[s.room].as_str());
    tracing::info!(
        readings = summary.readings_sent,
        commands = summary.commands_applied,
        deferred = summary.deferred(),
        max_run_offs = summary.max_run_offs(),
        level_changes = summary.level_changes.len(),
        reports = summary.reports_sent,
        stuck_heater = stuck.unwrap_or("none"),
        "demo finished"
    );
}

fn log_simulator_failure(simulated: &Result<sim::Summary, sim::SimError>) {
    if let Err(e) = simulated {
        tracing::warn!(error = %error_chain(e), "the simulator stopped with the service");
    }
}

/// What to try while the demo runs, with the addresses (and token) of this run.
fn print_examples(app: &Application, simulated: &SimConfig, token: Option<&str>) {
    println!(
        "{}",
        examples(app.local_addr(), app.admin_addr(), simulated, token)
    );
}

/// The text [`print_examples`] prints: every grpcurl line in it works as written while the demo
/// runs (tests/simulation.rs runs them).
pub fn examples(
    grpc: SocketAddr,
    admin: Option<SocketAddr>,
    simulated: &SimConfig,
    token: Option<&str>,
) -> String {
    let SimConfig { kafka, building } = simulated;
    let brokers = &kafka.kafka_brokers;
    // Room 00 is the one `SIM_CHANGE_AFTER` changes: the operator's example takes the next,
    // if there is one.
    let room = building.sensor(building.rooms.clamp(1, 2) - 1);
    let plot = building.plot.as_ref().map_or_else(
        || "(no plot: set SIM_PLOT)".to_owned(),
        |p| p.display().to_string(),
    );
    // TLS is refused above: the demo serves plaintext.
    let transport = "-plaintext ";
    let (auth_note, auth, without) = match token {
        Some(token) => (
            format!(
                "  token:  {token} (operator of every building, for this run only)\n  \
                 export TOKEN={token}\n"
            ),
            format!("-H 'authorization: Bearer {token}' "),
            "Without the token the same calls fail with Unauthenticated.\n",
        ),
        None => (String::new(), String::new(), ""),
    };
    let call = format!("grpcurl {transport}{auth}");
    let metrics = admin.map_or_else(String::new, |admin| {
        format!("  metrics: curl -s http://{admin}/metrics\n")
    });
    let building_id = &building.building_id;
    let mut levels = level_examples(building, &call, grpc);
    levels.push_str(&stuck_example(
        simulated,
        &format!("grpcurl {transport}-emit-defaults {auth}"),
        grpc,
    ));
    format!(
        r#"
thermostat is the thermostat of a simulated building of {rooms} rooms ("{building_id}").
  gRPC:   {grpc}
  broker: {brokers}
{auth_note}  plot:   {plot} (rewritten every 30 s and at the end)
  health: grpcurl -plaintext {grpc} grpc.health.v1.Health/Check
{metrics}
In another terminal:
  grpcurl {transport}{grpc} list
  {call}-d '{{"buildingId": "{building_id}"}}' {grpc} thermostat.v1.SetpointService/ListSetpoints
  {call}-d '{{"sendInitialState": true, "buildingId": "{building_id}"}}' {grpc} thermostat.v1.HeaterControlService/SubscribeHeaterCommands
Change a setpoint and watch that room's heater react (and the plot). PutSetpoint writes the
DEFAULT level, which waits beneath the schedule or an override while they hold; an OVERRIDE
decides at once, until it is relinquished:
  {call}-d '{{"setpoint": {{"sensorId": "{room}", "buildingId": "{building_id}", "desiredCelsius": 24, "upDeltaCelsius": 0.5, "downDeltaCelsius": 0.5}}}}' {grpc} thermostat.v1.SetpointService/PutSetpoint
  {call}-d '{{"sensorId": "{room}", "level": "SETPOINT_LEVEL_OVERRIDE", "desiredCelsius": 25, "upDeltaCelsius": 0.5, "downDeltaCelsius": 0.5, "reason": "hold"}}' {grpc} thermostat.v1.SetpointService/WriteSetpointLevel
  {call}-d '{{"sensorId": "{room}", "level": "SETPOINT_LEVEL_OVERRIDE"}}' {grpc} thermostat.v1.SetpointService/RelinquishSetpointLevel
  {call}-d '{{"sensorId": "{room}"}}' {grpc} thermostat.v1.HeaterControlService/GetSensorState
What the loop would do at 19.5 °C (and why, and whether a hold defers it), and the heater limits
that apply to the room (the demo's holds, in real time):
  {call}-d '{{"sensorId": "{room}", "temperatureCelsius": 19.5}}' {grpc} thermostat.v1.HeaterControlService/DryRun
  {call}-d '{{"buildingId": "{building_id}", "sensorId": "{room}"}}' {grpc} thermostat.v1.HeaterControlService/GetHeaterSettings
{levels}{without}Send a reading by hand:
  KAFKA_BROKERS={brokers} target/release/thermostat send-reading {room} 15.0
Ctrl-C stops the demo and writes the plot.
"#,
        rooms = building.rooms,
    )
}

/// The examples of the levels the run writes: the schedule, the override.
fn level_examples(building: &BuildingConfig, call: &str, grpc: SocketAddr) -> String {
    let building_id = &building.building_id;
    let mut levels = String::new();
    if building.schedules() {
        levels.push_str(&format!(
            "The whole building's schedule \"{SCHEDULE_ID}\" ({zone}) holds preset {COMFORT}, then \
             {ECO}, soon after the start (the log\nsays when), then nothing: DEFAULT decides again. \
             Its periods, and what it makes of a room's setpoint:\n  \
             {call}-d '{{\"buildingId\": \"{building_id}\", \"scheduleId\": \"{SCHEDULE_ID}\"}}' {grpc} thermostat.v1.ScheduleService/GetSchedule\n  \
             {call}-d '{{\"sensorId\": \"{first}\", \"duration\": \"3600s\"}}' {grpc} thermostat.v1.ScheduleService/PreviewSetpoint\n",
            zone = building.schedule_zone,
            first = building.sensor(0),
        ));
    }
    if let Some(i) = building.overridden_room() {
        let overridden = building.sensor(i);
        levels.push_str(&format!(
            "{overridden} is held warmer by an OVERRIDE that expires by itself during the run \
             (the log says when); its\npriority array:\n  \
             {call}-d '{{\"sensorId\": \"{overridden}\"}}' {grpc} thermostat.v1.SetpointService/GetSetpointLevels\n"
        ));
    }
    levels
}

/// The call that shows the stuck heater flagged, if the run has one; `call` shows defaults,
/// since `following: false` is one.
fn stuck_example(simulated: &SimConfig, call: &str, grpc: SocketAddr) -> String {
    let building = &simulated.building;
    let reports = !simulated.kafka.heater_report_topic.is_empty();
    let Some(i) = building.stuck_room(reports) else {
        return String::new();
    };
    let stuck = building.sensor(i);
    format!(
        "The heaters report their state to {topic}; {stuck}'s sticks OFF {after} into the run \
         (the log says when).\nOnce it has reported OFF for REPORT_TIMEOUT after an ON, the \
         service flags it: heaterStatus \"following\": false:\n  \
         {call}-d '{{\"sensorId\": \"{stuck}\"}}' {grpc} thermostat.v1.HeaterControlService/GetSensorState\n",
        topic = simulated.kafka.heater_report_topic,
        after = humantime::format_duration(building.stuck_after),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        demo: DemoConfig,
    }

    fn demo(args: &[&str]) -> DemoConfig {
        let args = std::iter::once("demo").chain(args.iter().copied());
        Cli::try_parse_from(args).unwrap().demo
    }

    /// As main.rs parses it: with the options given noted.
    fn given(args: &[&str]) -> DemoConfig {
        use clap::{CommandFactory, FromArgMatches};
        let args = std::iter::once("demo").chain(args.iter().copied());
        let matches = Cli::command().try_get_matches_from(args).unwrap();
        let mut config = Cli::from_arg_matches(&matches).unwrap().demo;
        config.given = Given::of(&matches);
        config
    }

    #[test]
    fn the_demo_heaters_report_to_their_own_topic_in_simulated_time_unless_configured() {
        let mut config = given(&[]);
        assert_eq!(config.given, Given::default());
        turn_reports_on(&mut config.serve, &config.building, config.given);
        assert_eq!(config.serve.kafka.heater_report_topic, DEMO_REPORT_TOPIC);
        // 5 simulated minutes at a simulated minute a second.
        assert_eq!(config.serve.control.report_timeout, Duration::from_secs(5));
        // Faster: never below a tick and the broker's round trips; slower: at most a day.
        assert_eq!(
            report_timeout(150.0, Duration::from_millis(100)),
            Duration::from_millis(2100)
        );
        assert_eq!(
            report_timeout(6.0, Duration::from_secs(1)),
            Duration::from_secs(50)
        );
        assert_eq!(report_timeout(1e-300, Duration::from_secs(1)), LONGEST_HOLD);
        // What the operator gives stays, even their default value, or an empty topic (no
        // reports).
        let mut own = given(&["--report-timeout", "60s", "--heater-report-topic", ""]);
        assert_eq!(
            own.given,
            Given {
                heater_report_topic: true,
                report_timeout: true
            }
        );
        turn_reports_on(&mut own.serve, &own.building, own.given);
        assert_eq!(own.serve.kafka.heater_report_topic, "");
        assert_eq!(own.serve.control.report_timeout, Duration::from_secs(60));
        // The mock cluster holds the report topic only when there is one.
        let names = |kafka: &KafkaConfig| -> Vec<String> {
            mock_topics(kafka)
                .iter()
                .map(|(t, _)| t.to_string())
                .collect()
        };
        assert!(names(&config.serve.kafka).contains(&DEMO_REPORT_TOPIC.to_owned()));
        assert_eq!(names(&own.serve.kafka).len(), 3);
    }

    #[test]
    fn the_examples_ask_why_and_show_the_stuck_heater_only_when_heaters_report() {
        let grpc: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let mut config = demo(&[]);
        turn_reports_on(&mut config.serve, &config.building, config.given);
        let simulated = SimConfig {
            kafka: config.serve.kafka.clone(),
            building: config.building.clone(),
        };
        let text = examples(grpc, None, &simulated, Some("t"));
        for call in ["DryRun", "GetHeaterSettings"] {
            assert!(
                text.contains(&format!("HeaterControlService/{call}")),
                "{text}"
            );
        }
        let stuck = format!("{{\"sensorId\": \"sim/room-19\"}}' {grpc} thermostat.v1.HeaterControlService/GetSensorState");
        assert!(text.contains(&stuck), "{text}");
        assert!(text.contains("-emit-defaults"), "{text}");
        // Without reports (or without a stuck heater) there is nothing to show.
        let quiet = SimConfig {
            kafka: demo(&[]).serve.kafka,
            building: config.building.clone(),
        };
        let text = examples(grpc, None, &quiet, Some("t"));
        assert!(
            !text.contains("sim/room-19") && !text.contains("-emit-defaults"),
            "{text}"
        );
    }

    #[test]
    fn the_demo_refuses_set_ups_its_simulator_cannot_call() {
        // Its own credentials (made at start), or none at all: the simulator gets in.
        assert!(check_simulator_access(&demo(&[])).is_ok());
        assert!(check_simulator_access(&demo(&["--auth-disabled"])).is_ok());
        // The operator's credentials: only with one of their tokens for the simulator.
        let own = ["--auth-static-file", "/etc/thermostat/identities.json"];
        assert!(matches!(
            check_simulator_access(&demo(&own)),
            Err(DemoError::Unsupported(why)) if why.contains("SIM_API_TOKEN")
        ));
        let with_token = [&own[..], &["--api-token", "t"]].concat();
        assert!(check_simulator_access(&demo(&with_token)).is_ok());
        // TLS: the simulator speaks plaintext.
        let tls = ["--tls-cert-file", "c.pem", "--tls-key-file", "k.pem"];
        assert!(matches!(
            check_simulator_access(&demo(&tls)),
            Err(DemoError::Unsupported(why)) if why.contains("TLS_CERT_FILE")
        ));
    }

    #[test]
    fn the_demo_heaters_hold_switches_in_simulated_time_unless_configured() {
        let config = demo(&[]);
        assert_eq!(config.holds, HeaterHolds::default());
        assert_eq!(config.holds.demo_min_on_time, Duration::from_secs(240));
        assert_eq!(config.holds.demo_min_off_time, Duration::from_secs(240));
        // At the default scale a simulated minute is a second.
        let mut control = config.serve.control.clone();
        config
            .holds
            .apply(&mut control, config.building.time_scale)
            .unwrap();
        assert_eq!(
            (control.min_on_time, control.min_off_time),
            (Duration::from_secs(4), Duration::from_secs(4))
        );
        // Faster, shorter.
        let mut control = config.serve.control.clone();
        config.holds.apply(&mut control, 150.0).unwrap();
        assert_eq!(control.min_off_time, Duration::from_millis(1600));
        // The service's own settings win; the demo's 0s means none.
        let own = demo(&["--min-on-time", "10s", "--demo-min-off-time", "0s"]);
        let mut control = own.serve.control.clone();
        own.holds.apply(&mut control, 60.0).unwrap();
        assert_eq!(
            (control.min_on_time, control.min_off_time),
            (Duration::from_secs(10), Duration::ZERO)
        );
        // A scale so slow that the holds would outlast any run (or any Duration).
        for scale in [0.001, 1e-300] {
            let mut control = config.serve.control.clone();
            assert!(matches!(
                config.holds.apply(&mut control, scale),
                Err(DemoError::Unsupported(why)) if why.contains("DEMO_MIN_ON_TIME")
            ));
        }
    }
}
