//! The ext_proc gRPC service, routed by hand so each stream's codec buffers can be small.
//!
//! envoy-types' generated server gives every stream tonic's default codec buffers: 8 KiB to
//! decode Envoy's messages and 8 KiB to encode our replies, held for the stream's whole life —
//! most of the memory an open stream costs (BENCHMARKS.md). Nearly every ext_proc message is a
//! few hundred bytes; body chunks that are larger grow the buffer as needed.

use std::convert::Infallible;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use tonic::codec::{BufferSettings, Codec};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic_prost::ProstCodec;

use super::{ExtProcService, Replies};

/// Initial size of each stream's encode and decode buffer.
const BUFFER_BYTES: usize = 512;
/// Encoded replies are flushed to the transport at this size (tonic's default).
const YIELD_BYTES: usize = 32 * 1024;
/// Largest message accepted from Envoy (buffered request bodies up to `max_body_bytes`).
const MAX_DECODING: usize = 16 << 20;

#[derive(Debug, Clone, Copy, Default)]
struct SmallCodec;

type Prost = ProstCodec<ProcessingResponse, ProcessingRequest>;

impl Codec for SmallCodec {
    type Encode = ProcessingResponse;
    type Decode = ProcessingRequest;
    type Encoder = <Prost as Codec>::Encoder;
    type Decoder = <Prost as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        Prost::raw_encoder(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
    }

    fn decoder(&mut self) -> Self::Decoder {
        Prost::raw_decoder(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
    }
}

/// `envoy.service.ext_proc.v3.ExternalProcessor` served by [`ExtProcService`].
#[derive(Clone)]
pub struct ExtProcServer(pub ExtProcService);

impl tonic::server::NamedService for ExtProcServer {
    const NAME: &'static str = "envoy.service.ext_proc.v3.ExternalProcessor";
}

struct Process(ExtProcService);

impl tonic::server::StreamingService<ProcessingRequest> for Process {
    type Response = ProcessingResponse;
    type ResponseStream = Replies;
    type Future = BoxFuture<tonic::Response<Replies>, tonic::Status>;

    fn call(
        &mut self,
        request: tonic::Request<tonic::Streaming<ProcessingRequest>>,
    ) -> Self::Future {
        let svc = self.0.clone();
        Box::pin(async move { svc.process(request).await })
    }
}

impl<B> Service<http::Request<B>> for ExtProcServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let svc = self.0.clone();
        if req.uri().path() != "/envoy.service.ext_proc.v3.ExternalProcessor/Process" {
            return Box::pin(async { Ok(tonic::Status::unimplemented("").into_http()) });
        }
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(SmallCodec)
                .apply_max_message_size_config(Some(MAX_DECODING), None);
            Ok(grpc.streaming(Process(svc), req).await)
        })
    }
}
