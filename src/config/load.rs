//! Loading: the defaults (serde's `default` on each struct in `mod.rs`), then the file, then the
//! `APPROVALS_*` environment, then flags, merged by figment and deserialized once into
//! [`Config`]. Every value keeps the layer it came from, so an error names its key and where the
//! value was set.
//!
//! The structs in `mod.rs` are the one definition: the key paths, and so the environment names,
//! are read off a serialized configuration ([`key_paths`]), never written out a second time.

use std::{collections::BTreeMap, path::Path};

use figment::{
    Figment, Metadata, Profile, Provider,
    error::Kind,
    value::{Dict, Map, Value},
};

use super::{
    Config,
    auth::{ApiKeyConfig, JwtConfig},
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{key} (from {source_name}): {message}")]
    Invalid {
        key: String,
        /// The file, `APPROVALS_*` variable or `--flag` that set the value.
        source_name: String,
        message: String,
    },
}

/// Values given on the command line, each for one key path; the last layer, above the
/// environment.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    /// Key path -> (flag, value).
    values: BTreeMap<String, (&'static str, Value)>,
}

impl Flags {
    /// Sets `key` (a key path like `watch.max_lag`) to `value` when the flag `flag` (named in
    /// errors, e.g. `--watch-max-lag`) was given.
    pub fn set(mut self, key: &str, flag: &'static str, value: Option<impl Into<Value>>) -> Self {
        if let Some(value) = value {
            self.values.insert(key.to_owned(), (flag, value.into()));
        }
        self
    }
}

/// `APPROVALS_` + the key path upper-cased with `.` as `_`.
pub fn env_name(key: &str) -> String {
    format!("APPROVALS_{}", key.to_uppercase().replace('.', "_"))
}

/// How a key's text in the environment becomes its value: by the type of its default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Strings, durations included (their own deserializer parses them).
    Text,
    Integer,
    Boolean,
    /// A comma-separated list in the environment; a TOML array in the file.
    List,
}

/// A configuration with every optional key present (the `[auth.jwt]` table and both of its
/// JWKS sources, one API key), so that its serialization shows every key path.
fn every_key() -> Config {
    let mut config = Config::default();
    config.auth.jwt = Some(JwtConfig {
        jwks_file: Some(String::new()),
        jwks_url: Some(String::new()),
        ..JwtConfig::default()
    });
    config.auth.api_keys.push(ApiKeyConfig::default());
    config
}

/// Every key an environment variable can set, with its kind: each scalar or list of strings.
/// Arrays of tables (`[[auth.api_keys]]`) and maps (`[auth.groups]`) are only in the file.
fn settable_keys() -> Vec<(String, Shape)> {
    fn walk(prefix: &str, dict: &Dict, keys: &mut Vec<(String, Shape)>) {
        for (name, value) in dict {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            let kind = match value {
                Value::Dict(_, inner) => {
                    walk(&path, inner, keys);
                    continue;
                }
                Value::Array(_, items) if items.iter().all(|v| v.as_str().is_some()) => Shape::List,
                Value::Array(..) | Value::Empty(..) => continue,
                Value::Num(..) => Shape::Integer,
                Value::Bool(..) => Shape::Boolean,
                Value::String(..) | Value::Char(..) => Shape::Text,
            };
            keys.push((path, kind));
        }
    }
    let mut keys = Vec::new();
    // Serializing plain data (strings, numbers, lists, tables) does not fail.
    if let Ok(Value::Dict(_, dict)) = Value::serialize(every_key()) {
        walk("", &dict, &mut keys);
    }
    keys
}

/// The key paths environment variables can set (`listen`, `database.url`, `watch.max_lag`, ...),
/// sorted.
pub fn key_paths() -> Vec<String> {
    settable_keys().into_iter().map(|(path, _)| path).collect()
}

impl Shape {
    fn parse(self, text: &str) -> Result<Value, String> {
        let text = text.trim();
        Ok(match self {
            Self::Text => text.into(),
            Self::Integer => text
                .parse::<i64>()
                .map_err(|_| format!("{text:?} is not a whole number"))?
                .into(),
            Self::Boolean => text
                .parse::<bool>()
                .map_err(|_| format!("{text:?} is not true or false"))?
                .into(),
            Self::List => text
                .split(',')
                .map(str::trim)
                .filter(|entry| !entry.is_empty())
                .map(Value::from)
                .collect::<Vec<_>>()
                .into(),
        })
    }
}

/// One layer for figment: its values, and how an error names where a key's value came from.
struct Layer {
    metadata: Metadata,
    data: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.data.clone()))
    }
}

