//! Logs, traces and metrics. Logs go through `tracing` (text or JSON). When
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans and metrics are also exported over OTLP/gRPC,
//! configured by the standard `OTEL_*` variables (`OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_METRIC_EXPORT_INTERVAL`, ...); otherwise nothing is
//! exported and the instruments are no-ops.
//!
//! [`Rpc`] gives every call a span (method, status code, project and change request id where
//! known) continuing the W3C trace context of the incoming metadata, and records the RPC
//! metrics; the transport's stack runs it around every call.

pub mod metrics;

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use opentelemetry::{global, propagation::Extractor, trace::TracerProvider as _};
use opentelemetry_sdk::{
    Resource, metrics::SdkMeterProvider, propagation::TraceContextPropagator,
    trace::SdkTracerProvider,
};
use tower_http::classify::{
    ClassifiedResponse, ClassifyEos, ClassifyResponse, GrpcEosErrorsAsFailures,
    GrpcErrorsAsFailures, GrpcFailureClass,
};
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

pub const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const DEFAULT_FILTER: &str = "info,sqlx=warn,sea_orm=warn,sea_orm_migration=warn,h2=warn";

/// Keeps the exporters alive; flushes them when dropped (at exit).
#[derive(Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(tracer) = self.tracer.take()
            && let Err(err) = tracer.shutdown()
        {
            eprintln!("approvals: flushing spans: {err}");
        }
        if let Some(meter) = self.meter.take()
            && let Err(err) = meter.shutdown()
        {
            eprintln!("approvals: flushing metrics: {err}");
        }
    }
}

/// Installs the log subscriber and, when configured, the OTLP exporters. Call inside the
/// runtime (the exporters' gRPC channels are tokio tasks).
/// What the `[telemetry]` section (and `--log-format`) chose.
#[derive(Debug, Clone, Default)]
pub struct TelemetrySettings {
    pub json: bool,
    /// Used when `OTEL_EXPORTER_OTLP_ENDPOINT` is not set (the environment wins).
    pub otlp_endpoint: Option<String>,
    /// `service.name`, unless `OTEL_SERVICE_NAME` says otherwise.
    pub service_name: String,
}

pub fn init(settings: &TelemetrySettings) -> Telemetry {
    let json = settings.json;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let mut telemetry = Telemetry::default();
    let from_env = std::env::var(ENDPOINT_ENV).is_ok_and(|v| !v.trim().is_empty());
    let from_config = settings
        .otlp_endpoint
        .clone()
        .filter(|e| !e.trim().is_empty() && !from_env);
    let otlp = from_env || from_config.is_some();
    let mut otel_layer = None;
    let mut setup_error = None;
    if otlp {
        match exporters(from_config.as_deref(), &settings.service_name) {
            Ok((tracer, meter)) => {
                global::set_text_map_propagator(TraceContextPropagator::new());
                global::set_meter_provider(meter.clone());
                otel_layer =
                    Some(tracing_opentelemetry::layer().with_tracer(tracer.tracer("approvals")));
                telemetry.tracer = Some(tracer);
                telemetry.meter = Some(meter);
            }
            Err(err) => setup_error = Some(err),
        }
    }
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    if json {
        registry
            .with(tracing_subscriber::fmt::layer().json())
            .init();
    } else {
        registry.with(tracing_subscriber::fmt::layer()).init();
    }
    if let Some(err) = setup_error {
        tracing::error!(error = %err, "OpenTelemetry export is not running");
    } else if otlp {
        tracing::info!("exporting spans and metrics over OTLP");
    }
    telemetry
}

fn exporters(
    endpoint: Option<&str>,
    service_name: &str,
) -> Result<(SdkTracerProvider, SdkMeterProvider), String> {
    use opentelemetry_otlp::WithExportConfig;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service_name.to_owned());
    }
    let resource = resource.build();
    let mut spans = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(endpoint) = endpoint {
        spans = spans.with_endpoint(endpoint);
    }
    let spans = spans.build().map_err(|e| format!("span exporter: {e}"))?;
    let tracer = SdkTracerProvider::builder()
        .with_batch_exporter(spans)
        .with_resource(resource.clone())
        .build();
    let mut metrics = opentelemetry_otlp::MetricExporter::builder().with_tonic();
    if let Some(endpoint) = endpoint {
        metrics = metrics.with_endpoint(endpoint);
    }
    let metrics = metrics
        .build()
        .map_err(|e| format!("metric exporter: {e}"))?;
    let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(metrics).build();
    let meter = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource)
        .build();
    Ok((tracer, meter))
}

