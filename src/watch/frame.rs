//! Watch messages as they go on the wire: each live event encoded once for every watcher.

use bytes::Bytes;
use prost::Message as _;

use approvals_domain::Event;

use crate::{convert, pb};

/// An event as published to live watchers: the domain event (for filtering) and the message
/// encoded once for every watcher (see [`WatchFrame`]).
pub struct LiveEvent {
    pub(super) event: Event,
    /// The gRPC message of a frame that carries this event alone: the 5-byte gRPC prefix, then
    /// `WatchChangeRequestsResponse { revision, events: [event] }`. It ends with the encoded
    /// event, which frames of several events copy from.
    pub(super) framed: Bytes,
    /// Length of the encoded event at the end of `framed`.
    pub(super) event_len: usize,
    /// When the hub read it from the log: a watcher sending it counts this as its last
    /// message's time (for the progress interval), instead of reading the clock per delivery.
    pub(super) read_at: tokio::time::Instant,
}

impl LiveEvent {
    pub(super) fn new(event: Event, read_at: tokio::time::Instant) -> Self {
        let encoded = convert::event(&event).encode_to_vec();
        Self {
            framed: frame_live(event.revision, [encoded.as_slice()]),
            event_len: encoded.len(),
            read_at,
            event,
        }
    }

    pub(super) fn encoded(&self) -> &[u8] {
        encoded(&self.framed, self.event_len)
    }
}

/// One message of a watch stream, as the stream produces it. Events from the live ring are
/// shared, already encoded: with 10,000 watchers an event used to be cloned and encoded
/// 10,000 times, and a frame of one event is sent as the very bytes the ring holds. On the wire
/// a frame is exactly the `WatchChangeRequestsResponse` it stands for (`into_message` gives
/// that message; a test holds the bytes equal).
#[derive(Clone)]
pub enum WatchFrame {
    Message(pb::WatchChangeRequestsResponse),
    /// Live events as their gRPC message (see [`LiveFrame`]), and when the hub read the
    /// newest of them.
    Live {
        message: Bytes,
        read_at: tokio::time::Instant,
    },
}

impl std::fmt::Debug for WatchFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Message(message) => message.fmt(f),
            Self::Live { message, .. } => f
                .debug_struct("WatchFrame::Live")
                .field("bytes", &message.len())
                .finish(),
        }
    }
}

impl WatchFrame {
    /// The message the frame stands for. A live frame is decoded from its own bytes: only the
    /// generated service's path, which the watch route never takes, and tests, ask for it.
    pub fn into_message(self) -> pb::WatchChangeRequestsResponse {
        match self {
            Self::Live { message, .. } => {
                pb::WatchChangeRequestsResponse::decode(message.slice(GRPC_PREFIX..))
                    .unwrap_or_default()
            }
            Self::Message(message) => message,
        }
    }

    /// The frame as one length-prefixed gRPC message (uncompressed), as it goes on the wire.
    pub fn grpc_message(&self) -> Bytes {
        match self {
            Self::Live { message, .. } => message.clone(),
            Self::Message(message) => {
                let body_len = message.encoded_len();
                let mut buf = bytes::BytesMut::with_capacity(GRPC_PREFIX + body_len);
                put_grpc_prefix(body_len, &mut buf);
                message.encode_raw(&mut buf);
                buf.freeze()
            }
        }
    }
}

/// A live frame being gathered from the ring, its events seen by reference (under the ring's
/// lock). A frame of one event is that event's own shared bytes; several are copied into one
/// message (`frame_live`).
#[derive(Default)]
pub struct LiveFrame {
    /// Each event's frame (see [`LiveEvent::framed`]) and its encoded length. The first apart:
    /// a frame of one event, nearly every frame, allocates nothing.
    first: Option<(Bytes, usize)>,
    rest: Vec<(Bytes, usize)>,
    read_at: Option<tokio::time::Instant>,
    revision: i64,
}

impl LiveFrame {
    pub(super) fn push(&mut self, live: &LiveEvent) {
        let framed = (live.framed.clone(), live.event_len);
        match self.first {
            None => self.first = Some(framed),
            Some(_) => self.rest.push(framed),
        }
        self.revision = live.event.revision;
        self.read_at = Ord::max(self.read_at, Some(live.read_at));
    }

    /// The frame, unless no event was pushed.
    pub(super) fn finish(self) -> Option<WatchFrame> {
        let read_at = self.read_at?;
        let first = self.first?;
        let message = if self.rest.is_empty() {
            first.0
        } else {
            let events = std::iter::once(&first).chain(&self.rest);
            frame_live(
                self.revision,
                events.map(|(framed, event_len)| encoded(framed, *event_len)),
            )
        };
        Some(WatchFrame::Live { message, read_at })
    }
}

