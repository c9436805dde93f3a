//! Configuration of the service and its operator commands: one typed struct per command,
//! parsed once by clap (the binary puts them together). Every option is a flag with an
//! environment-variable equivalent and a default that works on a developer machine.

use std::net::SocketAddr;
use std::time::Duration;

use chrono::TimeDelta;
use clap::{Args, ValueEnum};

use crate::domain::protection::Protection;

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
    /// A W3C `traceparent` header to send with the reading, as a gateway that traces would:
    /// the decision continues that trace.
    #[arg(long)]
    pub traceparent: Option<String>,
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

/// OpenTelemetry traces, under the variable names the OpenTelemetry SDKs read.
#[derive(Debug, Clone, Args)]
pub struct TraceConfig {
    /// OTLP/gRPC endpoint of a trace collector, e.g. `http://otel-collector:4317`. Unset (the
    /// default): no traces, and nothing traced per reading.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// Which traces to keep: always_on, always_off, traceidratio, parentbased_always_on,
    /// parentbased_always_off or parentbased_traceidratio (a caller's sampled flag decides).
    #[arg(long, env = "OTEL_TRACES_SAMPLER", value_enum, default_value_t = TraceSampler::ParentbasedAlwaysOn, global = true)]
    pub trace_sampler: TraceSampler,
    /// The ratio (0 to 1) of the `traceidratio` samplers.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", default_value_t = 1.0, value_parser = ratio, global = true)]
    pub trace_sampler_arg: f64,
    /// The `service.name` of the spans.
    #[arg(
        long,
        env = "OTEL_SERVICE_NAME",
        default_value = "thermostat",
        global = true
    )]
    pub otel_service_name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TraceSampler {
    #[value(name = "always_on")]
    AlwaysOn,
    #[value(name = "always_off")]
    AlwaysOff,
    #[value(name = "traceidratio")]
    TraceIdRatio,
    #[value(name = "parentbased_always_on")]
    ParentbasedAlwaysOn,
    #[value(name = "parentbased_always_off")]
    ParentbasedAlwaysOff,
    #[value(name = "parentbased_traceidratio")]
    ParentbasedTraceIdRatio,
}

fn ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a ratio from 0 to 1")),
    }
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
    /// A file holding the database URL (a mounted Secret), read at start in place of
    /// DATABASE_URL; surrounding whitespace is ignored. Rotated credentials need a restart.
    #[arg(long, env = "DATABASE_URL_FILE")]
    pub database_url_file: Option<std::path::PathBuf>,
    /// Largest number of pooled database connections.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,
    /// API reads running on the database at once, fewer than `DATABASE_MAX_CONNECTIONS` (by
    /// default three quarters of it): the rest stay free for writes, the control loop and
    /// health checks.
    #[arg(long, env = "DATABASE_MAX_READS", value_parser = clap::value_parser!(u32).range(1..))]
    pub database_max_reads: Option<u32>,
    /// How long a request waits for a database connection, and a Put or Delete for a row lock,
    /// before failing with UNAVAILABLE.
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT", default_value = "3s", value_parser = positive_duration)]
    pub database_acquire_timeout: Duration,
    /// Statements writing Puts at once, each on a connection of its own (besides the pool).
    /// Puts arriving while every writer is busy are written together, up to 64 in one
    /// statement: more writers make smaller statements, more of them at once.
    #[arg(long, env = "DATABASE_PUT_WRITERS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub database_put_writers: u32,
}

/// How the gateways' producers choose a reading's partition from its key (librdkafka's
/// `partitioner` names, without `_random`, which differs only for records without a key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SensorPartitioner {
    /// CRC-32: librdkafka's default (confluent-kafka, thermostat's own tools).
    Consistent,
    /// The Java client's default (Kafka Connect, Kafka Streams, Flink).
    Murmur2,
    /// FNV-1a: Sarama's (Go) default.
    Fnv1a,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SensorFormat {
    /// `thermostat.v1.SensorReading`, protobuf-encoded.
    Protobuf,
    /// `{"sensor_id": "…", "temperature_celsius": 21.5, "reading_time": "RFC 3339"}`.
    Json,
}

/// How the service reaches the brokers (librdkafka's `security.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KafkaSecurityProtocol {
    #[value(name = "plaintext", alias = "PLAINTEXT")]
    Plaintext,
    /// TLS, the brokers' certificates verified (and their names: hostname verification).
    #[value(name = "ssl", alias = "SSL")]
    Ssl,
    /// SASL without TLS: the password crosses the network in the clear with PLAIN.
    #[value(name = "sasl_plaintext", alias = "SASL_PLAINTEXT")]
    SaslPlaintext,
    /// SASL over TLS.
    #[value(name = "sasl_ssl", alias = "SASL_SSL")]
    SaslSsl,
}