/// Reads W3C `traceparent`/`tracestate` from request headers (gRPC metadata).
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// One call's span and its RPC metrics, from the request to its status: the telemetry of the
/// transport's stack. A trailers-only answer (every error) carries `grpc-status` in its
/// headers; a stream's comes in its trailers, after its last message.
///
/// tower-http's classifier reads the status ([`GrpcErrorsAsFailures`], [`ClassifyEos`] for the
/// trailers), but its `TraceLayer` does not fit: its callbacks split the end of a call between
/// `on_response`, `on_eos` and `on_failure` with no one place that has the code and the whole
/// duration for the metrics, and a stream whose client goes away never reaches any of them (here
/// it is recorded as CANCELLED).
pub struct Rpc {
    finish: Finish,
    /// Whether the method streams: then a status not in the headers is awaited in the trailers.
    streaming: bool,
}

impl Rpc {
    /// Opens the call's span (method, and status, project and change request id to come),
    /// continuing the W3C trace context of the request's metadata.
    pub fn start<B>(request: &http::Request<B>, streaming: bool) -> Self {
        let path = request.uri().path().to_owned();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", path.as_str()));
        let span = tracing::info_span!(
            "rpc",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = Empty,
            otel.status_code = Empty,
            project = Empty,
            change_request_id = Empty,
            enduser.id = Empty,
            auth.method = Empty,
        );
        let parent = global::get_text_map_propagator(|propagator| {
            propagator.extract(&Headers(request.headers()))
        });
        let _ = span.set_parent(parent);
        Self {
            finish: Finish {
                span,
                path,
                started: Instant::now(),
            },
            streaming,
        }
    }

    /// The span the call runs in.
    pub fn span(&self) -> &tracing::Span {
        &self.finish.span
    }

    /// Records the call's status: now, or when a stream's trailers arrive.
    pub fn finish<E>(
        self,
        answer: Result<http::Response<tonic::body::Body>, E>,
    ) -> Result<http::Response<tonic::body::Body>, E> {
        let response = match answer {
            Ok(response) => response,
            Err(err) => {
                self.finish.record(tonic::Code::Internal);
                return Err(err);
            }
        };
        // A body that sends its own status records it itself (only a stream that opened has
        // one: a refusal is trailers-only, classified below).
        if self.streaming
            && let Some(recorder) = response.extensions().get::<StatusRecorder>()
        {
            *recorder.lock() = Some(self.finish);
            return Ok(response);
        }
        match GrpcErrorsAsFailures::new().classify_response(&response) {
            ClassifiedResponse::RequiresEos(eos) if self.streaming => {
                let (parts, body) = response.into_parts();
                let body = tonic::body::Body::new(Recorded {
                    body,
                    pending: Some((eos, self.finish)),
                });
                Ok(http::Response::from_parts(parts, body))
            }
            // A successful unary answer carries its status, 0, in the trailers.
            ClassifiedResponse::RequiresEos(_) => {
                self.finish.record(tonic::Code::Ok);
                Ok(response)
            }
            ClassifiedResponse::Ready(class) => {
                self.finish.record(code(class));
                Ok(response)
            }
        }
    }
}

/// The code a classification stands for.
fn code(class: Result<(), GrpcFailureClass>) -> tonic::Code {
    match class {
        Ok(()) => tonic::Code::Ok,
        Err(GrpcFailureClass::Code(code)) => tonic::Code::from_i32(code.get()),
        Err(GrpcFailureClass::Error(_)) => tonic::Code::Internal,
    }
}

/// What is recorded once a call's status is known: the span's status and the RPC metrics.
struct Finish {
    span: tracing::Span,
    path: String,
    started: Instant,
}

impl Finish {
    fn record(self, code: tonic::Code) {
        self.span.record("rpc.grpc.status_code", code as i32);
        if code != tonic::Code::Ok {
            self.span.record("otel.status_code", "ERROR");
        }
        metrics::record_rpc(&self.path, code_name(code), self.started.elapsed());
    }
}

/// Where a streaming response body that knows its own status records it, instead of being
/// wrapped in [`Recorded`]: the watch route's (`transport::watch_route`), where that wrapper was
/// one more allocation and layer to go through for every message of 100,000 streams. The
/// route puts it in the response's extensions and keeps a clone in the body; the telemetry
/// layer hands it the call's record, and the body records the status at its end (CANCELLED
/// when dropped before it).
#[derive(Clone, Default)]
pub struct StatusRecorder(std::sync::Arc<std::sync::Mutex<Option<Finish>>>);

impl StatusRecorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Finish>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The stream ended with `code` (the status its trailers carry).
    pub fn record(&self, code: tonic::Code) {
        if let Some(finish) = self.lock().take() {
            finish.record(code);
        }
    }

    /// The stream was dropped: CANCELLED, unless its status was recorded already.
    pub fn dropped(&self) {
        self.record(tonic::Code::Cancelled);
    }
}

