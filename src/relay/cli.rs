//! `approvals relay ...`: the command line of the relay (main.rs only hands it over).

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand};

use super::{RelayConfig, RelayFlags};

#[derive(Args)]
pub struct RelayArgs {
    /// The relay's TOML config file (`[relay]`, `[[relay.sinks]]`).
    #[arg(long, env = "APPROVALS_CONFIG", value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// The approvals server [env: APPROVALS_RELAY_ENDPOINT].
    #[arg(long, value_name = "URL", global = true)]
    relay_endpoint: Option<String>,
    #[command(subcommand)]
    command: Option<RelayCommand>,
}

#[derive(Subcommand)]
enum RelayCommand {
    /// Send one signed test event to a sink and print its answer.
    Check {
        #[arg(long, value_name = "NAME")]
        sink: String,
    },
    /// Events the relay gave up delivering.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
}

#[derive(Subcommand)]
enum DeadLettersCommand {
    /// List dead letters: id, sink, revision(s), attempts, reason.
    List {
        /// Only this sink's.
        #[arg(long, value_name = "NAME")]
        sink: Option<String>,
    },
    /// Ask the relay serving the sink to deliver them again (deleted once delivered).
    Retry {
        /// One dead letter.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every dead letter (of --sink when given).
        #[arg(long)]
        all: bool,
        #[arg(long, value_name = "NAME")]
        sink: Option<String>,
    },
}

fn load(args: &RelayArgs) -> Result<RelayConfig, String> {
    let path = args
        .config
        .as_deref()
        .ok_or("--config FILE (or APPROVALS_CONFIG) is required")?;
    RelayConfig::load(
        path,
        |name| std::env::var(name).ok(),
        &RelayFlags {
            endpoint: args.relay_endpoint.clone(),
        },
    )
    .map_err(|e| e.to_string())
}

pub async fn main(args: RelayArgs) -> ExitCode {
    let config = match load(&args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("approvals relay: invalid configuration: {message}");
            return ExitCode::from(2);
        }
    };
    let result = match args.command {
        None => {
            let _telemetry = crate::telemetry::init(&crate::telemetry::TelemetrySettings {
                json: std::env::var("APPROVALS_TELEMETRY_LOG_FORMAT").is_ok_and(|f| f == "json"),
                otlp_endpoint: None,
                service_name: "approvals-relay".to_owned(),
            });
            super::run(config, crate::transport::shutdown_signal()).await
        }
        Some(RelayCommand::Check { sink }) => super::check(&config, &sink).await.map(|answer| {
            println!("{answer}");
        }),
        Some(RelayCommand::DeadLetters(DeadLettersCommand::List { sink })) => {
            super::list_dead_letters(&config, sink.as_deref())
                .await
                .map(|text| print!("{text}"))
        }
        Some(RelayCommand::DeadLetters(DeadLettersCommand::Retry { id, all: _, sink })) => {
            super::retry_dead_letters(&config, id.as_deref(), sink.as_deref())
                .await
                .map(|count| println!("{count} dead letter(s) marked for retry"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("approvals relay: {err}");
            ExitCode::FAILURE
        }
    }
}
