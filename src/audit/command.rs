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

#[derive(Subcommand)]
pub enum AttestCommand {
    /// Check an approval attestation (a DSSE envelope in JSON, as GetAttestation returns it):
    /// its signature, its expiry and, when given, the change request it is of and the payloads
    /// it approved. Exit 0 when it verifies, 1 when it is refused, 2 on an error.
    Verify {
        /// The envelope: `{"payloadType", "payload", "signatures"}`.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The audit public key (PEM), as `approvals audit public-key` prints it.
        #[arg(long, value_name = "KEY")]
        public_key: PathBuf,
        /// Refuse an attestation of any other change request.
        #[arg(long, value_name = "ID")]
        change_request_id: Option<String>,
        /// A JSON file with the payload object of one change, once per change in the request's
        /// order: refuse when any differs from what was approved.
        #[arg(long, value_name = "FILE")]
        payload: Vec<PathBuf>,
        /// Check expiry at this RFC 3339 time instead of now.
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
    },
}

/// Runs one `approvals attest` command: exit 0 when it verifies, 1 when refused, 2 on an error.
pub fn run_attest(command: AttestCommand) -> ExitCode {
    match attest_inner(command) {
        Ok(Ok(summary)) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Ok(Err(refusal)) => {
            eprintln!("approvals attest: refused: {refusal}");
            ExitCode::from(1)
        }
        Err(message) => {
            eprintln!("approvals attest: {message}");
            ExitCode::from(2)
        }
    }
}

type Refusal = super::attestation::AttestationError;

fn attest_inner(command: AttestCommand) -> Result<Result<String, Refusal>, String> {
    let AttestCommand::Verify {
        file,
        public_key,
        change_request_id,
        payload,
        at,
    } = command;
    let key = super::read_public_key(&public_key)?;
    let text = std::fs::read_to_string(&file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let envelope: super::attestation::Envelope = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{} is not a DSSE envelope ({{\"payloadType\", \"payload\", \"signatures\"}}): {e}",
            file.display()
        )
    })?;
    let mut payloads = Vec::with_capacity(payload.len());
    for path in &payload {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(map)) => payloads.push(map),
            Ok(_) => return Err(format!("{} is not a JSON object", path.display())),
            Err(e) => return Err(format!("{} is not JSON: {e}", path.display())),
        }
    }
    let now = match at {
        Some(text) => humantime::parse_rfc3339_weak(&text)
            .map_err(|e| format!("--at {text:?} is not an RFC 3339 time: {e}"))?,
        None => std::time::SystemTime::now(),
    };
    let changes: Vec<_> = payloads
        .iter()
        .map(super::attestation::ExpectedChange::payload)
        .collect();
    let expected = super::attestation::Expected {
        change_request_id: change_request_id.as_deref(),
        changes: (!changes.is_empty()).then_some(&changes[..]),
    };
    Ok(
        super::attestation::verify(&envelope, &key, now, &expected).map(|verified| {
            let p = &verified.statement.predicate;
            let approvers: Vec<&str> = p.approvers.iter().map(|a| a.principal.as_str()).collect();
            let mut summary = format!(
                "verified: change request {} ({} {} {}), {} change(s){}, approved by {}{}, expires {}",
                p.change_request_id,
                p.project,
                if p.environment.is_empty() { "-" } else { &p.environment },
                p.action_key,
                p.changes.len(),
                if changes.is_empty() { " (payloads not checked: give --payload)" } else { ", payloads match" },
                if approvers.is_empty() { "nobody".to_owned() } else { approvers.join(", ") },
                p.bypass.as_ref().map(|b| format!(", break-glass by {}: {}", b.by, b.justification)).unwrap_or_default(),
                p.expire_time,
            );
            summary.push_str(&format!(" (keyid {})", verified.keyid));
            summary
        }),
    )
}
