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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC service (applies pending migrations first).
    Serve(ServeConfig),
    /// Apply pending database migrations and exit.
    Migrate(DatabaseConfig),
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

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,
    /// Address the gRPC server listens on (port 0 picks a free port).
    #[arg(long, env = "GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// How often the database is probed for the health service.
    #[arg(long, env = "HEALTH_CHECK_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub health_check_interval: Duration,
    /// After SIGTERM/SIGINT, how long in-flight calls get to finish before the process exits.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
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
    fn clap_definition_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
