//! `thermostat simulate`: a closed-loop simulated building. Each room has a sensor, a heater and
//! a thermal model; the simulator publishes readings to the sensor topic and applies the heater
//! commands it reads from the command topic, so the service is the building's thermostat.
//!
//! Time: each tick advances the rooms by `reading_interval × time_scale` of simulated time, but
//! readings are stamped with the wall clock (the service rejects readings from the future).
//!
//! The band a room is plotted against is the service's effective setpoint: with `SIM_API_ADDR`
//! the simulator reads its building's setpoints every second, and the priority array of every
//! room whose revision moved, so a change made by an operator with grpcurl shows in the plot like
//! the simulator's own `SIM_CHANGE_AFTER`, and so do the building's schedule and overrides.
//!
//! At its start the simulator also writes, relative to the wall clock: presets `comfort` and
//! `eco` and a whole-building schedule that holds them for a while soon after the start
//! (`SIM_SCHEDULE_*`), and an OVERRIDE of one room that expires during the run
//! (`SIM_OVERRIDE_FOR`), so that a run shows every level but SAFETY deciding in turn.
//!
//! With a heater report topic (`HEATER_REPORT_TOPIC`) the heaters report their actual state
//! there, as a gateway would, and one of them stops obeying during the run (`SIM_STUCK_AFTER`),
//! so that the service has a heater to flag as not following its command.

mod levels;
pub mod model;
mod plot;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use prost::Message as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use levels::{check_plan, log_changes, write_override, write_schedule};
pub use levels::{level_name, ChangeKind, LevelChange, Plan, COMFORT, ECO, SCHEDULE_ID};
pub use model::ThermalModel;
use thermostat::config::KafkaConfig;
use thermostat::domain::schedule::parse_zone;
use thermostat::proto::from_timestamp;
use thermostat::proto::v1 as pb;
use thermostat::stream::topics::{reading_payload, report_payload};
use thermostat::stream::{self, StreamError};

#[derive(Debug, Clone, clap::Args)]
pub struct SimConfig {
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub building: BuildingConfig,
}

/// The simulated building, apart from where its broker is.
#[derive(Debug, Clone, clap::Args)]
pub struct BuildingConfig {
    /// Rooms in the building, each with one sensor and one heater.
    #[arg(long, env = "SIM_ROOMS", default_value_t = 20)]
    pub rooms: usize,
    /// Building id of the rooms; sensors are `<building>/room-NN`.
    #[arg(long, env = "SIM_BUILDING", default_value = "sim")]
    pub building_id: String,
    /// Real time between two readings of a room.
    #[arg(long, env = "SIM_READING_INTERVAL", default_value = "1s", value_parser = thermostat::config::positive_duration)]
    pub reading_interval: Duration,
    /// Simulated seconds per real second.
    #[arg(long, env = "SIM_TIME_SCALE", default_value_t = 60.0)]
    pub time_scale: f64,
    /// Stop after this long (real time); without it, run until Ctrl-C.
    #[arg(long, env = "SIM_DURATION", value_parser = thermostat::config::positive_duration)]
    pub duration: Option<Duration>,
    /// Seed of the random start temperatures and noise, for repeatable runs.
    #[arg(long, env = "SIM_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Standard deviation of the measurement noise, °C.
    #[arg(long, env = "SIM_NOISE_CELSIUS", default_value_t = 0.05)]
    pub noise_celsius: f64,
    /// Outside temperature, °C: where an unheated room drifts to.
    #[arg(
        long,
        env = "SIM_OUTSIDE_CELSIUS",
        default_value_t = 5.0,
        allow_negative_numbers = true
    )]
    pub outside_celsius: f64,
    /// Heater warming, °C per simulated minute.
    #[arg(long, env = "SIM_HEATING_PER_MINUTE", default_value_t = 0.6)]
    pub heating_per_minute: f64,
    /// Fraction of the gap to outside lost per simulated minute.
    #[arg(long, env = "SIM_LOSS_PER_MINUTE", default_value_t = 0.02)]
    pub loss_per_minute: f64,
    /// gRPC address of thermostat: when set, the simulator creates the rooms' setpoints.
    #[arg(long, env = "SIM_API_ADDR")]
    pub api_addr: Option<String>,
    /// Bearer token for the API calls (a token of role operator or admin for the building).
    #[arg(long, env = "SIM_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Desired temperature of the setpoints it creates.
    #[arg(long, env = "SIM_DESIRED_CELSIUS", default_value_t = 21.0)]
    pub desired_celsius: f64,
    /// Up and down delta of the setpoints it creates.
    #[arg(long, env = "SIM_DELTA_CELSIUS", default_value_t = 0.5)]
    pub delta_celsius: f64,
    /// After this long, raise the first room's setpoint by `SIM_CHANGE_BY` (needs SIM_API_ADDR).
    #[arg(long, env = "SIM_CHANGE_AFTER", value_parser = humantime::parse_duration)]
    pub change_after: Option<Duration>,
    /// How far `SIM_CHANGE_AFTER` raises the first room's setpoint, °C (negative lowers it).
    #[arg(
        long,
        env = "SIM_CHANGE_BY",
        default_value_t = 2.0,
        allow_negative_numbers = true
    )]
    pub change_by: f64,
    /// Write a plot (SVG) of the first rooms here, every 30 s and at the end.
    #[arg(long, env = "SIM_PLOT")]
    pub plot: Option<PathBuf>,
    /// Rooms shown in the plot.
    #[arg(long, env = "SIM_PLOT_ROOMS", default_value_t = 3)]
    pub plot_rooms: usize,
    /// IANA time zone of the building's schedule (needs SIM_API_ADDR).
    #[arg(long, env = "SIM_SCHEDULE_ZONE", default_value = "Europe/Berlin")]
    pub schedule_zone: String,
    /// The schedule starts holding `comfort` at the first whole minute after this long from
    /// the start (at most 24h).
    #[arg(long, env = "SIM_SCHEDULE_AFTER", default_value = "1m", value_parser = humantime::parse_duration)]
    pub schedule_after: Duration,
    /// Length of each of the schedule's two periods, `comfort` then `eco`, in whole minutes
    /// (rounded up, at most 12h); after them it holds nothing. 0s: no presets, no schedule.
    #[arg(long, env = "SIM_SCHEDULE_PERIOD", default_value = "2m", value_parser = humantime::parse_duration)]
    pub schedule_period: Duration,
    /// An OVERRIDE of `SIM_DESIRED_CELSIUS` + 3 °C on room 02 (the last room, if fewer),
    /// written at the start, expires after this long (at least 1s). 0s: no override.
    #[arg(long, env = "SIM_OVERRIDE_FOR", default_value = "3m", value_parser = humantime::parse_duration)]
    pub override_for: Duration,
    /// With HEATER_REPORT_TOPIC set and at least 4 rooms, the last room's heater stops obeying
    /// after this long (real time): stuck OFF, it reports so. 0s: none.
    #[arg(long, env = "SIM_STUCK_AFTER", default_value = "1m", value_parser = humantime::parse_duration)]
    pub stuck_after: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("Kafka")]
    Stream(#[from] StreamError),
    #[error("thermostat gRPC API")]
    Grpc(#[from] tonic::Status),
    #[error("connecting to thermostat")]
    Connect(#[from] tonic::transport::Error),
    #[error("writing the plot")]
    Plot(String),
    #[error("invalid option: {0}")]
    Invalid(String),
    #[error("the command-topic reader stopped: {0}")]
    Follower(String),
}

/// One sample of one room, for the plot and the summary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub simulated_minutes: f64,
    pub celsius: f64,
    pub heater_on: bool,
    /// The band the room should be in: (desired - down delta, desired + up delta) of its
    /// effective setpoint.
    pub band: (f64, f64),
    /// The level of the room's priority array that band comes from.
    pub level: pb::SetpointLevel,
}

/// A heater command the building took (a stuck heater takes it without switching): what of its
/// event the summary keeps (a few dozen bytes, like a sample, however long the run).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AppliedCommand {
    /// Index into [`Summary::rooms`].
    pub room: usize,
    /// Simulated minute at which the heater was switched.
    pub simulated_minutes: f64,
    /// What the command says; the samples have what the heater did.
    pub heater_on: bool,
    pub reason: pb::CommandReason,
    /// The setpoint revision the service decided with.
    pub setpoint_revision: i64,
    /// The level that decided, and the revision it was written at (its history entry).
    pub setpoint_level: pb::SetpointLevel,
    pub level_revision: i64,
    /// The reading it decided on, if any.
    pub celsius: Option<f64>,
    /// When the service decided it: the holds (minimum on and off times) count from then.
    pub decided_at: Option<DateTime<Utc>>,
}

