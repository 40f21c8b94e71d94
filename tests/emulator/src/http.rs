//! The HTTP side: AWS JSON 1.0 on a loopback port, so the unmodified AWS SDK clients talk to the model.
//!
//! Every request is `POST /` with `X-Amz-Target` naming the operation; the signature is ignored. A
//! request is counted and takes its queued fault (an error answer, a delay before the normal answer, or
//! a stale `DescribeTable` answer) before the model sees it. The model lock is never held across an `.await`, so a delayed call does
//! not hold up the others. Errors are `{"__type": "com.amazonaws.dynamodb.v20120810#<Code>", "message"}`
//! with the bare code in `x-amzn-ErrorType`, which is where the SDK reads the code from.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::faults::{Fault, Op};
use super::model::Model;
use super::ops::{self, ApiError};

/// The content type of the AWS JSON 1.0 protocol, for requests and answers alike.
const JSON_1_0: &str = "application/x-amz-json-1.0";

/// The namespace DynamoDB puts before the code in an error's `__type`.
const ERROR_NAMESPACE: &str = "com.amazonaws.dynamodb.v20120810#";

#[derive(Clone)]
struct Endpoint {
    model: Arc<Mutex<Model>>,
    stop: CancellationToken,
    requests: Arc<AtomicU64>,
}

/// Locks the model; a test that panicked while holding the lock does not make later calls fail.
pub(crate) fn lock(model: &Mutex<Model>) -> MutexGuard<'_, Model> {
    model.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves the endpoint on `listener` until `stop` is cancelled.
pub(crate) async fn serve(listener: TcpListener, model: Arc<Mutex<Model>>, stop: CancellationToken) {
    let endpoint = Endpoint { model, stop: stop.clone(), requests: Arc::default() };
    let app = Router::new().route("/", post(handle)).with_state(endpoint);
    if let Err(err) = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await {
        eprintln!("fault-injecting streams endpoint stopped: {err}");
    }
}

async fn handle(State(endpoint): State<Endpoint>, headers: HeaderMap, body: Bytes) -> Response {
    let request_id = endpoint.requests.fetch_add(1, Ordering::Relaxed);
    let result = answer(&endpoint, &headers, &body).await;
    respond(request_id, result)
}

async fn answer(endpoint: &Endpoint, headers: &HeaderMap, body: &[u8]) -> Result<String, ApiError> {
    let target = headers.get("x-amz-target").and_then(|value| value.to_str().ok()).unwrap_or_default();
    let op = Op::from_target(target).ok_or_else(|| {
        ApiError::new(400, "UnknownOperationException", format!("Unknown operation: X-Amz-Target {target:?}"))
    })?;
    let fault = lock(&endpoint.model).faults.on_call(op);
    match fault {
        None => {}
        Some(Fault::Error { status, code, message }) => return Err(ApiError::new(status, code, message)),
        Some(Fault::StaleTable { stream_arn }) => {
            return ops::stale_describe_table(&lock(&endpoint.model), body, &stream_arn);
        }
        Some(Fault::Delay(duration)) => {
            tokio::select! {
                () = tokio::time::sleep(duration) => {}
                () = endpoint.stop.cancelled() => {
                    return Err(ApiError::new(503, "ServiceUnavailable", "the endpoint is shutting down"));
                }
            }
        }
    }
    ops::dispatch(&lock(&endpoint.model), op, body)
}

fn respond(request_id: u64, result: Result<String, ApiError>) -> Response {
    let (status, body, error_code) = match result {
        Ok(output) => (StatusCode::OK, output, None),
        Err(err) => {
            let status = StatusCode::from_u16(err.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = json!({ "__type": format!("{ERROR_NAMESPACE}{}", err.code), "message": err.message });
            (status, body.to_string(), Some(err.code))
        }
    };
    let mut response = (status, [(CONTENT_TYPE, HeaderValue::from_static(JSON_1_0))], body).into_response();
    let headers = response.headers_mut();
    if let Ok(id) = HeaderValue::from_str(&format!("FAULTYSTREAMS{request_id:020}")) {
        headers.insert(HeaderName::from_static("x-amzn-requestid"), id);
    }
    if let Some(Ok(code)) = error_code.map(HeaderValue::from_str) {
        headers.insert(HeaderName::from_static("x-amzn-errortype"), code);
    }
    response
}