/// The encoded event at the end of a frame of it alone.
fn encoded(framed: &[u8], event_len: usize) -> &[u8] {
    &framed[framed.len() - event_len..]
}

/// Appends one encoded event as an `events` field.
fn put_event(encoded: &[u8], buf: &mut bytes::BytesMut) {
    prost::encoding::encode_key(
        EVENTS_FIELD,
        prost::encoding::WireType::LengthDelimited,
        buf,
    );
    prost::encoding::encode_varint(encoded.len() as u64, buf);
    buf.extend_from_slice(encoded);
}

/// Bytes before each gRPC message: a compression flag (0) and the length (u32, big-endian).
const GRPC_PREFIX: usize = 5;
/// Field numbers of `WatchChangeRequestsResponse` that a live frame writes, in number order,
/// as prost writes them.
const REVISION_FIELD: u32 = 1;
const EVENTS_FIELD: u32 = 2;

fn put_grpc_prefix(body_len: usize, buf: &mut bytes::BytesMut) {
    use bytes::BufMut;
    buf.put_u8(0);
    // A single event is far below 4 GiB: the store refuses payloads past the message limit.
    buf.put_u32(u32::try_from(body_len).unwrap_or(u32::MAX));
}

/// The gRPC message of a live frame: `WatchChangeRequestsResponse { revision, events }` with
/// the events already encoded, fields in number order as prost writes them.
fn frame_live<'a>(revision: i64, events: impl IntoIterator<Item = &'a [u8]> + Clone) -> Bytes {
    let revision_len = if revision != 0 {
        prost::encoding::int64::encoded_len(REVISION_FIELD, &revision)
    } else {
        0
    };
    let body_len = revision_len
        + events
            .clone()
            .into_iter()
            .map(|event| {
                prost::encoding::key_len(EVENTS_FIELD)
                    + prost::encoding::encoded_len_varint(event.len() as u64)
                    + event.len()
            })
            .sum::<usize>();
    let mut buf = bytes::BytesMut::with_capacity(GRPC_PREFIX + body_len);
    put_grpc_prefix(body_len, &mut buf);
    if revision != 0 {
        prost::encoding::int64::encode(REVISION_FIELD, &revision, &mut buf);
    }
    for event in events {
        put_event(event, &mut buf);
    }
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use approvals_domain::{EventKind, Principal, State, Timestamp};

    use super::*;

    pub(super) fn live(revision: i64, detail: &str) -> Arc<LiveEvent> {
        Arc::new(LiveEvent::new(
            Event {
                revision,
                change_request_id: format!("cr-{revision}"),
                project: "web".into(),
                environment: "prod".into(),
                kind: EventKind::Commented,
                actor: Principal::parse("user:alice").expect("principal"),
                acting_principal: None,
                auth_method: Default::default(),
                from_state: State::InReview,
                to_state: State::InReview,
                time: Timestamp::from_micros(1_700_000_000_000_000),
                detail: detail.into(),
                change_request: None,
            },
            tokio::time::Instant::now(),
        ))
    }

    #[test]
    pub(super) fn a_live_frame_is_byte_for_byte_the_message_it_stands_for() {
        for events in [
            vec![live(7, "hi")],
            vec![live(8, ""), live(300, "long")],
            vec![live(1, "a"), live(2, "b"), live(3, "c")],
        ] {
            let mut frame = LiveFrame::default();
            for event in &events {
                frame.push(event);
            }
            let frame = frame.finish().expect("a frame of events");
            let message = pb::WatchChangeRequestsResponse {
                revision: events.last().map_or(0, |e| e.event.revision),
                events: events.iter().map(|e| convert::event(&e.event)).collect(),
                ..Default::default()
            };
            let body = message.encode_to_vec();
            let mut expected = vec![0];
            expected.extend_from_slice(&u32::try_from(body.len()).expect("small").to_be_bytes());
            expected.extend_from_slice(&body);
            assert_eq!(frame.grpc_message().as_ref(), expected.as_slice());
            if let [only] = events.as_slice() {
                assert_eq!(
                    frame.grpc_message().as_ptr(),
                    only.framed.as_ptr(),
                    "one event goes out as the bytes the ring holds"
                );
            }
            assert_eq!(frame.into_message(), message);
        }
        assert!(LiveFrame::default().finish().is_none());
    }

    #[test]
    pub(super) fn any_frame_is_its_message_prefixed() {
        let frame = WatchFrame::Message(pb::WatchChangeRequestsResponse {
            revision: 12,
            progress: true,
            ..Default::default()
        });
        let bytes = frame.grpc_message();
        assert_eq!(bytes[0], 0, "uncompressed");
        assert_eq!(
            u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize,
            bytes.len() - 5
        );
        assert_eq!(
            pb::WatchChangeRequestsResponse::decode(&bytes[5..]).expect("decodes"),
            frame.into_message()
        );
    }
}