impl AppliedCommand {
    /// Whether it is a switch a hold deferred (`DEFERRED_TOO_COLD`, `DEFERRED_TOO_HOT`).
    pub fn deferred(&self) -> bool {
        matches!(
            self.reason,
            pb::CommandReason::DeferredTooCold | pb::CommandReason::DeferredTooHot
        )
    }

    /// Whether it is the OFF of a heater that ran for `MAX_RUN_TIME`.
    pub fn max_run(&self) -> bool {
        self.reason == pb::CommandReason::MaxRunTime
    }
}

/// The heater that stopped obeying (`SIM_STUCK_AFTER`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StuckHeater {
    /// Index into [`Summary::rooms`].
    pub room: usize,
    /// Simulated minute from which it stayed OFF.
    pub simulated_minutes: f64,
}

/// What happened to every room.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub rooms: Vec<String>,
    /// Per room, in time order.
    pub samples: Vec<Vec<Sample>>,
    pub readings_sent: u64,
    /// Heater reports sent (with HEATER_REPORT_TOPIC).
    pub reports_sent: u64,
    pub commands_applied: u64,
    /// Every command applied, in order.
    pub commands: Vec<AppliedCommand>,
    /// Simulated minute of the simulator's own setpoint change (`SIM_CHANGE_AFTER`), if made.
    pub change_at_minutes: Option<f64>,
    /// The schedule and override written at the start.
    pub plan: Plan,
    /// Every change of a room's effective setpoint seen after its first read, in order.
    pub level_changes: Vec<LevelChange>,
    /// The heater that stopped obeying, once it has.
    pub stuck: Option<StuckHeater>,
}

impl Summary {
    /// How many of the commands applied were switches a hold deferred.
    pub fn deferred(&self) -> usize {
        self.commands.iter().filter(|c| c.deferred()).count()
    }

    /// How many of the commands applied were OFFs for `MAX_RUN_TIME`.
    pub fn max_run_offs(&self) -> usize {
        self.commands.iter().filter(|c| c.max_run()).count()
    }
}

