//! Middleware: request ids, logs and request metrics for every route; API
//! and admin keys for `/v1/*`.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;
use tracing::Instrument;

use crate::error::{ApiError, Dialect};
use crate::metrics;
use crate::state::AppState;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Gives the request an id (in its extensions and the `X-Request-ID`
/// response header), runs it inside a span, and counts it by route and status.
pub async fn observe(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let id = state.next_request_id();
    req.extensions_mut().insert(id);
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str).to_string();
    let method = req.method().clone();
    let span = tracing::info_span!("request", id = %id, method = %method, route = %route);
    let started = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = resp.status().as_u16();
    metrics::record_request(&route, method.as_str(), status, elapsed);
    span.in_scope(|| tracing::info!(status, ms = elapsed.as_secs_f64() * 1e3, "response headers sent"));
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

/// The key a request presents: `Authorization: Bearer KEY`, else `x-api-key`.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, key) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
    });
    bearer.or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
}

/// Constant-time comparison (only the length can leak).
fn key_matches(presented: Option<&str>, expected: &str) -> bool {
    presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(expected.as_bytes())))
}

/// Agent mutations (DELETE, pin, unpin) need the admin key when one is set.
fn is_admin_route(req: &Request) -> bool {
    req.uri().path().starts_with("/v1/agents") && req.method() != Method::GET
}

/// With `--api-key`, `/v1/*` needs it (or the admin key); with
/// `--admin-key`, agent mutations need the admin key. Errors are rendered in
/// the dialect of the path.
pub async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let cfg = state.config();
    let dialect = Dialect::of_path(req.uri().path());
    let key = presented_key(req.headers());
    let is_admin = cfg.admin_key.as_deref().is_some_and(|a| key_matches(key, a));
    let is_user = cfg.api_key.as_deref().is_some_and(|k| key_matches(key, k));
    if is_admin_route(&req) && cfg.admin_key.is_some() && !is_admin {
        let e = if is_user {
            ApiError::Forbidden("this operation needs the admin key".into())
        } else {
            ApiError::Unauthorized(
                "this operation needs the admin key (`Authorization: Bearer KEY` or `x-api-key`)".into(),
            )
        };
        return dialect.render(e);
    }
    if cfg.api_key.is_some() && !is_user && !is_admin {
        let msg = if key.is_none() {
            "missing API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`"
        } else {
            "invalid API key"
        };
        return dialect.render(ApiError::Unauthorized(msg.into()));
    }
    next.run(req).await
}

/// Cuts the request body off at the configured deadline
/// (`ServerConfig::body_deadline`): the handler then sees a failed body read
/// and answers 400 in its dialect. A 4 MiB body over loopback takes
/// milliseconds.
pub async fn body_deadline(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.config().body_deadline;
    let (parts, body) = req.into_parts();
    let deadline = tokio::time::Instant::now() + limit;
    let stream = futures_util::stream::unfold(Some(body.into_data_stream()), move |s| async move {
        let mut s = s?;
        match tokio::time::timeout_at(deadline, futures_util::StreamExt::next(&mut s)).await {
            Ok(Some(chunk)) => Some((chunk, Some(s))),
            Ok(None) => None,
            Err(_) => Some((Err(axum::Error::new(format!("the body did not arrive within {limit:?}"))), None)),
        }
    });
    next.run(Request::from_parts(parts, axum::body::Body::from_stream(stream))).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_bearer_or_x_api_key() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert("x-api-key", HeaderValue::from_static("k2"));
        assert_eq!(presented_key(&h), Some("k2"));
        h.insert("authorization", HeaderValue::from_static("bearer k1"));
        assert_eq!(presented_key(&h), Some("k1"));
        assert!(key_matches(Some("k1"), "k1"));
        assert!(!key_matches(Some("k1"), "k10"));
        assert!(!key_matches(None, "k1"));
    }
}