/// Puts `value` at the dotted `path` inside `dict`.
fn insert(dict: &mut Dict, path: &str, value: Value) {
    match path.split_once('.') {
        None => {
            dict.insert(path.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_owned())
                .or_insert_with(|| Dict::new().into());
            if !matches!(entry, Value::Dict(..)) {
                *entry = Dict::new().into();
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

impl Layer {
    fn file(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let parse_error = |message: String| ConfigError::Parse {
            path: shown.clone(),
            message,
        };
        let table: toml::Table = toml::from_str(&text).map_err(|e| parse_error(e.to_string()))?;
        let data = match Value::serialize(table).map_err(|e| parse_error(e.to_string()))? {
            Value::Dict(_, dict) => dict,
            _ => Dict::new(),
        };
        let source = shown.clone();
        Ok(Self {
            metadata: Metadata::named("config file")
                .interpolater(move |_: &Profile, _: &[&str]| source.clone()),
            data,
        })
    }

    fn environment(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut data = Dict::new();
        for (key, kind) in settable_keys() {
            let name = env_name(&key);
            let Some(text) = lookup(&name) else { continue };
            let value = kind.parse(&text).map_err(|message| ConfigError::Invalid {
                key: key.clone(),
                source_name: name,
                message,
            })?;
            insert(&mut data, &key, value);
        }
        Ok(Self {
            metadata: Metadata::named("environment")
                .interpolater(|_: &Profile, keys: &[&str]| env_name(&keys.join("."))),
            data,
        })
    }

    fn flags(flags: &Flags) -> Result<Self, ConfigError> {
        let keys = key_paths();
        let mut data = Dict::new();
        for (key, (flag, value)) in &flags.values {
            if !keys.contains(key) {
                return Err(ConfigError::Invalid {
                    key: key.clone(),
                    source_name: (*flag).to_owned(),
                    message: "is not a configuration key".to_owned(),
                });
            }
            insert(&mut data, key, value.clone());
        }
        let names: BTreeMap<String, &'static str> = flags
            .values
            .iter()
            .map(|(key, (flag, _))| (key.clone(), *flag))
            .collect();
        Ok(Self {
            metadata: Metadata::named("flags").interpolater(move |_: &Profile, keys: &[&str]| {
                let key = keys.join(".");
                names.get(&key).map_or(key, |flag| (*flag).to_owned())
            }),
            data,
        })
    }
}

/// `auth.api_keys[0].sha256` from figment's `["auth", "api_keys", "0", "sha256"]`.
fn key_of(path: &[String]) -> String {
    let mut key = String::new();
    for part in path {
        if part.parse::<usize>().is_ok() {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(part);
        }
    }
    key
}

/// Who set the value at `path`: the file, the variable, the flag; or nobody (the default).
fn source_of(metadata: Option<&Metadata>, path: &[String]) -> String {
    match metadata {
        Some(metadata) => metadata.interpolate(&Profile::Default, path),
        None => "the default".to_owned(),
    }
}

fn from_figment(error: figment::Error, file: Option<&Path>) -> ConfigError {
    let path = &error.path;
    let (source_name, message) = match &error.kind {
        // Only the file can hold a key the definition lacks: the environment is read by the
        // definition's key paths, and flags are checked against them. The path ends with the
        // unknown key.
        Kind::UnknownField(_, expected) => {
            let section = key_of(&path[..path.len().saturating_sub(1)]);
            let table = if section.is_empty() {
                "the top level".to_owned()
            } else {
                format!("[{section}]")
            };
            let source = file.map_or_else(
                || source_of(error.metadata.as_ref(), path),
                |file| file.display().to_string(),
            );
            (
                source,
                format!(
                    "unknown key: the keys of {table} are {}",
                    expected.join(", ")
                ),
            )
        }
        kind => (source_of(error.metadata.as_ref(), path), kind.to_string()),
    };
    ConfigError::Invalid {
        key: key_of(path),
        source_name,
        message,
    }
}

impl Config {
    /// Loads file, environment (`lookup` reads a variable) and flags, then validates what this
    /// module can check (`transport::check_config` adds the `[auth]` rules).
    pub fn load(
        file: Option<&Path>,
        lookup: impl Fn(&str) -> Option<String>,
        flags: &Flags,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            figment = figment.merge(Layer::file(path)?);
        }
        let figment = figment
            .merge(Layer::environment(&lookup)?)
            .merge(Layer::flags(flags)?);
        let config: Config = figment
            .extract()
            .map_err(|error| from_figment(error, file))?;
        config.validate().map_err(|error| match error {
            ConfigError::Invalid { key, message, .. } => {
                let path: Vec<String> = key.split('.').map(str::to_owned).collect();
                ConfigError::Invalid {
                    source_name: source_of(figment.find_metadata(&key), &path),
                    key,
                    message,
                }
            }
            other => other,
        })?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests;
