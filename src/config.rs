//! Configuration: one typed struct per command, parsed once by clap. Every option is a flag
//! with an environment-variable equivalent and a default that works on a developer machine.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "thermostat",
    version,
    about = "Keeps buildings at the temperature their operators ask for"
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogConfig,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC service (applies pending migrations first).
    Serve(ServeConfig),
    /// Apply pending database migrations and exit.
    Migrate(DatabaseConfig),
    /// Create the sensor, command and dead-letter topics (existing ones are kept).
    CreateTopics(CreateTopicsConfig),
    /// Produce one sensor reading to the sensor topic, as a building gateway would.
    SendReading(SendReadingConfig),
    /// Run a simulated building whose thermostat is the service.
    Simulate(crate::sim::SimConfig),
    /// The service and a simulated building in one process (the main job).
    Demo(crate::demo::DemoConfig),
}

#[derive(Debug, Clone, Args)]
pub struct CreateTopicsConfig {
    #[command(flatten)]
    pub kafka: KafkaConfig,
    /// Partitions per topic: the most replicas that can share the readings.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 3)]
    pub partitions: i32,
    /// Copies of each partition.
    #[arg(long, env = "TOPIC_REPLICATION", default_value_t = 1)]
    pub replication: i32,
}

#[derive(Debug, Clone, Args)]
pub struct SendReadingConfig {
    #[command(flatten)]
    pub kafka: KafkaConfig,
    /// The sensor the reading is from.
    pub sensor_id: String,
    /// The temperature, in degrees Celsius.
    #[arg(allow_negative_numbers = true)]
    pub temperature_celsius: f64,
    /// When it was measured (RFC 3339); default: now.
    #[arg(long)]
    pub reading_time: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct LogConfig {
    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter in tracing's EnvFilter syntax, e.g. `info,thermostat=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info", global = true)]
    pub log_filter: String,
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseConfig {
    /// PostgreSQL connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/thermostat"
    )]
    pub database_url: String,
    /// Largest number of pooled database connections.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,
    /// How long a request waits for a database connection before failing with UNAVAILABLE.
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub database_acquire_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SensorFormat {
    /// `thermostat.v1.SensorReading`, protobuf-encoded.
    Protobuf,
    /// `{"sensor_id": "…", "temperature_celsius": 21.5, "reading_time": "RFC 3339"}`.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct KafkaConfig {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Topic the sensor readings are consumed from (key = sensor_id).
    #[arg(long, env = "SENSOR_TOPIC", default_value = "sensor-readings")]
    pub sensor_topic: String,
    /// Encoding of the records on the sensor topic.
    #[arg(long, env = "SENSOR_FORMAT", value_enum, default_value_t = SensorFormat::Protobuf)]
    pub sensor_format: SensorFormat,
    /// Topic heater commands are produced to (key = sensor_id).
    #[arg(long, env = "COMMAND_TOPIC", default_value = "heater-commands")]
    pub command_topic: String,
    /// Topic bad sensor records are moved to, with the reason in a header.
    #[arg(long, env = "DEAD_LETTER_TOPIC", default_value = "sensor-readings-dlq")]
    pub dead_letter_topic: String,
    /// Consumer group shared by all replicas for the sensor topic.
    #[arg(long, env = "CONSUMER_GROUP", default_value = "thermostat")]
    pub consumer_group: String,
    /// Static group membership (`group.instance.id`): a stable name per replica, e.g. the pod
    /// name, so that a restart within the session timeout does not rebalance the group.
    #[arg(long, env = "KAFKA_GROUP_INSTANCE_ID")]
    pub kafka_group_instance_id: Option<String>,
    /// How long the broker may hold a fetch waiting for data: the latency floor of the loop.
    #[arg(long, env = "KAFKA_FETCH_WAIT_MAX", default_value = "10ms", value_parser = humantime::parse_duration)]
    pub kafka_fetch_wait_max: Duration,
    /// Most records per produce batch. 1 works around Tansu 0.6, whose memory storage cannot
    /// serve a fetch that starts inside a batch; raise it (e.g. 10000) on Apache Kafka.
    #[arg(long, env = "KAFKA_BATCH_NUM_MESSAGES", default_value_t = 1)]
    pub kafka_batch_num_messages: u32,
    /// How long the producer waits to batch commands before sending.
    #[arg(long, env = "KAFKA_LINGER", default_value = "1ms", value_parser = humantime::parse_duration)]
    pub kafka_linger: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct ControlConfig {
    /// A controlled sensor with no reading for this long gets OFF (the fail-safe); also, a
    /// setpoint change re-evaluates only readings younger than this.
    #[arg(long, env = "STALE_AFTER", default_value = "5m", value_parser = humantime::parse_duration)]
    pub stale_after: Duration,
    /// How often sensors are checked for staleness.
    #[arg(long, env = "STALE_CHECK_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub stale_check_interval: Duration,
    /// How often the setpoint cache is re-read in full, besides LISTEN/NOTIFY updates.
    #[arg(long, env = "SETPOINT_RESYNC_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub setpoint_resync_interval: Duration,
    /// Commands a subscriber may fall behind by before its stream is ended with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "SUBSCRIBER_BUFFER", default_value_t = 1024)]
    pub subscriber_buffer: usize,
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub control: ControlConfig,
    /// Address the gRPC server listens on (port 0 picks a free port).
    #[arg(long, env = "GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// Address of the admin HTTP server: `/metrics` (Prometheus) and `/livez`.
    #[arg(long, env = "ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,
    /// How often the database is probed for the health service.
    #[arg(long, env = "HEALTH_CHECK_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub health_check_interval: Duration,
    /// After SIGTERM/SIGINT, how long in-flight calls get to finish before the process exits.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
}

impl ServeConfig {
    /// The configuration `thermostat serve` has without flags: the defaults, and whatever the
    /// environment variables set. For embedding (tests, benchmarks) before overriding fields.
    pub fn from_defaults() -> Result<Self, clap::Error> {
        use clap::FromArgMatches;
        let command = Self::augment_args(clap::Command::new("serve"));
        Self::from_arg_matches(&command.try_get_matches_from(["serve"])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_flags_override() {
        let cli = Cli::try_parse_from(["thermostat", "serve", "--grpc-addr", "127.0.0.1:0"])
            .expect("parses");
        let Command::Serve(serve) = cli.command else {
            panic!("expected serve")
        };
        assert_eq!(serve.grpc_addr.port(), 0);
        assert_eq!(serve.shutdown_timeout, Duration::from_secs(20));
    }

    #[test]
    fn from_defaults_matches_the_documented_defaults() {
        let config = ServeConfig::from_defaults().expect("defaults parse");
        assert_eq!(config.control.stale_after, Duration::from_secs(300));
        assert_eq!(config.kafka.kafka_batch_num_messages, 1);
        assert_eq!(config.control.subscriber_buffer, 1024);
    }

    #[test]
    fn clap_definition_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