struct Room {
    sensor: String,
    celsius: f64,
    /// What the heater does (a stuck one stays OFF whatever it is told).
    heater_on: bool,
    /// Stuck OFF: takes commands, obeys none.
    stuck: bool,
    /// Took a command (or stuck) since its last report: its gateway reports at once.
    report_due: bool,
    /// Sequence of the last command applied.
    sequence: Option<u64>,
    band: (f64, f64),
    /// The level `band` comes from.
    level: pb::SetpointLevel,
    /// The sensor's revision when its levels were last read: another one in the listing means
    /// that some level changed.
    levels_revision: Option<i64>,
    /// When its OVERRIDE expires, as last read.
    override_until: Option<DateTime<Utc>>,
}

impl Room {
    /// Obeys a command only if its sequence is above that of the last one obeyed: the command
    /// topic may hold a command twice, or an older one after a newer (see `HeaterCommandEvent`),
    /// and a stale ON obeyed after its OFF would heat the room until the next change. True if
    /// obeyed.
    fn obey(&mut self, sequence: u64, on: bool) -> bool {
        if Some(sequence) <= self.sequence {
            return false;
        }
        self.sequence = Some(sequence);
        self.heater_on = on && !self.stuck;
        self.report_due = true;
        true
    }

    /// Takes the effective band and level from the room's priority array; what changed, if
    /// anything did since the previous read (the first read is no change).
    fn follow(
        &mut self,
        levels: &pb::SetpointLevels,
        now: DateTime<Utc>,
    ) -> Option<(ChangeKind, pb::SetpointLevel)> {
        let level = levels.effective_level();
        // Without its entry the answer says nothing: the room is read again next poll.
        let entry = levels.levels.iter().find(|e| e.level() == level)?;
        let first = self.levels_revision.replace(levels.revision).is_none();
        let band = (
            entry.desired_celsius - entry.down_delta_celsius,
            entry.desired_celsius + entry.up_delta_celsius,
        );
        let override_until = std::mem::replace(
            &mut self.override_until,
            levels
                .levels
                .iter()
                .find(|e| e.level() == pb::SetpointLevel::Override)
                .and_then(|e| e.expire_time.as_ref())
                .and_then(from_timestamp),
        );
        let from = std::mem::replace(&mut self.level, level);
        let old_band = std::mem::replace(&mut self.band, band);
        if first || (from == level && old_band == band) {
            return None;
        }
        let kind = if from == pb::SetpointLevel::Override && level < from {
            // Another machine's clock may be a little behind: an expiry is recorded after it.
            if override_until.is_some_and(|until| until <= now + TimeDelta::seconds(5)) {
                ChangeKind::OverrideExpired
            } else {
                ChangeKind::OverrideEnded
            }
        } else if from == pb::SetpointLevel::Schedule || level == pb::SetpointLevel::Schedule {
            ChangeKind::ScheduleTransition
        } else {
            ChangeKind::Changed
        };
        Some((kind, from))
    }
}

impl BuildingConfig {
    /// The thermal model, or why these options describe no building.
    pub fn check(&self) -> Result<ThermalModel, SimError> {
        let invalid = |what: &str| Err(SimError::Invalid(what.into()));
        if self.rooms == 0 || self.plot_rooms == 0 {
            return invalid("SIM_ROOMS and SIM_PLOT_ROOMS must be at least 1");
        }
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return invalid("SIM_TIME_SCALE must be a positive number");
        }
        if !(self.noise_celsius.is_finite() && self.noise_celsius >= 0.0) {
            return invalid("SIM_NOISE_CELSIUS must be zero or positive");
        }
        if !(self.delta_celsius.is_finite() && self.delta_celsius >= 0.0) {
            return invalid("SIM_DELTA_CELSIUS must be zero or positive");
        }
        if !(self.desired_celsius.is_finite() && self.change_by.is_finite()) {
            return invalid("SIM_DESIRED_CELSIUS and SIM_CHANGE_BY must be finite numbers");
        }
        if parse_zone(&self.schedule_zone).is_err() {
            return invalid(
                "SIM_SCHEDULE_ZONE must be an IANA time zone name, such as Europe/Berlin",
            );
        }
        if self.schedule_after > Duration::from_secs(24 * 3600) {
            return invalid("SIM_SCHEDULE_AFTER must be at most 24h");
        }
        if self.schedule_period > Duration::from_secs(12 * 3600) {
            return invalid("SIM_SCHEDULE_PERIOD must be at most 12h");
        }
        if !self.override_for.is_zero() && self.override_for < Duration::from_secs(1) {
            return invalid("SIM_OVERRIDE_FOR must be 0s (none) or at least 1s");
        }
        let model = ThermalModel {
            outside_celsius: self.outside_celsius,
            heating_per_minute: self.heating_per_minute,
            loss_per_minute: self.loss_per_minute,
        };
        model.check().map_err(SimError::Invalid)?;
        Ok(model)
    }

    /// The sensor of room `i`.
    pub fn sensor(&self, i: usize) -> String {
        format!("{}/room-{i:02}", self.building_id)
    }

    /// The room whose heater sticks (`SIM_STUCK_AFTER`), if any, when heaters report: the
    /// last, if it is none of rooms 00 to 02, which the run and the demo's examples change.
    pub fn stuck_room(&self, reports: bool) -> Option<usize> {
        (reports && !self.stuck_after.is_zero() && self.rooms > STUCK_ROOM_AFTER)
            .then(|| self.rooms - 1)
    }
}

/// The stuck heater is in a room past this one (rooms 00 to 02 have their own roles).
const STUCK_ROOM_AFTER: usize = 3;

/// The gateway reports every heater's state this often, in simulated minutes, besides a
/// heater's at once after a command.
const REPORT_EVERY_MINUTES: f64 = 5.0;

