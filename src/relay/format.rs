//! What a sink receives: a CloudEvents 1.0 structured JSON event (`application/cloudevents+json`,
//! built with the CloudEvents SDK) or a Slack incoming-webhook message (text and blocks).

use serde_json::{Value, json};

use super::config::{Format, SinkConfig};
use crate::pb;

pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json";
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// One request body and its content type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub body: String,
    pub content_type: &'static str,
}

/// `EVENT_KIND_APPLY_FAILED` -> `apply_failed`.
pub fn kind_name(kind: i32) -> String {
    let name = pb::EventKind::try_from(kind)
        .unwrap_or(pb::EventKind::Unspecified)
        .as_str_name();
    name.strip_prefix("EVENT_KIND_")
        .unwrap_or(name)
        .to_ascii_lowercase()
}

fn state_name(state: i32) -> String {
    let name = pb::State::try_from(state)
        .unwrap_or(pb::State::Unspecified)
        .as_str_name();
    name.strip_prefix("STATE_")
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// The event in proto JSON (the canonical mapping: lowerCamelCase names, enums by name,
/// Timestamps as RFC 3339, default values left out), from the service's own descriptors.
pub fn event_json(event: &pb::Event) -> Result<Value, String> {
    crate::client::json::to_json(event, "approvals.v1.Event", false)
}

fn time(event: &pb::Event) -> chrono::DateTime<chrono::Utc> {
    let t = event.event_time.unwrap_or_default();
    chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
        .unwrap_or_default()
}

/// The CloudEvent of an event: id = revision, source = `approvals/<project>`, type =
/// `approvals.change_request.<kind>`, subject = the change request id, time = the event time,
/// data = the Event in proto JSON.
pub fn cloudevent(event: &pb::Event) -> Result<Payload, String> {
    use cloudevents::{EventBuilder, EventBuilderV10};
    let built = EventBuilderV10::new()
        .id(event.revision.to_string())
        .source(format!("approvals/{}", event.project))
        .ty(format!(
            "approvals.change_request.{}",
            kind_name(event.kind)
        ))
        .subject(event.change_request_id.clone())
        .time(time(event))
        .data(JSON_CONTENT_TYPE, event_json(event)?)
        .build()
        .map_err(|e| format!("cloudevent: {e}"))?;
    Ok(Payload {
        body: serde_json::to_string(&built).map_err(|e| format!("cloudevent: {e}"))?,
        content_type: CLOUDEVENTS_CONTENT_TYPE,
    })
}

fn link(template: &str, request: &pb::ChangeRequest, event: &pb::Event) -> String {
    template
        .replace("{id}", &event.change_request_id)
        .replace("{project}", &event.project)
        .replace("{environment}", &request.environment)
}

fn mrkdwn_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn field(label: &str, value: &str) -> Value {
    json!({ "type": "mrkdwn", "text": format!("*{label}*\n{}", mrkdwn_escape(value)) })
}

/// A Slack incoming-webhook message: title, project and environment, requester, new state, who
/// acted and their comment, and a link from `link_template`.
pub fn slack(event: &pb::Event, link_template: &str) -> Payload {
    let request = event.change_request.clone().unwrap_or_default();
    let title = if request.title.is_empty() {
        event.change_request_id.clone()
    } else {
        request.title.clone()
    };
    let place = if event.environment.is_empty() {
        event.project.clone()
    } else {
        format!("{} / {}", event.project, event.environment)
    };
    let kind = kind_name(event.kind).replace('_', " ");
    let state = state_name(event.to_state).replace('_', " ");
    let mut actor = event.actor.clone();
    if !event.acting_principal.is_empty() {
        actor = format!("{actor} (via {})", event.acting_principal);
    }
    let text = format!("{title} ({place}): {kind} by {actor}; now {state}");
    let mut blocks = vec![
        json!({ "type": "header", "text": { "type": "plain_text", "text": title } }),
        json!({ "type": "section", "fields": [
            field("Project", &place),
            field("Requester", &request.created_by),
            field("State", &state),
            field(&format!("{} by", capitalise(&kind)), &actor),
        ]}),
    ];
    if !event.detail.is_empty() {
        blocks.push(json!({ "type": "section", "text": {
            "type": "mrkdwn",
            "text": format!("> {}", mrkdwn_escape(&event.detail).replace('\n', "\n> ")),
        }}));
    }
    if !link_template.is_empty() {
        blocks.push(json!({ "type": "actions", "elements": [{
            "type": "button",
            "text": { "type": "plain_text", "text": "Open change request" },
            "url": link(link_template, &request, event),
        }]}));
    }
    let body = json!({ "text": text, "blocks": blocks });
    Payload {
        body: body.to_string(),
        content_type: JSON_CONTENT_TYPE,
    }
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The body a sink receives for `event`.
pub fn render(sink: &SinkConfig, event: &pb::Event) -> Result<Payload, String> {
    match sink.format {
        Format::Cloudevents => cloudevent(event),
        Format::Slack => Ok(slack(event, &sink.link_template)),
    }
}

/// The body of `approvals relay check`: a test event, type `approvals.relay.check`.
pub fn check(sink: &SinkConfig, id: &str) -> Result<Payload, String> {
    match sink.format {
        Format::Cloudevents => {
            use cloudevents::{EventBuilder, EventBuilderV10};
            let built = EventBuilderV10::new()
                .id(id.to_owned())
                .source(format!("approvals/{}", sink.project))
                .ty("approvals.relay.check")
                .subject(sink.name.clone())
                .time(chrono::Utc::now())
                .data(JSON_CONTENT_TYPE, json!({ "sink": sink.name }))
                .build()
                .map_err(|e| format!("cloudevent: {e}"))?;
            Ok(Payload {
                body: serde_json::to_string(&built).map_err(|e| format!("cloudevent: {e}"))?,
                content_type: CLOUDEVENTS_CONTENT_TYPE,
            })
        }
        Format::Slack => Ok(Payload {
            body: json!({ "text": format!("approvals relay check of sink {}", sink.name) })
                .to_string(),
            content_type: JSON_CONTENT_TYPE,
        }),
    }
}
