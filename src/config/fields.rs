//! How a key's value is read, and the bounds checked while it is read: a field's attribute in
//! the definition names its check, so an out-of-range value is reported under the key path and
//! the layer (file, variable, flag) it came from, never under a key written out by hand.

use std::{fmt::Display, net::SocketAddr};

use serde::{Deserialize, Deserializer, de::Error};

/// Durations are strings like `"500ms"` or `"2s"` (humantime's syntax, surrounding blanks
/// ignored), written back the same way by `config check`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(text.trim()).map_err(|e| {
            D::Error::custom(format!(
                "{text:?} is not a duration like \"500ms\" or \"2s\": {e}"
            ))
        })
    }

    /// A duration above zero.
    pub mod positive {
        use std::time::Duration;

        use serde::{Deserializer, Serializer, de::Error};

        pub fn serialize<S: Serializer>(
            value: &Duration,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            super::serialize(value, serializer)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Duration, D::Error> {
            let value = super::deserialize(deserializer)?;
            if value.is_zero() {
                return Err(D::Error::custom("must be more than 0s"));
            }
            Ok(value)
        }
    }
}

/// A number of at least `MIN`.
pub fn at_least<'de, const MIN: u16, T, D>(deserializer: D) -> Result<T, D::Error>
where
    T: Deserialize<'de> + PartialOrd + From<u16> + Display,
    D: Deserializer<'de>,
{
    let value = T::deserialize(deserializer)?;
    if value < T::from(MIN) {
        return Err(D::Error::custom(format!("must be at least {MIN}")));
    }
    Ok(value)
}

/// A string with more than blanks in it.
pub fn not_empty<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let value = String::deserialize(deserializer)?;
    if value.trim().is_empty() {
        return Err(D::Error::custom("must not be empty"));
    }
    Ok(value)
}

/// An address like `127.0.0.1:50051`, kept as written.
pub fn address<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let value = String::deserialize(deserializer)?;
    parse_address(&value).map_err(D::Error::custom)?;
    Ok(value)
}

pub fn parse_address(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an address like 127.0.0.1:50051"))
}

/// `text` or `json`.
pub fn log_format<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let value = String::deserialize(deserializer)?;
    if !matches!(value.as_str(), "text" | "json") {
        return Err(D::Error::custom(format!(
            "{value:?} is not a log format: expected \"text\" or \"json\""
        )));
    }
    Ok(value)
}