/// The band a setpoint keeps its room in.
pub fn band_of(setpoint: &pb::Setpoint) -> (f64, f64) {
    (
        setpoint.desired_celsius - setpoint.down_delta_celsius,
        setpoint.desired_celsius + setpoint.up_delta_celsius,
    )
}

/// How often the simulator reads its building's setpoints from the service.
const BAND_POLL: Duration = Duration::from_secs(1);
/// The longest a call to the service may take, connecting included.
const API_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the building until `duration` or `shutdown`. The plot is written at the start (so a
/// path that cannot be written is an error at once), every 30 s, and at the end whatever ended
/// the run.
pub async fn run(sim: SimConfig, shutdown: CancellationToken) -> Result<Summary, SimError> {
    let SimConfig {
        kafka,
        building: config,
    } = sim;
    let model = config.check()?;
    let mut rng = StdRng::seed_from_u64(config.seed);
    let band = band_of(&own_setpoint(&config, "", config.desired_celsius));
    let mut rooms: Vec<Room> = (0..config.rooms)
        .map(|i| Room {
            sensor: config.sensor(i),
            celsius: rng.random_range(15.0..19.0),
            heater_on: false,
            stuck: false,
            report_due: false,
            sequence: None,
            band,
            level: pb::SetpointLevel::Default,
            levels_revision: None,
            override_until: None,
        })
        .collect();

    let mut plan = Plan::default();
    let api = match &config.api_addr {
        Some(addr) => {
            // Bounded calls: a tick waits for its poll of the setpoints, and a service that
            // stopped answering must not stop the building (nor Ctrl-C).
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| SimError::Invalid(format!("SIM_API_ADDR: {e}")))?
                .connect_timeout(API_TIMEOUT)
                .timeout(API_TIMEOUT)
                .connect()
                .await?;
            let mut api = pb::setpoint_service_client::SetpointServiceClient::new(channel.clone());
            for room in &rooms {
                let setpoint = own_setpoint(&config, &room.sensor, config.desired_celsius);
                api.put_setpoint(put_request(&config, setpoint)?).await?;
            }
            let mut schedules = pb::schedule_service_client::ScheduleServiceClient::new(channel);
            plan.schedule = write_schedule(&config, &mut schedules, Utc::now()).await?;
            plan.overridden = write_override(&config, &mut api).await?;
            Some(api)
        }
        None => None,
    };

    // Heater states come from the command topic, from its beginning: a heater is in the state of
    // the last command sent to it, even one sent before this run. Assigned here, so that a
    // missing topic stops the run now rather than leaving every heater off unnoticed.
    let consumer = command_consumer(&kafka).await?;
    let producer = stream::producer(&kafka)?;
    let mut summary = Summary {
        rooms: rooms.iter().map(|r| r.sensor.clone()).collect(),
        samples: vec![Vec::new(); rooms.len()],
        plan,
        ..Summary::default()
    };
    write_plot(&config, &summary)?;
    // Spawned last: every return from here on goes past its abort below.
    let (commands_tx, commands) = mpsc::channel(4096);
    let mut follower = tokio::spawn(follow_commands(consumer, commands_tx, shutdown.clone()));
    let ran = Run {
        config: &config,
        model,
        kafka: &kafka,
        producer: &producer,
        rng,
        api,
    }
    .simulate(&mut rooms, &mut summary, commands, &mut follower, &shutdown)
    .await;
    follower.abort();
    check_plan(&summary, Utc::now());
    let plotted = write_plot(&config, &summary);
    ran?;
    plotted?;
    Ok(summary)
}

/// What the ticks of a run use.
struct Run<'a> {
    config: &'a BuildingConfig,
    model: ThermalModel,
    kafka: &'a KafkaConfig,
    producer: &'a rdkafka::producer::FutureProducer,
    rng: StdRng,
    api: Option<pb::setpoint_service_client::SetpointServiceClient<tonic::transport::Channel>>,
}

/// Applies the heater commands that arrived, as the rooms' heaters would.
fn obey_commands(
    commands: &mut mpsc::Receiver<pb::HeaterCommandEvent>,
    index: &HashMap<String, usize>,
    rooms: &mut [Room],
    summary: &mut Summary,
    minutes: f64,
) {
    while let Ok(event) = commands.try_recv() {
        let Some(&i) = index.get(&event.sensor_id) else {
            continue;
        };
        let on = event.command() == pb::HeaterCommand::On;
        if rooms[i].obey(event.sequence, on) {
            summary.commands_applied += 1;
            summary.commands.push(AppliedCommand {
                room: i,
                simulated_minutes: minutes,
                heater_on: on,
                reason: event.reason(),
                setpoint_revision: event.setpoint_revision,
                setpoint_level: event.setpoint_level(),
                level_revision: event.level_revision,
                celsius: event.temperature_celsius,
                decided_at: event.decided_at.as_ref().and_then(from_timestamp),
            });
        }
    }
}

