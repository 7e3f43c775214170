use std::{path::PathBuf, process::ExitCode};

use approvals::{
    config::{Config, ConfigError, Flags},
    transport as server,
};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// mimalloc instead of the system allocator: a call allocates and frees many small buffers
/// (messages, JSON documents, rows), and glibc's malloc and free were about 15% of the
/// server's CPU under load (see the README's write path figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// approvals: a gRPC service for change requests (propose, review, apply on quorum).
#[derive(Parser)]
#[command(
    name = "approvals",
    version,
    args_conflicts_with_subcommands = true,
    after_help = approvals::cli::EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve(ServeArgs),
    /// Apply pending database migrations and exit.
    Migrate(ServeArgs),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Check the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Change requests: list, show, create, review, apply, watch (a client of the API).
    Cr(approvals::cli::cr::CrArgs),
    /// Approval policies, and policies as code (`policy apply -f`).
    Policy(approvals::cli::policy::PolicyArgs),
    /// Write a profile of the CLI's config file (asks for what no flag gives).
    Login(approvals::cli::profile::LoginArgs),
    /// Print a shell completion script.
    #[command(
        after_help = "Example:\n  approvals completions bash > /etc/bash_completion.d/approvals"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The verifiable history: keys, export, verify (see the README, "Audit").
    #[command(subcommand)]
    Audit(approvals::audit::command::AuditCommand),
    /// Approval attestations: verify one offline (see the README, "Attestations").
    #[command(subcommand)]
    Attest(approvals::audit::command::AttestCommand),
    /// Relay events to webhooks and Slack (a client of the API; see the README's "Relay").
    Relay(approvals::relay::cli::RelayArgs),
    /// Certificates for local use.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a throwaway CA (ca.pem, ca-key.pem), a server certificate for localhost,
    /// 127.0.0.1 and ::1 (server.pem, server-key.pem) and a client certificate with the SPIFFE
    /// ID spiffe://approvals.local/ns/dev/sa/cli (client.pem, client-key.pem). Never for
    /// production.
    Dev {
        /// Directory to write the files into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

fn dev_certificates(command: CertsCommand) -> ExitCode {
    let CertsCommand::Dev { out } = command;
    match approvals::tls::dev::write(&out) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("approvals certs dev: {message}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate file + environment + flags and print the effective configuration (secrets
    /// redacted); exit 2 with the offending key when it is invalid.
    Check(ServeArgs),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new API key (shown once) and the `[[auth.api_keys]]` entry to paste into the
    /// config file, which holds only the key's SHA-256 digest.
    Generate {
        /// user:NAME or service:NAME.
        #[arg(long)]
        principal: String,
        /// Comma separated: approvals:read, approvals:write, approvals:admin, approvals:act_as,
        /// approvals:bypass, approvals:relay.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// Comma separated bare group names.
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Comma separated projects the key may act in (default: every project, written
        /// `projects = ["*"]`).
        #[arg(long, value_delimiter = ',')]
        projects: Vec<String>,
        /// With approvals:act_as: comma separated users the key may act for (user:NAME, or
        /// user:* for every user).
        #[arg(long = "act-as", value_delimiter = ',')]
        act_as: Vec<String>,
    },
}

fn generate_key(command: KeysCommand) -> ExitCode {
    let KeysCommand::Generate {
        principal,
        scopes,
        groups,
        projects,
        act_as,
    } = command;
    match approvals::auth::api_keys::generate(&principal, &scopes, &groups, &projects, &act_as) {
        Ok((key, entry)) => {
            print!("{}", approvals::auth::api_keys::announce(&key, &entry));
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("approvals keys generate: {message}");
            ExitCode::from(2)
        }
    }
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "APPROVALS_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on [env: APPROVALS_LISTEN] [default: 127.0.0.1:50051].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// sqlite://PATH or postgres://... [env: APPROVALS_DATABASE_URL] [default: sqlite://approvals.db].
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// Distinct approvals needed for quorum without a policy [env: APPROVALS_MIN_APPROVALS] [default: 1].
    #[arg(long, value_name = "N")]
    min_approvals: Option<u32>,
    /// Revisions behind the head a watch may start from [env: APPROVALS_WATCH_HISTORY] [default: 100000].
    #[arg(long, value_name = "N")]
    watch_history: Option<i64>,
    /// Events a live watcher may fall behind before it is ended [env: APPROVALS_WATCH_MAX_LAG] [default: 10000].
    #[arg(long, value_name = "N")]
    watch_max_lag: Option<i64>,
    /// Progress message interval on idle watch streams [env: APPROVALS_WATCH_PROGRESS_INTERVAL] [default: 10s].
    #[arg(long, value_name = "DURATION")]
    watch_progress_interval: Option<String>,
    /// Log format [env: APPROVALS_TELEMETRY_LOG_FORMAT] [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// The server's certificate chain, PEM; turns TLS on [env: APPROVALS_TLS_CERT_FILE].
    #[arg(long, value_name = "FILE")]
    tls_cert_file: Option<String>,
    /// The server's private key, PEM [env: APPROVALS_TLS_KEY_FILE].
    #[arg(long, value_name = "FILE")]
    tls_key_file: Option<String>,
    /// CAs that sign client certificates, PEM [env: APPROVALS_TLS_CLIENT_CA_FILE].
    #[arg(long, value_name = "FILE")]
    tls_client_ca_file: Option<String>,
    /// none, optional or required [env: APPROVALS_TLS_CLIENT_AUTH] [default: none].
    #[arg(long, value_name = "MODE")]
    tls_client_auth: Option<String>,
    /// How often the TLS files are checked for changes [env: APPROVALS_TLS_RELOAD_INTERVAL] [default: 60s].
    #[arg(long, value_name = "DURATION")]
    tls_reload_interval: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

impl ServeArgs {
    /// The flags layer of the configuration: each flag sets one key.
    fn flags(&self) -> Flags {
        Flags::default()
            .set("listen", "--listen", self.listen.clone())
            .set("database.url", "--database-url", self.database_url.clone())
            .set("min_approvals", "--min-approvals", self.min_approvals)
            .set("watch.history", "--watch-history", self.watch_history)
            .set("watch.max_lag", "--watch-max-lag", self.watch_max_lag)
            .set(
                "watch.progress_interval",
                "--watch-progress-interval",
                self.watch_progress_interval.clone(),
            )
            .set(
                "telemetry.log_format",
                "--log-format",
                self.log_format.map(LogFormat::as_str),
            )
            .set(
                "tls.cert_file",
                "--tls-cert-file",
                self.tls_cert_file.clone(),
            )
            .set("tls.key_file", "--tls-key-file", self.tls_key_file.clone())
            .set(
                "tls.client_ca_file",
                "--tls-client-ca-file",
                self.tls_client_ca_file.clone(),
            )
            .set(
                "tls.client_auth",
                "--tls-client-auth",
                self.tls_client_auth.clone(),
            )
            .set(
                "tls.reload_interval",
                "--tls-reload-interval",
                self.tls_reload_interval.clone(),
            )
    }
}

/// Defaults, file, environment and flags, checked as the server checks them.
fn load(args: &ServeArgs) -> Result<Config, ConfigError> {
    let config = Config::load(
        args.config.as_deref(),
        |name| std::env::var(name).ok(),
        &args.flags(),
    )?;
    server::check_config(&config)?;
    Ok(config)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let (migrate_only, args) = match cli.command {
        Some(Command::Keys(command)) => return generate_key(command),
        Some(Command::Cr(args)) => {
            return approvals::cli::finish(approvals::cli::cr::run(args).await);
        }
        Some(Command::Policy(args)) => {
            return approvals::cli::finish(approvals::cli::policy::run(args).await);
        }
        Some(Command::Login(args)) => return approvals::cli::profile::login(args),
        Some(Command::Completions { shell }) => {
            return approvals::cli::completions(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
            );
        }
        Some(Command::Audit(command)) => return approvals::audit::command::run(command).await,
        Some(Command::Attest(command)) => return approvals::audit::command::run_attest(command),
        Some(Command::Relay(args)) => return approvals::relay::cli::main(args).await,
        Some(Command::Certs(command)) => return dev_certificates(command),
        Some(Command::Config(ConfigCommand::Check(args))) => {
            return match load(&args) {
                Ok(config) => {
                    for warning in server::warnings(&config) {
                        eprintln!("approvals: warning: {warning}");
                        println!("# warning: {warning}");
                    }
                    print!("{}", approvals::config::check::render(&config));
                    ExitCode::SUCCESS
                }
                Err(message) => {
                    eprintln!("approvals: invalid configuration: {message}");
                    ExitCode::from(2)
                }
            };
        }
        Some(Command::Serve(args)) => (false, args),
        Some(Command::Migrate(args)) => (true, args),
        None => (false, cli.serve),
    };
    let config = match load(&args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("approvals: invalid configuration: {message}");
            return ExitCode::from(2);
        }
    };
    server::run_process(config, migrate_only).await
}