/// The SASL mechanism (librdkafka's `sasl.mechanism`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KafkaSaslMechanism {
    #[value(name = "PLAIN")]
    Plain,
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
}

#[derive(Debug, Clone, Args)]
pub struct KafkaConfig {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// plaintext, ssl, sasl_plaintext or sasl_ssl.
    #[arg(long, env = "KAFKA_SECURITY_PROTOCOL", value_enum, default_value_t = KafkaSecurityProtocol::Plaintext)]
    pub kafka_security_protocol: KafkaSecurityProtocol,
    /// PEM CA certificates the brokers' certificates must chain to; unset: the system's roots.
    #[arg(long, env = "KAFKA_SSL_CA_FILE")]
    pub kafka_ssl_ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate, for brokers that require one (mutual TLS).
    #[arg(long, env = "KAFKA_SSL_CERT_FILE", requires = "kafka_ssl_key_file")]
    pub kafka_ssl_cert_file: Option<std::path::PathBuf>,
    /// PEM private key of KAFKA_SSL_CERT_FILE.
    #[arg(long, env = "KAFKA_SSL_KEY_FILE", requires = "kafka_ssl_cert_file")]
    pub kafka_ssl_key_file: Option<std::path::PathBuf>,
    /// PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with a sasl_* protocol).
    #[arg(long, env = "KAFKA_SASL_MECHANISM", value_enum, default_value_t = KafkaSaslMechanism::ScramSha512)]
    pub kafka_sasl_mechanism: KafkaSaslMechanism,
    /// The SASL user name (with a sasl_* protocol).
    #[arg(long, env = "KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,
    /// A file holding the SASL password (a mounted Secret), read whenever a Kafka client is
    /// made: never an argument or a variable, which other processes may see.
    #[arg(long, env = "KAFKA_SASL_PASSWORD_FILE")]
    pub kafka_sasl_password_file: Option<std::path::PathBuf>,
    /// Topic the sensor readings are consumed from (key = sensor_id).
    #[arg(long, env = "SENSOR_TOPIC", default_value = "sensor-readings")]
    pub sensor_topic: String,
    /// Encoding of the records on the sensor topic.
    #[arg(long, env = "SENSOR_FORMAT", value_enum, default_value_t = SensorFormat::Protobuf)]
    pub sensor_format: SensorFormat,
    /// Temperatures a sensor can really report, `MIN..MAX` in °C: readings outside are
    /// dead-lettered as `implausible_temperature` (a faulty sensor's -127 must not switch a
    /// heater on for good; the staleness fail-safe takes over if nothing plausible comes).
    #[arg(long, env = "READING_RANGE_CELSIUS", default_value_t = CelsiusRange::PLAUSIBLE, value_parser = celsius_range, allow_hyphen_values = true)]
    pub reading_range_celsius: CelsiusRange,
    /// How far ahead of the later of this replica's clock and the broker's append time a
    /// reading may be stamped; later ones are dead-lettered as `future_time`. A reading
    /// stamped ahead makes the sensor's genuine readings look out of order until then.
    #[arg(long, env = "READING_MAX_AHEAD", default_value = "30s", value_parser = humantime::parse_duration)]
    pub reading_max_ahead: Duration,
    /// Topic heater commands are produced to (key = sensor_id).
    #[arg(long, env = "COMMAND_TOPIC", default_value = "heater-commands")]
    pub command_topic: String,
    /// Start even if the command topic can delete a sensor's last command (not compacted, with
    /// a finite retention) or its settings cannot be read: after such a loss a replica no longer
    /// knows what the heater was last told, and may tell it again (with a higher sequence).
    #[arg(long, env = "ALLOW_COMMAND_TOPIC_DELETION", default_value_t = false)]
    pub allow_command_topic_deletion: bool,
    /// Topic bad sensor records are moved to, with the reason in a header.
    #[arg(long, env = "DEAD_LETTER_TOPIC", default_value = "sensor-readings-dlq")]
    pub dead_letter_topic: String,
    /// Topic heaters (or their gateways) report their actual state to (key = sensor_id,
    /// `HeaterReport` in SENSOR_FORMAT); bad records go to DEAD_LETTER_TOPIC. Empty: heaters
    /// do not report, and commanded is not compared with reported.
    #[arg(long, env = "HEATER_REPORT_TOPIC", default_value = "")]
    pub heater_report_topic: String,
    /// Consumer group shared by all replicas for the sensor topic.
    #[arg(long, env = "CONSUMER_GROUP", default_value = "thermostat")]
    pub consumer_group: String,
    /// Static group membership (`group.instance.id`): a stable name per replica, e.g. the pod
    /// name, so that a restart within the session timeout does not rebalance the group.
    #[arg(long, env = "KAFKA_GROUP_INSTANCE_ID")]
    pub kafka_group_instance_id: Option<String>,
    /// How long the group waits for a silent replica before handing its partitions to others
    /// (`session.timeout.ms`; heartbeats go at a third of it, at most every 3 s). Must exceed
    /// `STALE_CHECK_INTERVAL` + 1 s, so that a replica paused this long notices its stall.
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT", default_value = "45s", value_parser = positive_duration)]
    pub kafka_session_timeout: Duration,
    /// How long the broker may hold a fetch waiting for data: the latency floor of the loop.
    #[arg(long, env = "KAFKA_FETCH_WAIT_MAX", default_value = "10ms", value_parser = humantime::parse_duration)]
    pub kafka_fetch_wait_max: Duration,
    /// The same for the reader of the command topic, which always sits at the topic's end. On
    /// Apache Kafka a fetch returns as soon as a record arrives, so this only bounds idle polls;
    /// Tansu 0.6 holds every fetch this long and lists the whole partition for each one that
    /// finds data, so a short wait here made the broker the pipeline's bottleneck (see
    /// BENCHMARKS.md). It delays what subscribers see of commands by up to this much on Tansu.
    #[arg(long, env = "KAFKA_FOLLOWER_FETCH_WAIT_MAX", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub kafka_follower_fetch_wait_max: Duration,
    /// Most records per produce batch. 1 works around Tansu 0.6, whose memory storage cannot
    /// serve a fetch that starts inside a batch; raise it (e.g. 10000) on Apache Kafka.
    #[arg(long, env = "KAFKA_BATCH_NUM_MESSAGES", default_value_t = 1)]
    pub kafka_batch_num_messages: u32,
    /// The idempotent producer (`enable.idempotence`): a retried produce request can neither
    /// duplicate nor reorder commands, nor leave a gap. Turn it off only for a broker without
    /// InitProducerId; consumers' "only a higher sequence" rule then drops what a retry repeats.
    #[arg(long, env = "KAFKA_IDEMPOTENCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub kafka_idempotence: bool,
    /// How long a command or dead letter may wait for the broker's acknowledgement
    /// (`message.timeout.ms`). Past it the service stops with an error, and what was not
    /// acknowledged is decided again after the restart.
    #[arg(long, env = "KAFKA_MESSAGE_TIMEOUT", default_value = "5m", value_parser = positive_duration)]
    pub kafka_message_timeout: Duration,
    /// How long the producer waits to batch commands before sending.
    #[arg(long, env = "KAFKA_LINGER", default_value = "1ms", value_parser = humantime::parse_duration)]
    pub kafka_linger: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct ControlConfig {
    /// A controlled sensor with no reading for this long gets OFF (the fail-safe); also, a
    /// setpoint change re-evaluates only readings younger than this.
    #[arg(long, env = "STALE_AFTER", default_value = "5m", value_parser = positive_duration)]
    pub stale_after: Duration,
    /// The gateways' partitioner: a sensor that has never reported is judged silent by the
    /// replica owning the partition its readings would go to.
    #[arg(
        long,
        env = "SENSOR_PARTITIONER",
        value_enum,
        default_value = "consistent"
    )]
    pub sensor_partitioner: SensorPartitioner,
    /// How often expired levels of the sensors' priority arrays (overrides) are relinquished
    /// and due schedule transitions applied: each happens at most this long after its time.
    #[arg(long, env = "LEVEL_EXPIRY_INTERVAL", default_value = "1s", value_parser = positive_duration)]
    pub level_expiry_interval: Duration,
    /// After an ON, no OFF before this long (equipment protection; 0s: none): a switch the rule
    /// wants sooner is deferred, and sent when the time is up if still wanted. Safety (a stale
    /// sensor, a deleted setpoint, the SAFETY level) does not wait.
    #[arg(long, env = "MIN_ON_TIME", default_value = "0s", value_parser = equipment_duration)]
    pub min_on_time: Duration,
    /// After an OFF, no ON before this long; as MIN_ON_TIME.
    #[arg(long, env = "MIN_OFF_TIME", default_value = "0s", value_parser = equipment_duration)]
    pub min_off_time: Duration,
    /// A heater ON this long at a stretch is switched OFF (reason MAX_RUN_TIME) for
    /// RUN_COOLDOWN, then the rule applies again. 0s: no limit.
    #[arg(long, env = "MAX_RUN_TIME", default_value = "0s", value_parser = equipment_duration)]
    pub max_run_time: Duration,
    /// After a maximum run's OFF, no ON before this long (at least MIN_OFF_TIME).
    #[arg(long, env = "RUN_COOLDOWN", default_value = "0s", value_parser = equipment_duration)]
    pub run_cooldown: Duration,
    /// The current command is sent again (reason KEEP_ALIVE, the next sequence) this long after
    /// it was last sent, for heaters that lose their state. 0s: never.
    #[arg(long, env = "KEEP_ALIVE", default_value = "0s", value_parser = equipment_duration)]
    pub keep_alive: Duration,
    /// How often every building's SCHEDULE levels are checked in full, which picks up sensors
    /// created in a scheduled building or moved between schedules' groups since.
    #[arg(long, env = "SCHEDULE_SWEEP_INTERVAL", default_value = "30s", value_parser = positive_duration)]
    pub schedule_sweep_interval: Duration,
    /// A heater that reports another state than commanded this long after the command is
    /// flagged as not following it (HeaterStatus, a metric).
    #[arg(long, env = "REPORT_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub report_timeout: Duration,
    /// How often sensors are checked for staleness (and heaters for following their command).
    #[arg(long, env = "STALE_CHECK_INTERVAL", default_value = "5s", value_parser = positive_duration)]
    pub stale_check_interval: Duration,
    /// How often the setpoint cache is re-read in full, besides LISTEN/NOTIFY updates.
    #[arg(long, env = "SETPOINT_RESYNC_INTERVAL", default_value = "5m", value_parser = positive_duration)]
    pub setpoint_resync_interval: Duration,
    /// Commands a subscriber may fall behind by before it is caught up from the engine's state
    /// (with `send_initial_state`) or its stream is ended with RESOURCE_EXHAUSTED.
    #[arg(long, env = "SUBSCRIBER_BUFFER", default_value_t = 1024)]
    pub subscriber_buffer: usize,
    /// Sensors a reading may add to the in-memory cache (about 160 B each with its last
    /// command). Once it holds this many, readings of sensors not cached yet are counted as
    /// untracked and not remembered; setpoints and commands are always cached, so a sensor
    /// with a setpoint is controlled whatever the limit.
    #[arg(long, env = "SENSOR_CACHE_LIMIT", default_value_t = 2_000_000)]
    pub sensor_cache_limit: usize,
}