/// The building's state, every 10 s of the run, and how many switches were held back so far.
fn log_progress(rooms: &[Room], summary: &Summary, minutes: f64) {
    let in_band = rooms
        .iter()
        .filter(|r| r.celsius >= r.band.0 && r.celsius <= r.band.1)
        .count();
    let heating = rooms.iter().filter(|r| r.heater_on).count();
    let deciding = [
        pb::SetpointLevel::Default,
        pb::SetpointLevel::Schedule,
        pb::SetpointLevel::Override,
        pb::SetpointLevel::Safety,
    ]
    .into_iter()
    .filter_map(|level| {
        let n = rooms.iter().filter(|r| r.level == level).count();
        (n > 0).then(|| format!("{} {n}", level_name(level)))
    })
    .collect::<Vec<_>>()
    .join(", ");
    tracing::info!(
        simulated_minutes = minutes as u64,
        in_band,
        heating,
        rooms = rooms.len(),
        %deciding,
        deferred = summary.deferred(),
        max_run_offs = summary.max_run_offs(),
        "building"
    );
}

impl Run<'_> {
    async fn simulate(
        mut self,
        rooms: &mut [Room],
        summary: &mut Summary,
        mut commands: mpsc::Receiver<pb::HeaterCommandEvent>,
        follower: &mut JoinHandle<Result<(), SimError>>,
        shutdown: &CancellationToken,
    ) -> Result<(), SimError> {
        let config = self.config;
        let index: HashMap<String, usize> = rooms
            .iter()
            .enumerate()
            .map(|(i, r)| (r.sensor.clone(), i))
            .collect();
        let minutes_per_tick = config.reading_interval.as_secs_f64() * config.time_scale / 60.0;
        let started = Instant::now();
        let deadline = config.duration.map(|d| started + d);
        let mut ticks = tokio::time::interval(config.reading_interval);
        // After a stall (a slow call to the service), carry on from now: a burst of the missed
        // ticks would jump the rooms ahead in simulated time.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut minutes = 0.0;
        let mut last_progress = started;
        let mut last_plot = started;
        let mut last_poll: Option<Instant> = None;
        let mut last_reports: Option<f64> = None;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = until(deadline) => break,
                ended = &mut *follower => {
                    return Err(match ended {
                        Ok(Err(e)) => SimError::Follower(thermostat::error::error_chain(&e)),
                        Ok(Ok(())) => SimError::Follower("it ended".into()),
                        Err(e) => SimError::Follower(e.to_string()),
                    });
                }
                _ = ticks.tick() => {}
            }
            obey_commands(&mut commands, &index, rooms, summary, minutes);
            self.stick_heater_once(rooms, summary, started, minutes);
            self.change_setpoint_once(rooms, summary, started, minutes)
                .await?;
            if last_poll.is_none_or(|at| at.elapsed() >= BAND_POLL) {
                last_poll = Some(Instant::now());
                self.follow_setpoints(rooms, &index, summary, minutes).await;
            }
            minutes += minutes_per_tick;
            self.tick_rooms(rooms, summary, minutes, minutes_per_tick)
                .await?;
            self.send_reports(rooms, summary, minutes, &mut last_reports)
                .await?;
            if last_plot.elapsed() >= PLOT_EVERY {
                last_plot = Instant::now();
                // The run goes on; the plot is written again at the end.
                if let Err(e) = write_plot(config, summary) {
                    tracing::warn!(error = %e, "plot not written");
                }
            }
            if last_progress.elapsed() >= Duration::from_secs(10) {
                last_progress = Instant::now();
                log_progress(rooms, summary, minutes);
            }
        }
        Ok(())
    }

    /// Whether the heaters report their state (HEATER_REPORT_TOPIC).
    fn reports(&self) -> bool {
        !self.kafka.heater_report_topic.is_empty()
    }

    /// The heater that stops obeying (`stuck_after`), once, stuck OFF: it still reports, so the
    /// service can tell that it does not follow its command.
    fn stick_heater_once(
        &self,
        rooms: &mut [Room],
        summary: &mut Summary,
        started: Instant,
        minutes: f64,
    ) {
        let Some(i) = self.config.stuck_room(self.reports()) else {
            return;
        };
        if summary.stuck.is_some() || started.elapsed() < self.config.stuck_after {
            return;
        }
        let room = &mut rooms[i];
        (room.stuck, room.heater_on, room.report_due) = (true, false, true);
        summary.stuck = Some(StuckHeater {
            room: i,
            simulated_minutes: minutes,
        });
        tracing::info!(
            sensor = %room.sensor,
            "this heater stops obeying (stuck OFF) and reports so: the service should flag it as not following"
        );
    }

    /// Reports heaters' actual state to HEATER_REPORT_TOPIC, if set, as a gateway: a heater
    /// that took a command (or stuck) at once, every heater every few simulated minutes.
    async fn send_reports(
        &mut self,
        rooms: &mut [Room],
        summary: &mut Summary,
        minutes: f64,
        last: &mut Option<f64>,
    ) -> Result<(), SimError> {
        if !self.reports() {
            return Ok(());
        }
        let every = last.is_none_or(|at| minutes - at >= REPORT_EVERY_MINUTES);
        if every {
            *last = Some(minutes);
        }
        let now = Utc::now();
        for room in rooms.iter_mut().filter(|r| every || r.report_due) {
            room.report_due = false;
            let payload =
                report_payload(self.kafka.sensor_format, &room.sensor, room.heater_on, now);
            send(
                self.producer,
                &self.kafka.heater_report_topic,
                &room.sensor,
                &payload,
            )
            .await?;
            summary.reports_sent += 1;
        }
        Ok(())
    }

    /// The operator's change the run was asked for (`change_after`), once.
    async fn change_setpoint_once(
        &mut self,
        rooms: &mut [Room],
        summary: &mut Summary,
        started: Instant,
        minutes: f64,
    ) -> Result<(), SimError> {
        let config = self.config;
        let (Some(after), None) = (config.change_after, summary.change_at_minutes) else {
            return Ok(());
        };
        if started.elapsed() < after {
            return Ok(());
        }
        if let (Some(api), Some(room)) = (&mut self.api, rooms.first_mut()) {
            let desired = config.desired_celsius + config.change_by;
            let setpoint = own_setpoint(config, &room.sensor, desired);
            let band = band_of(&setpoint);
            api.put_setpoint(put_request(config, setpoint)?).await?;
            summary.change_at_minutes = Some(minutes);
            // A DEFAULT change: beneath a schedule or an override it waits until they end.
            if room.level == pb::SetpointLevel::Default {
                room.band = band;
                tracing::info!(sensor = %room.sensor, desired, "setpoint changed");
            } else {
                tracing::info!(
                    sensor = %room.sensor,
                    desired,
                    deciding = %level_name(room.level),
                    "setpoint changed at the DEFAULT level, beneath the level deciding now"
                );
            }
        }
        Ok(())
    }

    /// Advances every room by one tick and sends its (noisy) reading.
    async fn tick_rooms(
        &mut self,
        rooms: &mut [Room],
        summary: &mut Summary,
        minutes: f64,
        minutes_per_tick: f64,
    ) -> Result<(), SimError> {
        let config = self.config;
        let now = Utc::now();
        for (i, room) in rooms.iter_mut().enumerate() {
            room.celsius = self
                .model
                .advance(room.celsius, room.heater_on, minutes_per_tick);
            let measured = room.celsius + config.noise_celsius * standard_normal(&mut self.rng);
            let payload = reading_payload(self.kafka.sensor_format, &room.sensor, measured, now);
            send(
                self.producer,
                &self.kafka.sensor_topic,
                &room.sensor,
                &payload,
            )
            .await?;
            summary.readings_sent += 1;
            summary.samples[i].push(Sample {
                simulated_minutes: minutes,
                celsius: room.celsius,
                heater_on: room.heater_on,
                band: room.band,
                level: room.level,
            });
        }
        Ok(())
    }

    /// Takes each room's band and level from its effective setpoint: the building's setpoints
    /// are listed, and the priority array of each room whose revision moved is read (any level's
    /// change, an expiry or a schedule's transition, raises it). A failure only leaves the
    /// bands as they were: the service may be restarting.
    async fn follow_setpoints(
        &mut self,
        rooms: &mut [Room],
        index: &HashMap<String, usize>,
        summary: &mut Summary,
        minutes: f64,
    ) {
        let Some(api) = &mut self.api else {
            return;
        };
        let mut moved = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = authorized(
                self.config,
                pb::ListSetpointsRequest {
                    building_id: self.config.building_id.clone(),
                    page_size: 1000,
                    page_token,
                },
            );
            let page = match request {
                Ok(request) => api.list_setpoints(request).await,
                Err(e) => {
                    tracing::warn!(error = %e, "setpoints not read");
                    return;
                }
            };
            let page = match page {
                Ok(page) => page.into_inner(),
                Err(status) => {
                    tracing::warn!(%status, "setpoints not read");
                    return;
                }
            };
            for setpoint in &page.setpoints {
                if let Some(&i) = index.get(&setpoint.sensor_id) {
                    if rooms[i].levels_revision != Some(setpoint.revision) {
                        moved.push(i);
                    }
                }
            }
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let changes = read_moved_levels(api, self.config, rooms, moved, minutes).await;
        log_changes(rooms, &changes);
        summary.level_changes.extend(changes);
    }
}

