//! `approvals audit ...`: the operator's commands. `export` and `verify --database` read the
//! database directly through the store (they are operator tools, run beside the service, and
//! need no credential of the API); `public-key` and `keygen` only read or write key files.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use approvals_store::{DatabaseSettings, Store};
use clap::{Args, Subcommand};

use super::verify;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Print a new Ed25519 private key (PKCS#8 PEM) for audit.signing_key_file.
    Keygen,
    /// Print the public key (PEM) of the private key in --signing-key-file (default: the
    /// APPROVALS_AUDIT_SIGNING_KEY_FILE variable).
    PublicKey {
        #[arg(long, env = "APPROVALS_AUDIT_SIGNING_KEY_FILE", value_name = "FILE")]
        signing_key_file: PathBuf,
    },
    /// Write the log from revision REV on as JSON Lines (events with their hashes, then the
    /// checkpoints covering them) to standard output.
    Export {
        #[arg(long, value_name = "REV", default_value_t = 0)]
        since: i64,
        /// Only this project's events.
        #[arg(long, value_name = "P")]
        project: Option<String>,
        #[command(flatten)]
        database: DatabaseArg,
    },
    /// Recompute every chain and checkpoint; print each break; exit 1 on any break.
    Verify {
        /// Verify the database (sqlite://PATH or postgres://...).
        #[arg(
            long,
            value_name = "URL",
            conflicts_with = "file",
            required_unless_present = "file"
        )]
        database: Option<String>,
        /// Verify an export written by `approvals audit export`.
        #[arg(long, value_name = "EXPORT")]
        file: Option<PathBuf>,
        /// The checkpoints' public key (PEM), as `approvals audit public-key` prints it.
        #[arg(long, value_name = "FILE")]
        public_key: PathBuf,
    },
}

#[derive(Args)]
pub struct DatabaseArg {
    /// sqlite://PATH or postgres://...
    #[arg(long, env = "APPROVALS_DATABASE_URL", value_name = "URL")]
    database: String,
}

async fn open(url: &str) -> Result<Store, String> {
    let store = Store::connect(&DatabaseSettings {
        url: url.to_owned(),
        max_connections: 2,
        acquire_timeout: Duration::from_secs(10),
        statement_timeout: Duration::from_secs(600),
    })
    .await
    .map_err(|e| e.to_string())?;
    // The columns the chain needs; an old database gets them as the server would add them.
    store.migrate().await.map_err(|e| e.to_string())?;
    Ok(store)
}

/// Runs one `approvals audit` command: exit 0 on success, 1 on a break, 2 on an error.
pub async fn run(command: AuditCommand) -> ExitCode {
    match run_inner(command).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("approvals audit: {message}");
            ExitCode::from(2)
        }
    }
}

async fn run_inner(command: AuditCommand) -> Result<ExitCode, String> {
    match command {
        AuditCommand::Keygen => {
            print!("{}", super::generate_signing_key_pem()?);
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::PublicKey { signing_key_file } => {
            let key = super::read_signing_key(&signing_key_file)?;
            print!("{}", super::public_key_pem(&key.verifying_key())?);
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Export {
            since,
            project,
            database,
        } => {
            let store = open(&database.database).await?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            verify::export(&store, since, project.as_deref(), &mut out).await?;
            std::io::Write::flush(&mut out).map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify {
            database,
            file,
            public_key,
        } => {
            let key = super::read_public_key(&public_key)?;
            let report = match (database, file) {
                (Some(url), _) => verify::verify_database(&open(&url).await?, &key).await?,
                (None, Some(path)) => {
                    let input = std::fs::File::open(&path)
                        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                    verify::verify_export(std::io::BufReader::new(input), &key)?
                }
                (None, None) => return Err("give --database URL or --file EXPORT".into()),
            };
            print!("{}", report.render());
            Ok(if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
