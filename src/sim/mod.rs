//! `thermostat simulate`: a closed-loop simulated building. Each room has a sensor, a heater and
//! a thermal model; the simulator publishes readings to the sensor topic and applies the heater
//! commands it reads from the command topic, so the service is the building's thermostat.
//!
//! Time: each tick advances the rooms by `reading_interval × time_scale` of simulated time, but
//! readings are stamped with the wall clock (the service rejects readings from the future).

pub mod model;
mod plot;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prost::Message as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::convert::timestamp;
use crate::config::KafkaConfig;
use crate::proto::v1 as pb;
use crate::stream::{self, StreamError};
pub use model::ThermalModel;

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
    #[arg(long, env = "SIM_READING_INTERVAL", default_value = "1s", value_parser = crate::config::positive_duration)]
    pub reading_interval: Duration,
    /// Simulated seconds per real second.
    #[arg(long, env = "SIM_TIME_SCALE", default_value_t = 60.0)]
    pub time_scale: f64,
    /// Stop after this long (real time); without it, run until Ctrl-C.
    #[arg(long, env = "SIM_DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Seed of the random start temperatures and noise, for repeatable runs.
    #[arg(long, env = "SIM_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Standard deviation of the measurement noise, °C.
    #[arg(long, env = "SIM_NOISE_CELSIUS", default_value_t = 0.05)]
    pub noise_celsius: f64,
    /// Outside temperature, °C: where an unheated room drifts to.
    #[arg(long, env = "SIM_OUTSIDE_CELSIUS", default_value_t = 5.0)]
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
}

/// One sample of one room, for the plot and the summary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub simulated_minutes: f64,
    pub celsius: f64,
    pub heater_on: bool,
    /// The band the room should be in: (desired - delta, desired + delta).
    pub band: (f64, f64),
}

/// What happened to every room.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub rooms: Vec<String>,
    /// Per room, in time order.
    pub samples: Vec<Vec<Sample>>,
    pub readings_sent: u64,
    pub commands_applied: u64,
    /// Simulated minute of the setpoint change, if one was made.
    pub change_at_minutes: Option<f64>,
}

struct Room {
    sensor: String,
    celsius: f64,
    heater_on: bool,
    band: (f64, f64),
}

