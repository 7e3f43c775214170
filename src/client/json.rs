//! The proto JSON mapping of the API's messages (lowerCamelCase names, enums by name, RFC 3339
//! times, int64 as strings), through the descriptor set that reflection serves: what the CLI
//! prints and reads and what the relay sends, from one place.

use std::sync::OnceLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};
use serde_json::Value;

use crate::pb;

fn pool() -> Result<&'static DescriptorPool, String> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET).map_err(|e| format!("descriptor set: {e}"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn descriptor(name: &str) -> Result<MessageDescriptor, String> {
    pool()?
        .get_message_by_name(name)
        .ok_or_else(|| format!("no message {name} in the descriptor set"))
}

/// `message` (whose full proto name is `name`) as proto JSON: fields at their defaults left
/// out, or all of them with `defaults`.
pub fn to_json(message: &impl Message, name: &str, defaults: bool) -> Result<Value, String> {
    let dynamic = DynamicMessage::decode(descriptor(name)?, message.encode_to_vec().as_slice())
        .map_err(|e| format!("{name}: {e}"))?;
    let options = SerializeOptions::new().skip_default_fields(!defaults);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| format!("{name}: {e}"))
}

/// A message from its proto JSON (field names as in the proto or in lowerCamelCase).
pub fn from_json<M: Message + Default>(json: Value, name: &str) -> Result<M, String> {
    let dynamic =
        DynamicMessage::deserialize(descriptor(name)?, json).map_err(|e| e.to_string())?;
    dynamic.transcode_to::<M>().map_err(|e| e.to_string())
}
