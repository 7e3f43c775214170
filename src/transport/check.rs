//! What the server refuses to start with: the configuration's own checks of types and ranges,
//! then the meaning of its `[auth]` section. `config check` and `serve` both run
//! [`check_config`], so they refuse the same configurations with the same messages.

use crate::{
    auth,
    config::{Config, ConfigError},
};

pub fn check_config(config: &Config) -> Result<(), ConfigError> {
    config.validate()?;
    auth::validate_config(&config.auth).map_err(|(key, message)| ConfigError::Invalid {
        key,
        source_name: "the merged configuration".to_owned(),
        message,
    })
}