/// Reads the priority arrays of the rooms in `moved` (indices into `rooms`), at most
/// [`LEVEL_READS_PER_POLL`] of them, and has each room follow its own; the changes seen. A failure
/// stops the reading: the rooms not read are read at a later poll.
async fn read_moved_levels(
    api: &mut pb::setpoint_service_client::SetpointServiceClient<tonic::transport::Channel>,
    config: &BuildingConfig,
    rooms: &mut [Room],
    mut moved: Vec<usize>,
    minutes: f64,
) -> Vec<LevelChange> {
    // The plotted rooms come first; the rest wait for the next polls rather than spend the
    // caller's read budget at once.
    moved.sort_unstable();
    let mut changes = Vec::new();
    for i in moved.into_iter().take(LEVEL_READS_PER_POLL) {
        let request = pb::GetSetpointLevelsRequest {
            sensor_id: rooms[i].sensor.clone(),
        };
        let levels = match authorized(config, request) {
            Ok(request) => api.get_setpoint_levels(request).await,
            Err(e) => {
                tracing::warn!(error = %e, "setpoint levels not read");
                break;
            }
        };
        let levels = match levels {
            Ok(levels) => levels.into_inner(),
            Err(status) => {
                tracing::warn!(%status, sensor = %rooms[i].sensor, "setpoint levels not read");
                break;
            }
        };
        let now = Utc::now();
        if let Some((kind, from)) = rooms[i].follow(&levels, now) {
            changes.push(LevelChange {
                room: i,
                simulated_minutes: minutes,
                observed_at: now,
                kind,
                from,
                to: rooms[i].level,
                band: rooms[i].band,
            });
        }
    }
    changes
}

/// At most this many priority arrays are read in one poll.
const LEVEL_READS_PER_POLL: usize = 25;

/// Completes at `deadline`; never without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The plot is rewritten this often during a run (so it can be looked at before the end) and
/// once more at the end.
const PLOT_EVERY: Duration = Duration::from_secs(30);