/// A streaming response's body, recording the status its trailers carry (or CANCELLED when the
/// client goes away first). Before, a watch that ended with an error was recorded as OK: its
/// headers carry no status.
struct Recorded {
    body: tonic::body::Body,
    /// Until the status is known.
    pending: Option<(GrpcEosErrorsAsFailures, Finish)>,
}

impl http_body::Body for Recorded {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::task::ready!(Pin::new(&mut self.body).poll_frame(cx));
        let trailers = match &polled {
            Some(Ok(frame)) => frame.trailers_ref().map(Some),
            // The classifier would keep only the error's text: its code is right here.
            Some(Err(status)) => {
                if let Some((_, finish)) = self.pending.take() {
                    finish.record(status.code());
                }
                None
            }
            None => Some(None),
        };
        if let Some(trailers) = trailers
            && let Some((eos, finish)) = self.pending.take()
        {
            finish.record(code(eos.classify_eos(trailers)));
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        if let Some((_, finish)) = self.pending.take() {
            finish.record(tonic::Code::Cancelled);
        }
    }
}

/// The canonical upper-case name of a status code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::{Arc, Mutex},
    };

    use bytes::Bytes;
    use http_body::{Body as _, Frame};
    use tracing_subscriber::{Layer, Registry, layer::SubscriberExt};

    use super::*;

    /// The status codes recorded on spans, in order.
    #[derive(Clone, Default)]
    struct Codes(Arc<Mutex<Vec<i64>>>);

    impl Codes {
        fn seen(&self) -> Vec<i64> {
            self.0.lock().expect("codes").clone()
        }
    }

    impl<S: tracing::Subscriber> Layer<S> for Codes {
        fn on_record(
            &self,
            _: &tracing::span::Id,
            values: &tracing::span::Record<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Visit<'a>(&'a Mutex<Vec<i64>>);
            impl tracing::field::Visit for Visit<'_> {
                fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
                    if field.name() == "rpc.grpc.status_code" {
                        self.0.lock().expect("codes").push(value);
                    }
                }
                fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
            }
            values.record(&mut Visit(&self.0));
        }
    }

    /// A body of the given frames.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = tonic::Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn stream_ending_with(code: tonic::Code) -> http::Response<tonic::body::Body> {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", (code as i32).into());
        http::Response::new(tonic::body::Body::new(Frames(VecDeque::from([
            Frame::data(Bytes::from_static(b"\0\0\0\0\0")),
            Frame::trailers(trailers),
        ]))))
    }

    /// Runs `f` with spans recorded, and returns the codes it recorded.
    fn codes_of(f: impl FnOnce()) -> Vec<i64> {
        let codes = Codes::default();
        tracing::subscriber::with_default(Registry::default().with(codes.clone()), f);
        codes.seen()
    }

    fn call(streaming: bool) -> Rpc {
        let path = if streaming {
            "/approvals.v1.ChangeRequests/WatchChangeRequests"
        } else {
            "/approvals.v1.ChangeRequests/GetChangeRequest"
        };
        let request = http::Request::builder()
            .uri(path)
            .body(())
            .expect("request");
        Rpc::start(&request, streaming)
    }

    #[test]
    fn a_calls_status_comes_from_its_headers_or_its_trailers() {
        // A trailers-only error.
        let codes = codes_of(|| {
            let refused = tonic::Status::not_found("no such request").into_http();
            let _ = call(false).finish::<()>(Ok(refused));
        });
        assert_eq!(codes, [tonic::Code::NotFound as i64]);
        // A unary answer: its 0 is in the trailers, recorded with the headers.
        let codes = codes_of(|| {
            let answer = http::Response::new(tonic::body::Body::empty());
            let _ = call(false).finish::<()>(Ok(answer));
        });
        assert_eq!(codes, [0]);
        // A stream: recorded when its trailers arrive, not before.
        let codes = codes_of(|| {
            let answer = call(true)
                .finish::<()>(Ok(stream_ending_with(tonic::Code::Unavailable)))
                .expect("answer");
            let mut body = answer.into_body();
            let mut frames = 0;
            while let Some(frame) = futures::executor::block_on(std::future::poll_fn(|cx| {
                Pin::new(&mut body).poll_frame(cx)
            })) {
                frame.expect("frame");
                frames += 1;
            }
            assert_eq!(frames, 2);
        });
        assert_eq!(codes, [tonic::Code::Unavailable as i64]);
        // A service error.
        let codes = codes_of(|| {
            let _ = call(false).finish(Err("broken"));
        });
        assert_eq!(codes, [tonic::Code::Internal as i64]);
    }

    #[test]
    fn a_stream_dropped_before_its_trailers_is_cancelled() {
        let codes = codes_of(|| {
            let answer = call(true)
                .finish::<()>(Ok(stream_ending_with(tonic::Code::Ok)))
                .expect("answer");
            drop(answer);
        });
        assert_eq!(codes, [tonic::Code::Cancelled as i64]);
    }
}
