//! Named profiles in `$XDG_CONFIG_HOME/approvals/config.toml` (else
//! `~/.config/approvals/config.toml`), and `approvals login`, which writes one.
//!
//! ```toml
//! default_profile = "prod"
//!
//! [profiles.prod]
//! endpoint = "https://approvals.example.com"
//! project = "web"                       # default --project
//! credential_env = "APPROVALS_PROD_KEY" # or credential_file = "/path/to/key", or token = "..."
//! [profiles.prod.tls]                   # the client's TLS settings (all optional)
//! ca_file = "/etc/ssl/approvals-ca.pem"
//! ```
//!
//! An inline `token` is refused unless the file's mode is 0600 (or stricter). Precedence:
//! flags, then the environment (`APPROVALS_PROFILE`, `APPROVALS_ENDPOINT`, `APPROVALS_API_KEY`,
//! `APPROVALS_TOKEN`, `APPROVALS_ACTOR`), then the profile.

use std::{
    collections::BTreeMap,
    io::{BufRead, Write},
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Args;
use serde::{Deserialize, Serialize};

use super::{CliError, Global};
use crate::client::{ClientConfig, ClientTls, Credential};

/// The endpoint when neither a flag nor a profile names one (the server's default listen).
pub const DEFAULT_ENDPOINT: &str = "http://localhost:50051";

/// The config file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfilesFile {
    /// The profile used when neither `--profile` nor `APPROVALS_PROFILE` names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_profile: Option<String>,
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

/// One named profile.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Default `--project` of the commands that take one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Name of an environment variable holding the API key or JWT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_env: Option<String>,
    /// A file holding the API key or JWT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_file: Option<PathBuf>,
    /// The API key or JWT itself: only in a file of mode 0600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Development servers only: the principal to call as (`x-approvals-actor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(default, skip_serializing_if = "is_default_tls")]
    pub tls: ClientTls,
}

fn is_default_tls(tls: &ClientTls) -> bool {
    *tls == ClientTls::default()
}

/// Where the config file is: `$XDG_CONFIG_HOME/approvals/config.toml`, else
/// `$HOME/.config/approvals/config.toml`.
pub fn config_path(get: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let base = get("XDG_CONFIG_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            get("HOME")
                .filter(|home| !home.is_empty())
                .map(|home| Path::new(&home).join(".config"))
        })?;
    Some(base.join("approvals").join("config.toml"))
}

/// The file, or an empty one when it does not exist.
pub fn load(path: &Path) -> Result<ProfilesFile, CliError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ProfilesFile::default()),
        Err(e) => return Err(CliError::failure(format!("{}: {e}", path.display()))),
    };
    toml::from_str(&text).map_err(|e| CliError::usage(format!("{}: {e}", path.display())))
}

/// What a command connects with.
pub struct Resolved {
    pub config: ClientConfig,
    pub actor: Option<String>,
    pub project: Option<String>,
}

/// Flags, environment and profile, in that order.
pub fn resolve(
    global: &Global,
    get: impl Fn(&str) -> Option<String>,
) -> Result<Resolved, CliError> {
    let path = config_path(&get);
    let file = match &path {
        Some(path) => load(path)?,
        None => ProfilesFile::default(),
    };
    let named = global.profile.clone().or(file.default_profile.clone());
    let profile = match &named {
        Some(name) => file.profiles.get(name).cloned().ok_or_else(|| {
            CliError::usage(format!(
                "no profile {name:?} in {} (approvals login --profile {name} writes one)",
                path.as_deref()
                    .map_or_else(|| "the config file".into(), |p| p.display().to_string())
            ))
        })?,
        None => file.profiles.get("default").cloned().unwrap_or_default(),
    };
    let endpoint = global
        .endpoint
        .clone()
        .or(profile.endpoint.clone())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
    let mut credential = Credential::from_env(&get);
    if !credential.is_present() {
        credential = profile_credential(&profile, path.as_deref(), &get)?;
    }
    Ok(Resolved {
        config: ClientConfig::new(endpoint)
            .with_tls(profile.tls.clone())
            .with_credential(credential),
        actor: global.actor.clone().or(profile.actor.clone()),
        project: profile.project.clone(),
    })
}

