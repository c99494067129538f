//! Server-sent events: framing, and a response whose body is a stream.
//!
//! The body owns the generation; when the client goes away hyper drops the
//! body, which drops the engine's token stream and cancels the request.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use futures_util::StreamExt;
use serde::Serialize;

/// `data: {json}\n\n`
pub fn data<T: Serialize>(out: &mut String, value: &T) {
    out.push_str("data: ");
    out.push_str(&to_json(value));
    out.push_str("\n\n");
}

/// `event: {name}\ndata: {json}\n\n`
pub fn event<T: Serialize>(out: &mut String, name: &str, value: &T) {
    out.push_str("event: ");
    out.push_str(name);
    out.push('\n');
    data(out, value);
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Our response types always serialize; a failure would be a bug.
    serde_json::to_string(value).unwrap_or_else(|e| {
        tracing::error!("serializing an event failed: {e}");
        "{}".to_string()
    })
}

/// A `text/event-stream` response over `chunks` (each one or more events).
pub fn response<S>(chunks: S) -> Response
where
    S: Stream<Item = String> + Send + 'static,
{
    let body = Body::from_stream(chunks.map(|s| Ok::<_, Infallible>(Bytes::from(s))));
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}
