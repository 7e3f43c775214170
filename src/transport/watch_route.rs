//! WatchChangeRequests on the wire. The server routes this one method itself and writes its
//! response body directly: each [`WatchFrame`] becomes one gRPC message, and a frame of one
//! live event is sent as the bytes the hub encoded once for every watcher (a shared buffer, not
//! a copy). Through tonic's generated code each of 10,000 watchers copied the event into its
//! own encode buffer and its stream was polled twice per delivery. Same path, same messages,
//! same status trailers; every other method goes to the generated server.
//!
//! Tried instead (issue 21): the generated server serving the method, with `WatchFrame` as its
//! response type (a prost `Message` writing the pre-encoded events, named through a wrapper of
//! tonic-prost-build's service generator in build.rs) and a codec whose encoder sends each
//! message at once from a 512-byte buffer (tonic's default: 8 KiB per stream, and a second poll
//! of the stream before each send). About 100 fewer lines, and slower: on the watch benchmark
//! (PostgreSQL, 10,000 watchers, 40 events, runs alternated with this route's, same bench
//! binary) its server used 1.20x the CPU (median of 15 runs; 1.13-1.66), p50 1.11x, p99
//! 1.16x; without the codec (plain prost encoding) 1.34x the CPU, p50 and p99 1.25x. In the
//! quietest round, three runs each: server CPU 2.61 s against 2.18 s here, p50 29.5 against
//! 26.6 ms, p99 55.4 against 53.3 ms. The cost is tonic's encode body itself, which copies
//! every event into each stream's buffer and splits a shared `BytesMut` per message: perf over
//! one run each counted 4,250 samples against 3,670 here, the difference all in memmove,
//! `EncodeBody`, `BytesMut` reserve and drop, and the frame's drop (880 samples there, 290
//! here). So this route stays, and the generated `watch_change_requests`, which the trait
//! requires, is never reached.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use futures::Stream as _;
use http_body::Frame;
use tonic::{Status, metadata::MetadataMap};

use crate::{
    api::change_requests::ChangeRequestsService, pb, telemetry::StatusRecorder, watch::WatchStream,
};

const WATCH_PATH: &str = "/approvals.v1.ChangeRequests/WatchChangeRequests";

/// WatchChangeRequests as described in the module docs. It is the innermost step of the
/// stack (`stack.rs`), behind telemetry, authentication and the limits like every method, and
/// in front of the services' router: through the router a watch body was boxed twice more (as
/// axum's body, then as tonic's again), and each box is one more pointer to follow, in memory
/// of its own, for every message of every stream. Every other path goes on to the router.
#[derive(Clone)]
pub(crate) struct WatchRoute {
    watch: ChangeRequestsService,
    max_message_bytes: usize,
}

impl WatchRoute {
    pub(crate) fn new(service: ChangeRequestsService, max_message_bytes: usize) -> Self {
        Self {
            watch: service,
            max_message_bytes,
        }
    }

    /// Whether this route serves `request` (else the router does).
    pub(crate) fn serves<B>(request: &http::Request<B>) -> bool {
        request.uri().path() == WATCH_PATH
    }

    pub(crate) async fn serve(
        self,
        request: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        match watch(self.watch, request, self.max_message_bytes).await {
            Ok(response) => response,
            Err(status) => status.into_http(),
        }
    }
}

/// Decodes the request as tonic would (one uncompressed message within the size limit), opens
/// the watch, and answers with its frames.
async fn watch(
    service: ChangeRequestsService,
    request: http::Request<tonic::body::Body>,
    max_message_bytes: usize,
) -> Result<http::Response<tonic::body::Body>, Status> {
    let (parts, body) = request.into_parts();
    // The decoder (and its 8 KiB buffer) goes before the watch opens: held while thousands of
    // watches wait for the committed head, it raised the peak heap at 10,000 watchers from
    // 65 to 102 MB, and the RSS per idle watcher from ~6 to ~9 KiB.
    let message = {
        let mut messages = std::pin::pin!(tonic::codec::Streaming::new_request(
            tonic_prost::ProstDecoder::<pb::WatchChangeRequestsRequest>::default(),
            body,
            None,
            Some(max_message_bytes),
        ));
        messages
            .message()
            .await?
            .ok_or_else(|| Status::internal("Missing request message."))?
    };
    let request = tonic::Request::from_parts(
        MetadataMap::from_headers(parts.headers),
        parts.extensions,
        message,
    );
    let (metadata, stream, extensions) = service.open_watch(request).await?.into_parts();
    let recorder = StatusRecorder::default();
    let mut response = http::Response::new(tonic::body::Body::new(WatchBody {
        stream,
        done: false,
        recorder: recorder.clone(),
    }));
    *response.headers_mut() = metadata.into_headers();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    *response.extensions_mut() = extensions;
    response.extensions_mut().insert(recorder);
    Ok(response)
}

/// A watch stream as a gRPC response body: one message per frame, then the status trailers,
/// whose code it records for the call's telemetry itself (see [`StatusRecorder`]).
struct WatchBody {
    stream: WatchStream,
    done: bool,
    recorder: StatusRecorder,
}

impl Drop for WatchBody {
    fn drop(&mut self) {
        self.recorder.dropped();
    }
}

impl http_body::Body for WatchBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let status = match ready!(Pin::new(&mut self.stream).poll_next(cx)) {
            Some(Ok(frame)) => return Poll::Ready(Some(Ok(Frame::data(frame.grpc_message())))),
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.done = true;
        self.recorder.record(status.code());
        Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// The trailers that end a call with `status`.
fn trailers(status: &Status) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::with_capacity(3);
    if let Err(unencodable) = status.add_header(&mut trailers) {
        trailers.clear();
        let _ = Status::internal(format!(
            "the watch ended with a status that cannot be sent: {unencodable}"
        ))
        .add_header(&mut trailers);
    }
    trailers
}