fn profile_credential(
    profile: &Profile,
    path: Option<&Path>,
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Credential, CliError> {
    if let Some(token) = &profile.token {
        if let Some(path) = path {
            check_private(path)?;
        }
        return Ok(Credential::bearer(token));
    }
    if let Some(name) = &profile.credential_env {
        return match get(name) {
            Some(value) if !value.trim().is_empty() => Ok(Credential::bearer(value)),
            _ => Err(CliError::usage(format!(
                "the profile's credential_env names {name}, which is not set"
            ))),
        };
    }
    if let Some(file) = &profile.credential_file {
        return Credential::from_file(file).map_err(CliError::client);
    }
    Ok(Credential::none())
}

/// An inline secret is kept only in a file no one else may read.
#[cfg(unix)]
fn check_private(path: &Path) -> Result<(), CliError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| CliError::failure(format!("{}: {e}", path.display())))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(CliError::usage(format!(
            "{} holds an inline token but its mode is {:04o}: run `chmod 600 {}`, or use \
             credential_env or credential_file instead",
            path.display(),
            mode & 0o777,
            path.display()
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path) -> Result<(), CliError> {
    Ok(())
}

/// `approvals login`: writes (or replaces) a profile. Every setting has a flag; those left out
/// are asked for on stdin (an empty answer keeps the default shown in brackets).
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  approvals login --profile prod --endpoint https://approvals.example.com --credential-env PROD_KEY
  printf 'https://approvals.example.com\\nt\\napv1_...\\n' | approvals login --profile prod")]
pub struct LoginArgs {
    /// Profile to write [default: default].
    #[arg(long, env = "APPROVALS_PROFILE", value_name = "NAME")]
    pub profile: Option<String>,
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// Default project of the profile.
    #[arg(long, value_name = "P")]
    pub project: Option<String>,
    /// Read the credential from this environment variable at each call.
    #[arg(long, value_name = "VAR", conflicts_with_all = ["credential_file", "token_stdin", "no_credential"])]
    pub credential_env: Option<String>,
    /// Read the credential from this file at each call.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["token_stdin", "no_credential"])]
    pub credential_file: Option<PathBuf>,
    /// Read the token from stdin and keep it in the config file (written with mode 0600).
    #[arg(long, conflicts_with = "no_credential")]
    pub token_stdin: bool,
    /// No credential (a development server).
    #[arg(long)]
    pub no_credential: bool,
    /// Development servers only: call as this principal.
    #[arg(long, value_name = "PRINCIPAL")]
    pub actor: Option<String>,
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub cert_file: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// Make it the default profile.
    #[arg(long)]
    pub default: bool,
}

pub fn login(args: LoginArgs) -> ExitCode {
    let stdin = std::io::stdin();
    let outcome = write_login(args, &mut stdin.lock(), |name| std::env::var(name).ok());
    match outcome {
        Ok(path) => {
            outln!("profile written to {}", path.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprint!("{}", error.render());
            error.exit_code()
        }
    }
}

fn ask(input: &mut impl BufRead, question: &str) -> Result<String, CliError> {
    eprint!("{question}: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    input
        .read_line(&mut line)
        .map_err(|e| CliError::failure(format!("reading stdin: {e}")))?;
    Ok(line.trim().to_owned())
}

fn write_login(
    args: LoginArgs,
    input: &mut impl BufRead,
    get: impl Fn(&str) -> Option<String>,
) -> Result<PathBuf, CliError> {
    let path = config_path(&get)
        .ok_or_else(|| CliError::usage("neither XDG_CONFIG_HOME nor HOME is set"))?;
    let mut file = load(&path)?;
    let name = args.profile.clone().unwrap_or_else(|| "default".into());
    let endpoint = match args.endpoint {
        Some(endpoint) => endpoint,
        None => {
            let answer = ask(input, &format!("Endpoint [{DEFAULT_ENDPOINT}]"))?;
            if answer.is_empty() {
                DEFAULT_ENDPOINT.to_owned()
            } else {
                answer
            }
        }
    };
    let mut profile = Profile {
        endpoint: Some(endpoint),
        project: args.project,
        actor: args.actor,
        tls: ClientTls {
            ca_file: args.ca_file,
            cert_file: args.cert_file,
            key_file: args.key_file,
            server_name: args.server_name,
        },
        ..Profile::default()
    };
    if let Some(var) = args.credential_env {
        profile.credential_env = Some(var);
    } else if let Some(file) = args.credential_file {
        profile.credential_file = Some(file);
    } else if args.token_stdin {
        profile.token = Some(ask(input, "Token")?);
    } else if !args.no_credential {
        let how = ask(
            input,
            "Credential: e = from an environment variable, f = from a file, t = paste it, n = none [n]",
        )?;
        match how.as_str() {
            "e" => profile.credential_env = Some(ask(input, "Environment variable")?),
            "f" => profile.credential_file = Some(PathBuf::from(ask(input, "File")?)),
            "t" => profile.token = Some(ask(input, "Token")?),
            "" | "n" => {}
            other => return Err(CliError::usage(format!("unknown answer {other:?}"))),
        }
    }
    if profile.token.as_deref().is_some_and(str::is_empty) {
        return Err(CliError::usage("the token is empty"));
    }
    if args.default {
        file.default_profile = Some(name.clone());
    }
    file.profiles.insert(name, profile);
    let text = toml::to_string(&file).map_err(|e| CliError::failure(e.to_string()))?;
    save_private(&path, &text)?;
    Ok(path)
}

/// Writes the file with mode 0600 (it may hold a token).
fn save_private(path: &Path, text: &str) -> Result<(), CliError> {
    let fail = |e: std::io::Error| CliError::failure(format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut out = options.open(path).map_err(fail)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    }
    out.write_all(text.as_bytes()).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn xdg_config_home_wins_over_home() {
        let get = env(vec![
            ("XDG_CONFIG_HOME", "/x".into()),
            ("HOME", "/h".into()),
        ]);
        assert_eq!(
            config_path(&get),
            Some(PathBuf::from("/x/approvals/config.toml"))
        );
        let get = env(vec![("HOME", "/h".into())]);
        assert_eq!(
            config_path(&get),
            Some(PathBuf::from("/h/.config/approvals/config.toml"))
        );
    }

    #[test]
    fn an_inline_token_needs_a_private_file_and_flags_win() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("approvals/config.toml");
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(
            &path,
            "default_profile = \"p\"\n[profiles.p]\nendpoint = \"http://127.0.0.1:1\"\ntoken = \"secret\"\n",
        )
        .expect("write");
        let get = env(vec![("XDG_CONFIG_HOME", dir.path().display().to_string())]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let refused = resolve(&Global::default(), &get).err().map(|e| e.render());
            assert!(
                refused.as_deref().is_some_and(|m| m.contains("chmod 600")),
                "{refused:?}"
            );
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let resolved = resolve(&Global::default(), &get).expect("resolved");
        assert_eq!(resolved.config.endpoint, "http://127.0.0.1:1");
        assert_eq!(resolved.config.credential, Credential::bearer("secret"));
        let flags = Global {
            endpoint: Some("http://127.0.0.1:2".into()),
            ..Global::default()
        };
        let resolved = resolve(&flags, &get).expect("resolved");
        assert_eq!(resolved.config.endpoint, "http://127.0.0.1:2");
        let missing = Global {
            profile: Some("nope".into()),
            ..Global::default()
        };
        assert!(resolve(&missing, &get).is_err());
    }
}
