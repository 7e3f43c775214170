//! OpenTelemetry: the real binary, with `telemetry.otlp_endpoint` pointing at an in-process
//! OTLP receiver, exports a span per RPC (continuing the caller's W3C trace) and the metrics.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use approvals::pb::{self, change_requests_client::ChangeRequestsClient};
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::any_value::Value,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, transport::Channel};

use crate::common::*;

#[derive(Debug, Clone)]
struct ReceivedSpan {
    name: String,
    trace_id: Vec<u8>,
    attributes: Vec<(String, String)>,
}

#[derive(Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    metrics: Arc<Mutex<BTreeSet<String>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().expect("lock");
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let attributes = span
                        .attributes
                        .iter()
                        .map(|kv| {
                            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                Some(Value::StringValue(s)) => s.clone(),
                                Some(Value::IntValue(i)) => i.to_string(),
                                other => format!("{other:?}"),
                            };
                            (kv.key.clone(), value)
                        })
                        .collect();
                    spans.push(ReceivedSpan {
                        name: span.name,
                        trace_id: span.trace_id,
                        attributes,
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut metrics = self.metrics.lock().expect("lock");
        for resource in request.into_inner().resource_metrics {
            for scope in resource.scope_metrics {
                for metric in scope.metrics {
                    metrics.insert(metric.name);
                }
            }
        }
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_arrive_over_otlp() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector = listener.local_addr().expect("addr");
    let serve = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .add_service(MetricsServiceServer::new(receiver.clone()))
        .serve_with_incoming(TcpListenerStream::new(listener));
    let collector_task = tokio::spawn(serve);

    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}", dir.path().join("approvals.db").display());
    let mut child = Command::new(BINARY)
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", &url])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        // The collector named in the `[telemetry]` section (through its environment key);
        // `OTEL_EXPORTER_OTLP_ENDPOINT`, when set, would win.
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env(
            "APPROVALS_TELEMETRY_OTLP_ENDPOINT",
            format!("http://{collector}"),
        )
        .env("OTEL_METRIC_EXPORT_INTERVAL", "300")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start approvals");
    let stdout = child.stdout.take().expect("stdout");
    let (lines, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let addr = loop {
        let line = output
            .recv_timeout(Duration::from_secs(30))
            .expect("server logs that it is serving");
        if line.contains("serving")
            && let Some(addr) = line.rsplit("address=").next()
        {
            break addr.trim().to_owned();
        }
    };
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = ChangeRequestsClient::new(channel);
    let mut request = tonic::Request::new(new_request());
    let metadata = request.metadata_mut();
    metadata.insert(
        approvals::ACTOR_HEADER,
        "user:alice".parse().expect("ascii"),
    );
    metadata.insert(
        "traceparent",
        format!("00-{TRACE_ID}-00f067aa0ba902b7-01")
            .parse()
            .expect("ascii"),
    );
    let created = client
        .create_change_request(request)
        .await
        .expect("create")
        .into_inner();
    let mut get = tonic::Request::new(pb::GetChangeRequestRequest { id: created.id });
    get.metadata_mut().insert(
        approvals::ACTOR_HEADER,
        "user:alice".parse().expect("ascii"),
    );
    client.get_change_request(get).await.expect("get");
    // A watch open at shutdown ends with UNAVAILABLE in its trailers, after its headers.
    let mut watch = tonic::Request::new(pb::WatchChangeRequestsRequest {
        project: "web".into(),
        ..Default::default()
    });
    watch.metadata_mut().insert(
        approvals::ACTOR_HEADER,
        "user:watcher".parse().expect("ascii"),
    );
    let mut stream = client
        .watch_change_requests(watch)
        .await
        .expect("watch")
        .into_inner();

    // Metrics arrive on their interval, spans in batches; SIGTERM flushes whatever is left.
    let wanted = [
        "approvals.rpc.calls",
        "approvals.rpc.duration",
        "approvals.db.pool.connections",
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let spans_in = receiver
            .spans
            .lock()
            .expect("lock")
            .iter()
            .any(|s| s.name.ends_with("CreateChangeRequest"));
        let metrics_in = {
            let metrics = receiver.metrics.lock().expect("lock");
            wanted.iter().all(|m| metrics.contains(*m))
        };
        if spans_in && metrics_in {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans {:?}, metrics {:?}",
            receiver.spans.lock().expect("lock"),
            receiver.metrics.lock().expect("lock")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("the watch ends at shutdown")
        {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the watch ended without its status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    let _ = child.wait();
    collector_task.abort();

    let spans = receiver.spans.lock().expect("lock").clone();
    let rpc = spans
        .iter()
        .find(|s| s.name == "approvals.v1.ChangeRequests/CreateChangeRequest")
        .unwrap_or_else(|| panic!("no span for CreateChangeRequest in {spans:?}"));
    let expected_trace: Vec<u8> = (0..TRACE_ID.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&TRACE_ID[i..i + 2], 16).expect("hex"))
        .collect();
    assert_eq!(
        rpc.trace_id, expected_trace,
        "the span continues the caller's trace"
    );
    let attribute = |key: &str| {
        rpc.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(attribute("rpc.grpc.status_code").as_deref(), Some("0"));
    assert_eq!(attribute("project").as_deref(), Some("web"));
    assert!(
        spans
            .iter()
            .any(|s| s.name == "create" && s.trace_id == expected_trace),
        "a store span inside the RPC: {spans:?}"
    );
    // The watch's span has the status of its trailers (it was recorded as OK from its headers).
    let watch = spans
        .iter()
        .find(|s| s.name == "approvals.v1.ChangeRequests/WatchChangeRequests")
        .unwrap_or_else(|| panic!("no span for WatchChangeRequests in {spans:?}"));
    let status = watch
        .attributes
        .iter()
        .find(|(k, _)| k == "rpc.grpc.status_code")
        .map(|(_, v)| v.as_str());
    assert_eq!(status, Some("14"), "UNAVAILABLE: {watch:?}");
}
