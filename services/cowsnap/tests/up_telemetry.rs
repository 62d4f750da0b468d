//! OpenTelemetry for real: `cowsnap up` with `OTEL_EXPORTER_OTLP_ENDPOINT`
//! pointing at a collector run here (the OTLP/gRPC trace service, from the
//! opentelemetry-proto definitions) exports the spans of the calls it
//! serves, joined to the caller's trace through the W3C `traceparent`
//! header, under its service name.

mod up_common;

use std::sync::{Arc, Mutex};

use cowsnap_proto::cowsnap::v1 as pb;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use up_common::*;

/// A span as the collector saw it: service name, span name, trace id.
type Seen = (String, String, Vec<u8>);

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Seen>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut seen = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    seen.push((service.clone(), span.name, span.trace_id));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_otlp_collector_in_the_callers_trace() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let tmp = scratch();
    let endpoint = format!("http://{addr}");
    let mut up = Up::start_with_env(
        &tmp.path().join("data"),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    );
    up.ready().await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut api = up.clients().await;
    let mut req = tonic::Request::new(pb::CreateVolumeRequest {
        volume_id: "traced".into(),
        volume: Some(pb::Volume {
            size_bytes: 4 * MIB,
            ..Default::default()
        }),
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    api.volumes.create_volume(req).await.unwrap();
    // A clean stop flushes the exporter.
    assert_eq!(up.terminate().code(), Some(0), "{}", up.log_text());

    let spans = collector.spans.lock().unwrap().clone();
    let want: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let ours: Vec<&Seen> = spans.iter().filter(|s| s.2 == want).collect();
    assert!(
        ours.iter()
            .any(|s| s.1 == "/cowsnap.v1.VolumeService/CreateVolume" && s.0 == "cowsnap"),
        "no CreateVolume span in the caller's trace; spans: {spans:?}"
    );
    server.abort();
}