impl DatabaseConfig {
    /// The database URL: DATABASE_URL_FILE's contents if set, else DATABASE_URL. The error
    /// names the file, never what it holds.
    pub fn url(&self) -> Result<String, String> {
        let Some(path) = &self.database_url_file else {
            return Ok(self.database_url.clone());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("DATABASE_URL_FILE {}: {e}", path.display()))?;
        match text.trim() {
            "" => Err(format!("DATABASE_URL_FILE {} is empty", path.display())),
            url => Ok(url.to_owned()),
        }
    }
}

impl ControlConfig {
    /// The heaters' limits these settings give (zero: none).
    pub fn protection(&self) -> Protection {
        let span = |d: Duration| TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX);
        Protection {
            min_on: span(self.min_on_time),
            min_off: span(self.min_off_time),
            max_run: Some(span(self.max_run_time)).filter(|run| *run > TimeDelta::zero()),
            cooldown: span(self.run_cooldown),
            keep_alive: Some(span(self.keep_alive)).filter(|every| *every > TimeDelta::zero()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClientAuth {
    /// Every connection must present a certificate signed by `TLS_CLIENT_CA_FILE`.
    Required,
    /// A certificate is verified when presented; callers without one use a bearer token.
    Optional,
}

#[derive(Debug, Clone, Args)]
pub struct TlsConfig {
    /// PEM certificate chain for the gRPC port. With `TLS_KEY_FILE`, turns TLS on; without
    /// both, the gRPC port is plaintext (local development only; logged as a warning).
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `TLS_CERT_FILE`.
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<std::path::PathBuf>,
    /// PEM CA certificates that client certificates are verified against (mTLS).
    #[arg(long, env = "TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<std::path::PathBuf>,
    /// With `TLS_CLIENT_CA_FILE`: whether a client certificate is required (unset: required)
    /// or optional. Without a client CA no certificate is asked for, so `required` is refused.
    #[arg(long, env = "TLS_CLIENT_AUTH", value_enum)]
    pub tls_client_auth: Option<ClientAuth>,
    /// How long a client gets to complete the TLS handshake before it is disconnected.
    #[arg(long, env = "TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub tls_handshake_timeout: Duration,
}

impl TlsConfig {
    /// Whether client certificates are required or optional, when a client CA is set.
    pub fn client_auth(&self) -> ClientAuth {
        self.tls_client_auth.unwrap_or(ClientAuth::Required)
    }
}

#[derive(Debug, Clone, Args)]
pub struct AuthConfig {
    /// Serve every RPC to anyone, as an admin of all buildings. For local development only;
    /// the service logs an error saying so at start.
    #[arg(long, env = "AUTH_DISABLED", default_value_t = false)]
    pub auth_disabled: bool,
    /// JSON Web Key Set (RS256 and ES256 public keys) that bearer JWTs are verified against.
    #[arg(long, env = "AUTH_JWKS_FILE", requires_all = ["auth_jwt_issuer", "auth_jwt_audience"])]
    pub auth_jwks_file: Option<std::path::PathBuf>,
    /// Required `iss` claim of JWTs.
    #[arg(long, env = "AUTH_JWT_ISSUER")]
    pub auth_jwt_issuer: Option<String>,
    /// Required `aud` claim of JWTs (one of the token's audiences must match).
    #[arg(long, env = "AUTH_JWT_AUDIENCE")]
    pub auth_jwt_audience: Option<String>,
    /// Clock skew allowed when checking `exp` and `nbf`.
    #[arg(long, env = "AUTH_JWT_LEEWAY", default_value = "30s", value_parser = humantime::parse_duration)]
    pub auth_jwt_leeway: Duration,
    /// JSON file of static identities: SHA-256 hashes of bearer tokens, and client-certificate
    /// subjects, each with a role and buildings (see docs/security.md).
    #[arg(long, env = "AUTH_STATIC_FILE")]
    pub auth_static_file: Option<std::path::PathBuf>,
    /// How often the TLS, JWKS and static-identity files are checked for changes.
    #[arg(long, env = "CREDENTIALS_RELOAD_INTERVAL", default_value = "10s", value_parser = positive_duration)]
    pub credentials_reload_interval: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct LimitsConfig {
    /// Setpoint writes (Put, Delete) per second allowed to one identity, on each replica.
    #[arg(long, env = "WRITE_RATE_LIMIT", default_value_t = 20)]
    pub write_rate_limit: u32,
    /// Writes one identity may make in a burst above `WRITE_RATE_LIMIT`.
    #[arg(long, env = "WRITE_BURST", default_value_t = 40)]
    pub write_burst: u32,
    /// Reads (Get, List, history, sensor state) per second allowed to one identity, on each
    /// replica.
    #[arg(long, env = "READ_RATE_LIMIT", default_value_t = 50)]
    pub read_rate_limit: u32,
    /// Reads one identity may make in a burst above `READ_RATE_LIMIT`.
    #[arg(long, env = "READ_BURST", default_value_t = 100)]
    pub read_burst: u32,
    /// Reads of one identity running at once, on each replica.
    #[arg(long, env = "MAX_READS_PER_IDENTITY", default_value_t = 4)]
    pub max_reads_per_identity: usize,
    /// Origins (`https://dashboard.example`) whose pages may call the API with gRPC-Web, comma
    /// separated; empty: pages of the API's own origin only (no CORS).
    #[arg(long, env = "GRPC_WEB_ALLOWED_ORIGINS", value_delimiter = ',', value_parser = origin)]
    pub grpc_web_allowed_origins: Vec<tonic::codegen::http::HeaderValue>,
    /// How long a write's `request_id` is remembered: a retry with it within this time gets
    /// the first outcome and writes nothing again.
    #[arg(long, env = "REQUEST_ID_WINDOW", default_value = "1h", value_parser = positive_duration)]
    pub request_id_window: Duration,
    /// Largest request or response message, in bytes.
    #[arg(long, env = "MAX_MESSAGE_SIZE", default_value_t = 64 * 1024)]
    pub max_message_size: usize,
    /// Most concurrent HTTP/2 streams (calls) on one connection.
    #[arg(long, env = "MAX_CONCURRENT_STREAMS", default_value_t = 100)]
    pub max_concurrent_streams: u32,
    /// Most open SubscribeHeaterCommands streams per identity, on each replica.
    #[arg(long, env = "MAX_SUBSCRIPTIONS_PER_IDENTITY", default_value_t = 16)]
    pub max_subscriptions_per_identity: usize,
    /// SubscribeHeaterCommands calls per second allowed to one identity, on each replica.
    #[arg(long, env = "SUBSCRIBE_RATE_LIMIT", default_value_t = 1)]
    pub subscribe_rate_limit: u32,
    /// Subscribes one identity may make in a burst above `SUBSCRIBE_RATE_LIMIT`.
    #[arg(long, env = "SUBSCRIBE_BURST", default_value_t = 16)]
    pub subscribe_burst: u32,
    /// Longest a unary call may take; a shorter client deadline (`grpc-timeout`) wins.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    pub request_timeout: Duration,
    /// HTTP/2 keepalive ping interval: finds vanished clients and their streams.
    #[arg(long, env = "HTTP2_KEEPALIVE_INTERVAL", default_value = "20s", value_parser = positive_duration)]
    pub http2_keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub http2_keepalive_timeout: Duration,
    /// Most open connections on the gRPC port, TLS handshakes included; a connection beyond
    /// it is closed as soon as it is accepted. Keep the process's file-descriptor limit above
    /// the three caps together plus the database and broker connections.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// The same for the plaintext health port.
    #[arg(long, env = "HEALTH_MAX_CONNECTIONS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_max_connections: u32,
    /// The same for the admin HTTP port.
    #[arg(long, env = "ADMIN_MAX_CONNECTIONS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub admin_max_connections: u32,
    /// How long a new connection may take to send the HTTP/2 preface (on the TLS port, after
    /// its handshake); on the admin port, how long each request's headers may take, and how
    /// long a kept-alive connection may wait for its next request.
    #[arg(long, env = "CONNECTION_PREFACE_TIMEOUT", default_value = "5s", value_parser = positive_duration)]
    pub connection_preface_timeout: Duration,
    /// Idle time before TCP keepalive probes start, and between probes, on every port.
    #[arg(long, env = "TCP_KEEPALIVE", default_value = "1m", value_parser = positive_duration)]
    pub tcp_keepalive: Duration,
    /// Age at which a gRPC connection is asked to close (GOAWAY): the client reconnects, with a
    /// new handshake against the current certificates.
    #[arg(long, env = "MAX_CONNECTION_AGE", default_value = "30m", value_parser = positive_duration)]
    pub max_connection_age: Duration,
    /// How long calls still open at `MAX_CONNECTION_AGE` may go on before the connection is
    /// cut; a subscription still open then ends with a transport error.
    #[arg(long, env = "MAX_CONNECTION_AGE_GRACE", default_value = "1m", value_parser = humantime::parse_duration)]
    pub max_connection_age_grace: Duration,
    /// How long a gRPC or health connection may stay open without a call before it is closed.
    #[arg(long, env = "CONNECTION_IDLE_TIMEOUT", default_value = "5m", value_parser = positive_duration)]
    pub connection_idle_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub control: ControlConfig,
    #[command(flatten)]
    pub tls: TlsConfig,
    #[command(flatten)]
    pub auth: AuthConfig,
    #[command(flatten)]
    pub limits: LimitsConfig,
    /// Address the gRPC server listens on (port 0 picks a free port).
    #[arg(long, env = "GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// Address of the plaintext gRPC health port for Kubernetes probes: only
    /// `grpc.health.v1.Health`, no credentials needed, nothing else served.
    #[arg(long, env = "HEALTH_ADDR", default_value = "0.0.0.0:50052")]
    pub health_addr: SocketAddr,
    /// Address of the admin HTTP server: `/metrics` (Prometheus) and `/livez`.
    #[arg(long, env = "ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,
    /// How often the database and the broker are probed for the health service.
    #[arg(long, env = "HEALTH_CHECK_INTERVAL", default_value = "2s", value_parser = positive_duration)]
    pub health_check_interval: Duration,
    /// After SIGTERM/SIGINT, how long in-flight calls get to finish before the process exits.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
}

/// An inclusive range of temperatures, written `MIN..MAX`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CelsiusRange {
    pub min: f64,
    pub max: f64,
}

impl CelsiusRange {
    /// Wider than any room, boiler house or winter's night: only what no sensor in a building
    /// can read, such as the -127 °C and 327.67 °C common sensors report when they fail.
    pub const PLAUSIBLE: Self = Self {
        min: -100.0,
        max: 150.0,
    };

    pub fn contains(&self, celsius: f64) -> bool {
        self.range().contains(&celsius)
    }

    pub fn range(&self) -> std::ops::RangeInclusive<f64> {
        self.min..=self.max
    }
}

impl std::fmt::Display for CelsiusRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{}", self.min, self.max)
    }
}

/// Parses `MIN..MAX`: two finite numbers, the first below the second.
pub fn celsius_range(value: &str) -> Result<CelsiusRange, String> {
    let (min, max) = value
        .split_once("..")
        .ok_or("expected MIN..MAX in °C, such as -100..150")?;
    let number = |s: &str| {
        s.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("{s:?} is not a finite number"))
    };
    let (min, max) = (number(min)?, number(max)?);
    if min >= max {
        return Err(format!("{min} is not below {max}"));
    }
    Ok(CelsiusRange { min, max })
}