fn write_plot(config: &BuildingConfig, summary: &Summary) -> Result<(), SimError> {
    if let Some(path) = &config.plot {
        plot::write_svg(path, summary, config.plot_rooms).map_err(SimError::Plot)?;
        tracing::info!(path = %path.display(), "plot written");
    }
    Ok(())
}

/// `desired` with the configured delta, for presets and levels.
fn own_values(config: &BuildingConfig, desired: f64) -> pb::SetpointValues {
    pb::SetpointValues {
        desired_celsius: desired,
        up_delta_celsius: config.delta_celsius,
        down_delta_celsius: config.delta_celsius,
    }
}

/// The setpoint the simulator makes for `sensor`: `desired`, with the configured delta.
fn own_setpoint(config: &BuildingConfig, sensor: &str, desired: f64) -> pb::Setpoint {
    pb::Setpoint {
        sensor_id: sensor.to_owned(),
        building_id: config.building_id.clone(),
        desired_celsius: desired,
        up_delta_celsius: config.delta_celsius,
        down_delta_celsius: config.delta_celsius,
        reason: "simulated building".into(),
        ..Default::default()
    }
}

/// A Put of `setpoint`, with the configured bearer token.
fn put_request(
    config: &BuildingConfig,
    setpoint: pb::Setpoint,
) -> Result<tonic::Request<pb::PutSetpointRequest>, SimError> {
    authorized(
        config,
        pb::PutSetpointRequest {
            setpoint: Some(setpoint),
            ..Default::default()
        },
    )
}

/// `message` as a request with the configured bearer token.
fn authorized<T>(config: &BuildingConfig, message: T) -> Result<tonic::Request<T>, SimError> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = &config.api_token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| SimError::Invalid("SIM_API_TOKEN is not a valid header value".into()))?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

/// A standard normal sample (Box–Muller), so the noise needs no distribution crate.
fn standard_normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Produces a reading or a report of `sensor`, keyed by it, in SENSOR_FORMAT as a gateway does
/// (`thermostat::stream::topics`).
async fn send(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    sensor: &str,
    payload: &[u8],
) -> Result<(), StreamError> {
    let record = FutureRecord::to(topic).key(sensor).payload(payload);
    // Fire and forget: a lost reading or report is what a real sensor network does too.
    stream::enqueue(producer, record).await.map(drop)
}

/// A consumer of every partition of the command topic, from its beginning.
async fn command_consumer(kafka: &KafkaConfig) -> Result<Arc<StreamConsumer>, SimError> {
    let consumer: Arc<StreamConsumer> = Arc::new(
        stream::consumer_config(kafka, "thermostat-simulator")?
            .set("enable.auto.commit", "false")
            .create()
            .map_err(StreamError::Config)?,
    );
    let partitions =
        stream::commands::partition_ids(consumer.clone(), kafka.command_topic.clone()).await?;
    let mut assignment = TopicPartitionList::new();
    for p in partitions {
        assignment
            .add_partition_offset(&kafka.command_topic, p, Offset::Beginning)
            .map_err(StreamError::Consumer)?;
    }
    consumer
        .assign(&assignment)
        .map_err(StreamError::Consumer)?;
    Ok(consumer)
}

