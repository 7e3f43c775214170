//! The human CLI (`approvals cr ...`, `approvals policy ...`, `approvals login`): a client of
//! the public gRPC API through [`crate::client`], never of the database.
//!
//! - [`profile`]: `~/.config/approvals/config.toml` (XDG), named profiles, `login`.
//! - [`output`]: tables for people, the proto JSON mapping (`--output json|yaml`) for scripts.
//! - [`error`]: one error type, rendered without debug dumps, and the exit codes.
//! - [`cr`], [`policy`]: one file per command group.

/// `print!` that ends the process quietly when stdout's reader has gone (`| head`), instead of
/// panicking on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!($($arg)*))
    };
}

/// `println!`, as [`out!`].
macro_rules! outln {
    () => {
        $crate::cli::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {{
        $crate::cli::write_stdout(format_args!($($arg)*));
        $crate::cli::write_stdout(format_args!("\n"));
    }};
}

pub mod cr;
pub mod error;
pub mod output;
pub mod policy;
pub mod profile;

use std::process::ExitCode;

use crate::{
    client::{AuthedChannel, Client},
    pb::{change_requests_client::ChangeRequestsClient, policies_client::PoliciesClient},
};
use clap::{Args, ValueEnum};
pub use error::{CliError, EXIT_CODES_HELP, exit};

/// Connection and output flags shared by every client command (they may follow the command:
/// `approvals cr list --profile prod`).
#[derive(Args, Clone, Debug, Default)]
#[command(next_help_heading = "Connection and output")]
pub struct Global {
    /// Profile of the config file to use [default: the file's `default_profile`, else
    /// `default`].
    #[arg(long, global = true, env = "APPROVALS_PROFILE", value_name = "NAME")]
    pub profile: Option<String>,
    /// Server to call (`http://HOST:PORT` or `https://HOST:PORT`), instead of the profile's.
    #[arg(long, global = true, env = "APPROVALS_ENDPOINT", value_name = "URL")]
    pub endpoint: Option<String>,
    /// How to print results: `table` for people (the default), `json` or `yaml` (the proto JSON
    /// mapping, RFC 3339 times) for scripts, `id` for the ids (or policy names) alone.
    #[arg(long, short = 'o', global = true, value_enum, value_name = "FORMAT")]
    pub output: Option<Format>,
    /// Development servers only (no authentication configured): call as this principal
    /// (`user:NAME`), sent as `x-approvals-actor`.
    #[arg(long, global = true, env = "APPROVALS_ACTOR", value_name = "PRINCIPAL")]
    pub actor: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
    Id,
}

impl Global {
    pub fn format(&self) -> Format {
        self.output.unwrap_or(Format::Table)
    }
}

/// Adds `x-approvals-actor` to every call when the CLI names its caller (development servers).
/// A tower layer over the authenticated channel (tonic's interceptors do not nest).
#[derive(Clone)]
pub struct WithActor<S> {
    inner: S,
    actor: Option<http::HeaderValue>,
}

impl<S, B> tower::Service<http::Request<B>> for WithActor<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Some(actor) = &self.actor {
            request
                .headers_mut()
                .insert(crate::ACTOR_HEADER, actor.clone());
        }
        self.inner.call(request)
    }
}

pub type Channel = WithActor<AuthedChannel>;

/// The connected API, as the resolved profile says.
pub struct Api {
    client: Client,
    actor: Option<http::HeaderValue>,
    /// The profile's default project, for commands whose `--project` is left out.
    pub project: Option<String>,
}

const MAX_MESSAGE: usize = 64 * 1024 * 1024;

impl Api {
    pub async fn connect(global: &Global) -> Result<Self, CliError> {
        let resolved = profile::resolve(global, |name| std::env::var(name).ok())?;
        let client = Client::connect(&resolved.config)
            .await
            .map_err(CliError::client)?;
        let actor = match resolved.actor {
            Some(actor) => Some(http::HeaderValue::try_from(actor.as_str()).map_err(|_| {
                CliError::usage(format!("--actor {actor:?}: not a valid header value"))
            })?),
            None => None,
        };
        Ok(Self {
            client,
            actor,
            project: resolved.project,
        })
    }

    fn channel(&self) -> Channel {
        WithActor {
            inner: self.client.authed_channel(),
            actor: self.actor.clone(),
        }
    }

    pub fn change_requests(&self) -> ChangeRequestsClient<Channel> {
        ChangeRequestsClient::new(self.channel()).max_decoding_message_size(MAX_MESSAGE)
    }

    pub fn policies(&self) -> PoliciesClient<Channel> {
        PoliciesClient::new(self.channel()).max_decoding_message_size(MAX_MESSAGE)
    }

    /// `--project`, else the profile's project, else a usage error.
    pub fn project(&self, flag: Option<String>) -> Result<String, CliError> {
        flag.or_else(|| self.project.clone()).ok_or_else(|| {
            CliError::usage("--project is required (or set `project` in the profile)")
        })
    }
}

/// Writes to stdout; a closed pipe ends the process with 0 (its reader has what it wanted),
/// another failure with 1.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(i32::from(exit::FAILURE));
    }
}

/// Runs a client command and turns its outcome into the process's exit code, printing an
/// error on stderr.
pub fn finish(outcome: Result<ExitCode, CliError>) -> ExitCode {
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprint!("{}", error.render());
            error.exit_code()
        }
    }
}

/// `approvals completions SHELL`: the completion script of `command` on stdout.
pub fn completions(shell: clap_complete::Shell, command: &mut clap::Command) -> ExitCode {
    clap_complete::generate(shell, command, "approvals", &mut std::io::stdout());
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::{cr, policy, profile};
    use clap::Args as _;

    /// Every command of the CLI shows an example in its `--help`.
    #[test]
    fn every_command_has_an_example() {
        let groups = [
            cr::CrArgs::augment_args(clap::Command::new("cr")),
            policy::PolicyArgs::augment_args(clap::Command::new("policy")),
            profile::LoginArgs::augment_args(clap::Command::new("login")),
        ];
        for group in groups {
            let name = group.get_name().to_owned();
            let mut commands: Vec<&clap::Command> = vec![&group];
            commands.extend(group.get_subcommands());
            for command in commands {
                let help = command.get_after_help().map(ToString::to_string);
                assert!(
                    help.as_deref().is_some_and(|h| h.contains("Example")),
                    "{name} {}: no example in --help",
                    command.get_name()
                );
            }
        }
    }
}