/// Runs the building until `duration` or `shutdown`.
pub async fn run(sim: SimConfig, shutdown: CancellationToken) -> Result<Summary, SimError> {
    let SimConfig {
        kafka,
        building: config,
    } = sim;
    if !(config.time_scale > 0.0 && config.reading_interval > Duration::ZERO) {
        return Err(SimError::Invalid(
            "SIM_TIME_SCALE and SIM_READING_INTERVAL must be positive".into(),
        ));
    }
    let model = ThermalModel {
        outside_celsius: config.outside_celsius,
        heating_per_minute: config.heating_per_minute,
        loss_per_minute: config.loss_per_minute,
    };
    let mut rng = StdRng::seed_from_u64(config.seed);
    let band = (
        config.desired_celsius - config.delta_celsius,
        config.desired_celsius + config.delta_celsius,
    );
    let mut rooms: Vec<Room> = (0..config.rooms)
        .map(|i| Room {
            sensor: format!("{}/room-{i:02}", config.building_id),
            celsius: rng.random_range(15.0..19.0),
            heater_on: false,
            band,
        })
        .collect();
    let index: HashMap<String, usize> = rooms
        .iter()
        .enumerate()
        .map(|(i, r)| (r.sensor.clone(), i))
        .collect();

    let mut api = match &config.api_addr {
        Some(addr) => Some(
            pb::setpoint_service_client::SetpointServiceClient::connect(format!("http://{addr}"))
                .await?,
        ),
        None => None,
    };
    if let Some(api) = &mut api {
        for room in &rooms {
            api.put_setpoint(put_request(&config, &room.sensor, config.desired_celsius)?)
                .await?;
        }
    }

    // Heater states come from the command topic, from its beginning: a heater is in the state of
    // the last command sent to it, even one sent before this run.
    let (commands_tx, mut commands) = mpsc::channel(4096);
    let follower = tokio::spawn(follow_commands(
        kafka.clone(),
        commands_tx,
        shutdown.clone(),
    ));
    let producer = stream::producer(&kafka)?;

    let minutes_per_tick = config.reading_interval.as_secs_f64() * config.time_scale / 60.0;
    let started = tokio::time::Instant::now();
    let mut ticks = tokio::time::interval(config.reading_interval);
    let mut summary = Summary {
        rooms: rooms.iter().map(|r| r.sensor.clone()).collect(),
        samples: vec![Vec::new(); rooms.len()],
        ..Summary::default()
    };
    let mut minutes = 0.0;
    let mut last_progress = started;
    let mut last_plot = started;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        if config.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        while let Ok((sensor, on)) = commands.try_recv() {
            if let Some(&i) = index.get(&sensor) {
                rooms[i].heater_on = on;
                summary.commands_applied += 1;
            }
        }
        if let (Some(after), None) = (config.change_after, summary.change_at_minutes) {
            if started.elapsed() >= after {
                if let (Some(api), Some(room)) = (&mut api, rooms.first_mut()) {
                    let desired = config.desired_celsius + config.change_by;
                    api.put_setpoint(put_request(&config, &room.sensor, desired)?)
                        .await?;
                    room.band = (
                        desired - config.delta_celsius,
                        desired + config.delta_celsius,
                    );
                    summary.change_at_minutes = Some(minutes);
                    tracing::info!(sensor = %room.sensor, desired, "setpoint changed");
                }
            }
        }
        minutes += minutes_per_tick;
        let now = Utc::now();
        for (i, room) in rooms.iter_mut().enumerate() {
            room.celsius = model.advance(room.celsius, room.heater_on, minutes_per_tick);
            let measured = room.celsius + config.noise_celsius * standard_normal(&mut rng);
            send_reading(&producer, &kafka.sensor_topic, &room.sensor, measured, now).await?;
            summary.readings_sent += 1;
            summary.samples[i].push(Sample {
                simulated_minutes: minutes,
                celsius: room.celsius,
                heater_on: room.heater_on,
                band: room.band,
            });
        }
        if last_plot.elapsed() >= PLOT_EVERY {
            last_plot = tokio::time::Instant::now();
            write_plot(&config, &summary)?;
        }
        if last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = tokio::time::Instant::now();
            let in_band = rooms
                .iter()
                .filter(|r| r.celsius >= r.band.0 && r.celsius <= r.band.1)
                .count();
            let heating = rooms.iter().filter(|r| r.heater_on).count();
            tracing::info!(
                simulated_minutes = minutes as u64,
                in_band,
                heating,
                rooms = rooms.len(),
                "building"
            );
        }
    }
    follower.abort();
    write_plot(&config, &summary)?;
    Ok(summary)
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

/// A Put of `sensor`'s setpoint, with the configured bearer token.
fn put_request(
    config: &BuildingConfig,
    sensor: &str,
    desired: f64,
) -> Result<tonic::Request<pb::PutSetpointRequest>, SimError> {
    let mut request = tonic::Request::new(pb::PutSetpointRequest {
        setpoint: Some(pb::Setpoint {
            sensor_id: sensor.to_owned(),
            building_id: config.building_id.clone(),
            desired_celsius: desired,
            up_delta_celsius: config.delta_celsius,
            down_delta_celsius: config.delta_celsius,
            reason: "simulated building".into(),
            ..Default::default()
        }),
        expected_revision: None,
    });
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

async fn send_reading(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    sensor: &str,
    celsius: f64,
    time: DateTime<Utc>,
) -> Result<(), StreamError> {
    let payload = pb::SensorReading {
        sensor_id: sensor.to_owned(),
        temperature_celsius: Some(celsius),
        reading_time: Some(timestamp(time)),
    }
    .encode_to_vec();
    let record = FutureRecord::to(topic).key(sensor).payload(&payload);
    // Fire and forget: a lost reading is what a real sensor network does too.
    stream::enqueue(producer, record).await.map(drop)
}

async fn follow_commands(
    kafka: KafkaConfig,
    commands: mpsc::Sender<(String, bool)>,
    shutdown: CancellationToken,
) -> Result<(), SimError> {
    let consumer: Arc<StreamConsumer> = Arc::new(
        stream::consumer_config(&kafka, "thermostat-simulator")
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
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            message = consumer.recv() => message,
        };
        let Ok(message) = message else { continue };
        let Ok(event) = pb::HeaterCommandEvent::decode(message.payload().unwrap_or_default())
        else {
            continue;
        };
        let on = event.command() == pb::HeaterCommand::On;
        if commands.send((event.sensor_id, on)).await.is_err() {
            return Ok(());
        }
    }
}