/// Hands every command event read to the run until `shutdown`. Records that are not command
/// events are skipped: the simulated heaters obey what they understand.
async fn follow_commands(
    consumer: Arc<StreamConsumer>,
    commands: mpsc::Sender<pb::HeaterCommandEvent>,
    shutdown: CancellationToken,
) -> Result<(), SimError> {
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            message = consumer.recv() => message,
        };
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(error = %e, "command topic");
                continue;
            }
        };
        let Ok(event) = pb::HeaterCommandEvent::decode(message.payload().unwrap_or_default())
        else {
            continue;
        };
        if commands.send(event).await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use thermostat::proto::timestamp;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        building: BuildingConfig,
    }

    pub(super) fn building(args: &[&str]) -> Result<BuildingConfig, clap::Error> {
        let args = std::iter::once("simulate").chain(args.iter().copied());
        Cli::try_parse_from(args).map(|cli| cli.building)
    }

    fn room() -> Room {
        Room {
            sensor: "b/room-00".into(),
            celsius: 18.0,
            heater_on: false,
            stuck: false,
            report_due: false,
            sequence: None,
            band: (20.5, 21.5),
            level: pb::SetpointLevel::Default,
            levels_revision: None,
            override_until: None,
        }
    }

    fn entry(
        level: pb::SetpointLevel,
        desired: f64,
        expires: Option<DateTime<Utc>>,
    ) -> pb::SetpointLevelEntry {
        pb::SetpointLevelEntry {
            level: level.into(),
            desired_celsius: desired,
            up_delta_celsius: 0.5,
            down_delta_celsius: 0.5,
            expire_time: expires.map(timestamp),
            ..Default::default()
        }
    }

    fn levels(
        revision: i64,
        effective: pb::SetpointLevel,
        entries: Vec<pb::SetpointLevelEntry>,
    ) -> pb::SetpointLevels {
        pb::SetpointLevels {
            revision,
            effective_level: effective.into(),
            levels: entries,
            ..Default::default()
        }
    }

    pub(super) fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn a_heater_obeys_only_commands_newer_than_the_last_it_obeyed() {
        let mut room = room();
        assert!(room.obey(3, true));
        assert!(room.heater_on);
        // A retried write of an older OFF landing late, and the same ON again.
        assert!(!room.obey(2, false));
        assert!(!room.obey(3, false));
        assert!(room.heater_on);
        assert!(room.obey(4, false));
        assert!(!room.heater_on);
        // The first command a heater sees may have any sequence, 0 included.
        let mut fresh = self::room();
        assert!(fresh.obey(0, true));
        assert_eq!(fresh.sequence, Some(0));
        // Each command taken is reported at once; a stuck heater takes it and stays OFF.
        assert!(fresh.report_due);
        let mut stuck = Room {
            stuck: true,
            ..self::room()
        };
        assert!(stuck.obey(1, true));
        assert!(!stuck.heater_on && stuck.report_due);
        assert_eq!(stuck.sequence, Some(1));
    }

    #[test]
    fn the_stuck_heater_is_the_last_room_s_of_a_building_whose_heaters_report() {
        let config = building(&[]).unwrap();
        assert_eq!(config.stuck_room(true), Some(19));
        assert_eq!(config.stuck_room(false), None, "nobody would know");
        // Rooms 00 to 02 have their roles; none stuck, or none wanted.
        assert_eq!(
            building(&["--rooms", "4"]).unwrap().stuck_room(true),
            Some(3)
        );
        assert_eq!(building(&["--rooms", "3"]).unwrap().stuck_room(true), None);
        let none = building(&["--stuck-after", "0s"]).unwrap();
        assert_eq!(none.stuck_room(true), None);
    }

    #[test]
    fn a_room_follows_its_effective_level_and_tells_an_expiry_from_a_transition() {
        use pb::SetpointLevel::{Default as D, Override as O, Schedule as S};
        let now = at("2026-03-02T10:00:00Z");
        let mut room = room();
        let expires = now + TimeDelta::seconds(30);
        // The first read is where the room starts, not a change.
        let first = levels(
            3,
            O,
            vec![entry(O, 24.0, Some(expires)), entry(D, 21.0, None)],
        );
        assert_eq!(room.follow(&first, now), None);
        assert_eq!(
            (room.level, room.band, room.levels_revision),
            (O, (23.5, 24.5), Some(3))
        );
        // The schedule begins beneath the override: nothing the room sees changes.
        let hidden = levels(
            4,
            O,
            vec![
                entry(O, 24.0, Some(expires)),
                entry(S, 22.0, None),
                entry(D, 21.0, None),
            ],
        );
        assert_eq!(room.follow(&hidden, now), None);
        // The override expires into the schedule.
        let expired = levels(5, S, vec![entry(S, 22.0, None), entry(D, 21.0, None)]);
        assert_eq!(
            room.follow(&expired, expires + TimeDelta::seconds(1)),
            Some((ChangeKind::OverrideExpired, O))
        );
        assert_eq!((room.level, room.band), (S, (21.5, 22.5)));
        // The schedule's next period, then its end.
        let eco = levels(6, S, vec![entry(S, 18.0, None), entry(D, 21.0, None)]);
        assert_eq!(
            room.follow(&eco, now),
            Some((ChangeKind::ScheduleTransition, S))
        );
        let ended = levels(7, D, vec![entry(D, 21.0, None)]);
        assert_eq!(
            room.follow(&ended, now),
            Some((ChangeKind::ScheduleTransition, S))
        );
        assert_eq!((room.level, room.band), (D, (20.5, 21.5)));
        // An operator's override, relinquished long before it would expire.
        let held = levels(
            8,
            O,
            vec![
                entry(O, 25.0, Some(now + TimeDelta::hours(1))),
                entry(D, 21.0, None),
            ],
        );
        assert_eq!(room.follow(&held, now), Some((ChangeKind::Changed, D)));
        assert_eq!(
            room.follow(&ended, now),
            Some((ChangeKind::OverrideEnded, O))
        );
    }

    #[test]
    fn the_defaults_describe_a_building() {
        let config = building(&[]).unwrap();
        assert_eq!(config.rooms, 20);
        assert_eq!(config.check().unwrap(), ThermalModel::default());
        // A winter's day.
        let cold = building(&["--outside-celsius", "-12.5"]).unwrap();
        assert_eq!(cold.check().unwrap().outside_celsius, -12.5);
    }

    #[test]
    fn options_that_describe_no_building_are_refused_before_anything_runs() {
        for args in [
            &["--rooms", "0"][..],
            &["--plot-rooms", "0"],
            &["--time-scale", "0"],
            &["--time-scale", "inf"],
            &["--time-scale", "NaN"],
            &["--noise-celsius=-1"],
            &["--delta-celsius=-0.5"],
            &["--desired-celsius", "inf"],
            &["--change-by", "NaN"],
            &["--loss-per-minute", "2"],
            &["--heating-per-minute=-1"],
            &["--schedule-zone", "Mars/Olympus_Mons"],
            &["--schedule-after", "25h"],
            &["--schedule-period", "13h"],
            &["--override-for", "500ms"],
        ] {
            let config = building(args).unwrap();
            let refused = config.check().expect_err(&format!("{args:?}"));
            assert!(matches!(refused, SimError::Invalid(_)), "{args:?}");
        }
        // Zero durations are refused by the parser, not discovered by a run that never ticks.
        assert!(building(&["--duration", "0s"]).is_err());
        assert!(building(&["--reading-interval", "0s"]).is_err());
    }

    #[test]
    fn a_band_is_the_setpoint_s_desired_less_down_to_desired_plus_up() {
        let setpoint = pb::Setpoint {
            desired_celsius: 21.0,
            up_delta_celsius: 0.3,
            down_delta_celsius: 1.0,
            ..Default::default()
        };
        assert_eq!(band_of(&setpoint), (20.0, 21.3));
    }
}