/// A page origin for CORS (`https://host[:port]`); `*` is refused.
fn origin(value: &str) -> Result<tonic::codegen::http::HeaderValue, String> {
    match value.trim() {
        "*" => Err("list the origins; * would let every site's pages call the API".into()),
        o if o.starts_with("http://") || o.starts_with("https://") => {
            tonic::codegen::http::HeaderValue::from_str(o).map_err(|e| e.to_string())
        }
        o => Err(format!("{o:?} is not an origin (https://host[:port])")),
    }
}

/// A duration that must not be zero: an interval of zero panics the timer that ticks it, and a
/// zero timeout or staleness fails everything at once.
/// A heater limit: at most a week (longer is a unit mistake, and a time plus it must not
/// overflow).
pub fn equipment_duration(value: &str) -> Result<Duration, String> {
    match humantime::parse_duration(value) {
        Ok(duration) if duration > Duration::from_secs(7 * 24 * 3600) => {
            Err("must be at most 7 days".into())
        }
        Ok(duration) => Ok(duration),
        Err(e) => Err(e.to_string()),
    }
}

pub fn positive_duration(value: &str) -> Result<Duration, String> {
    match humantime::parse_duration(value) {
        Ok(duration) if duration.is_zero() => Err("must be greater than zero".into()),
        Ok(duration) => Ok(duration),
        Err(e) => Err(e.to_string()),
    }
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
    use clap::Parser;

    /// `thermostat serve` as the binary parses it.
    #[derive(Debug, Parser)]
    struct Serve {
        #[command(flatten)]
        serve: ServeConfig,
    }

    fn parse(args: &[&str]) -> Result<ServeConfig, clap::Error> {
        Serve::try_parse_from([&["serve"], args].concat()).map(|s| s.serve)
    }

    #[test]
    fn defaults_parse_and_flags_override() {
        let serve = parse(&["--grpc-addr", "127.0.0.1:0"]).expect("parses");
        assert_eq!(serve.grpc_addr.port(), 0);
        assert_eq!(serve.shutdown_timeout, Duration::from_secs(20));
    }

    #[test]
    fn the_database_url_comes_from_its_file_when_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("url");
        std::fs::write(&file, "postgres://u:secret@db:5432/t\n").unwrap();
        let mut config = parse(&[]).expect("parses").database;
        assert_eq!(config.url().unwrap(), config.database_url, "without a file");
        config.database_url_file = Some(file.clone());
        assert_eq!(config.url().unwrap(), "postgres://u:secret@db:5432/t");
        std::fs::write(&file, " \n").unwrap();
        assert!(config.url().unwrap_err().contains("is empty"));
        config.database_url_file = Some(dir.path().join("missing"));
        let err = config.url().unwrap_err();
        assert!(
            err.contains("DATABASE_URL_FILE") && err.contains("missing"),
            "{err}"
        );
    }

    #[test]
    fn heater_limits_are_off_by_default_and_at_most_a_week() {
        let serve = parse(&[]).expect("parses");
        assert_eq!(serve.control.protection(), Protection::default());
        let serve = parse(&["--min-on-time", "3m", "--max-run-time", "2h"]).expect("parses");
        let protection = serve.control.protection();
        assert_eq!(protection.min_on, TimeDelta::minutes(3));
        assert_eq!(protection.max_run, Some(TimeDelta::hours(2)));
        assert!(parse(&["--min-on-time", "1000000y"]).is_err());
        assert!(parse(&["--run-cooldown", "8days"]).is_err());
    }

    #[test]
    fn from_defaults_matches_the_documented_defaults() {
        let config = ServeConfig::from_defaults().expect("defaults parse");
        assert_eq!(config.control.stale_after, Duration::from_secs(300));
        assert_eq!(config.kafka.kafka_batch_num_messages, 1);
        assert_eq!(
            config.kafka.kafka_follower_fetch_wait_max,
            Duration::from_millis(100)
        );
        assert_eq!(config.control.subscriber_buffer, 1024);
        assert_eq!(config.control.sensor_cache_limit, 2_000_000);
        assert_eq!(config.kafka.reading_range_celsius, CelsiusRange::PLAUSIBLE);
    }

    /// The default must not refuse a setpoint the API otherwise accepts.
    #[test]
    fn every_valid_setpoint_is_switchable_within_the_default_range() {
        use crate::domain::control::out_of_reach;
        use crate::domain::{BuildingId, SensorId, Setpoint, DELTA_RANGE, DESIRED_RANGE};
        for desired in [*DESIRED_RANGE.start(), 0.0, *DESIRED_RANGE.end()] {
            for delta in [*DELTA_RANGE.start(), *DELTA_RANGE.end()] {
                let setpoint = Setpoint::new(
                    SensorId::parse("s").unwrap(),
                    BuildingId::parse("b").unwrap(),
                    desired,
                    delta,
                    delta,
                )
                .unwrap();
                assert_eq!(
                    out_of_reach(&setpoint, &CelsiusRange::PLAUSIBLE.range()),
                    None,
                    "{desired} ± {delta}"
                );
            }
        }
    }

    #[test]
    fn a_reading_range_is_min_dot_dot_max_and_not_empty() {
        let parsed = |v: &str| celsius_range(v).map(|r| (r.min, r.max));
        assert_eq!(parsed("-100..150"), Ok((-100.0, 150.0)));
        assert_eq!(parsed("-40.5..-10"), Ok((-40.5, -10.0)));
        assert_eq!(
            parsed(&CelsiusRange::PLAUSIBLE.to_string()),
            Ok((-100.0, 150.0))
        );
        for bad in [
            "", "10", "10..10", "20..10", "..5", "a..5", "0..inf", "NaN..5",
        ] {
            assert!(celsius_range(bad).is_err(), "{bad:?} was accepted");
        }
        let serve = parse(&["--reading-range-celsius", "-50..60"]).expect("parses");
        assert!(serve.kafka.reading_range_celsius.contains(-50.0));
        assert!(!serve.kafka.reading_range_celsius.contains(60.5));
    }

    #[test]
    fn intervals_and_timeouts_must_not_be_zero() {
        for flag in [
            "--database-acquire-timeout",
            "--stale-after",
            "--stale-check-interval",
            "--setpoint-resync-interval",
            "--tls-handshake-timeout",
            "--credentials-reload-interval",
            "--request-timeout",
            "--http2-keepalive-interval",
            "--http2-keepalive-timeout",
            "--connection-preface-timeout",
            "--tcp-keepalive",
            "--max-connection-age",
            "--health-check-interval",
        ] {
            let parse = |value| parse(&[flag, value]);
            let err = parse("0s").expect_err(flag).to_string();
            assert!(
                err.contains(flag) && err.contains("greater than zero"),
                "{err}"
            );
            assert!(parse("1ms").is_ok(), "{flag} 1ms");
        }
        // Zero stays a valid wait or linger.
        let zero = parse(&["--kafka-linger", "0s"]);
        assert!(zero.is_ok());
    }

    #[test]
    fn connection_caps_must_not_be_zero() {
        for flag in [
            "--max-connections",
            "--health-max-connections",
            "--admin-max-connections",
        ] {
            assert!(parse(&[flag, "0"]).is_err(), "{flag} 0");
            assert!(parse(&[flag, "1"]).is_ok(), "{flag} 1");
        }
        // A grace of zero cuts the connection at its age.
        assert!(parse(&["--max-connection-age-grace", "0s"]).is_ok());
    }

    #[test]
    fn credentials_come_in_complete_sets() {
        assert!(
            parse(&["--tls-cert-file", "c.pem"]).is_err(),
            "a certificate needs its key"
        );
        assert!(parse(&["--tls-key-file", "k.pem"]).is_err());
        assert!(
            parse(&["--tls-client-ca-file", "ca.pem"]).is_err(),
            "mTLS needs TLS"
        );
        assert!(parse(&["--tls-cert-file", "c.pem", "--tls-key-file", "k.pem"]).is_ok());
        assert!(
            parse(&["--auth-jwks-file", "j.json"]).is_err(),
            "a JWKS needs iss and aud"
        );
        assert!(parse(&["--auth-jwks-file", "j.json", "--auth-jwt-issuer", "i"]).is_err());
        let ok = [
            "--auth-jwks-file",
            "j.json",
            "--auth-jwt-issuer",
            "i",
            "--auth-jwt-audience",
            "a",
        ];
        assert!(parse(&ok).is_ok());
        let serve = parse(&[]).expect("parses");
        assert!(
            !serve.auth.auth_disabled,
            "authentication is on unless switched off"
        );
        assert_eq!(serve.tls.tls_client_auth, None);
        assert_eq!(serve.tls.client_auth(), ClientAuth::Required);
    }

    #[test]
    fn clap_definition_is_consistent() {
        <Serve as clap::CommandFactory>::command().debug_assert();
    }
}
