//! The HTTP server of `semantic`: OpenAI and Anthropic dialects, the agents
//! API, health, metrics and auth, in front of the engine's `EngineHandle`.
//!
//! ```text
//! request -> observe (id, span, metrics) -> [auth on /v1/*] -> handler
//! handler: bytes -> dialect request -> Conversation + SamplingParams (validated)
//!          -> template + tokenize (blocking pool) -> EngineHandle::submit
//!          -> JSON, or SSE whose body owns the TokenStream
//! ```
//!
//! Invariants:
//! - Bad input is a 4xx in the dialect's error format naming the field;
//!   handlers never panic on input.
//! - A response body owns its token stream: a client that goes away drops it,
//!   and the engine cancels the sequence at its next step.
//! - The server answers `/health/live` before the model is loaded; the model
//!   routes and `/health/ready` answer 503 until it is.

mod agents;
mod anthropic;
mod body;
mod conversation;
pub mod error;
mod generation;
pub mod metrics;
mod middleware;
mod openai;
mod ops;
mod sse;
mod state;
mod tools;

use std::future::Future;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::from_fn_with_state;
use axum::response::Response;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;

pub use error::{ApiError, Dialect};
pub use generation::AGENT_HEADERS;
pub use middleware::REQUEST_ID_HEADER;
pub use state::{AppState, Runtime, ServerConfig};

/// Every route, with its middleware.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/agents", get(agents::list))
        .route("/v1/agents/{id}", get(agents::get).delete(agents::delete))
        .route("/v1/agents/{id}/pin", post(agents::pin))
        .route("/v1/agents/{id}/unpin", post(agents::unpin))
        .layer(from_fn_with_state(state.clone(), middleware::auth));
    Router::new()
        .merge(v1)
        .route("/health/live", get(ops::live))
        .route("/health/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config().body_limit))
        .layer(from_fn_with_state(state.clone(), middleware::body_deadline))
        .layer(from_fn_with_state(state.clone(), middleware::observe))
        .with_state(state)
}

async fn not_found(req: Request) -> Response {
    let path = req.uri().path().to_string();
    Dialect::of_path(&path).render(ApiError::NotFound(format!("no route for {path}")))
}

async fn method_not_allowed(req: Request) -> Response {
    let msg = format!("{} is not allowed on {}", req.method(), req.uri().path());
    let mut resp = Dialect::of_path(req.uri().path()).render(ApiError::InvalidRequest { param: None, message: msg });
    *resp.status_mut() = axum::http::StatusCode::METHOD_NOT_ALLOWED;
    resp
}

/// Serves until `shutdown` completes, then stops accepting, lets in-flight
/// requests finish for up to `config.shutdown_grace` (streams still running
/// then are dropped, which cancels them), and stops the engine.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = state.config().shutdown_grace;
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let st = state.clone();
    // Token events are small writes: without TCP_NODELAY, Nagle holds each
    // one until the previous is acknowledged, and a client's delayed ACK
    // added ~35 ms to every first token (warm TTFT at 2K: 46 ms, 10 ms with it).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
    });
    let server = axum::serve(listener, router(state.clone())).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutdown: no new connections; finishing in-flight requests");
        st.begin_shutdown();
        let _ = tx.send(true);
    });
    let deadline = async move {
        if rx.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    let result = tokio::select! {
        r = std::future::IntoFuture::into_future(server) => r,
        () = deadline => {
            tracing::warn!(grace_s = grace.as_secs_f64(), "shutdown: grace period over; cancelling what is left");
            Ok(())
        }
    };
    state.begin_shutdown();
    stop_engine(&state).await;
    result
}

/// Stops the engine thread (after its current step) and waits for it.
pub async fn stop_engine(state: &AppState) {
    if let Some(rt) = state.loaded_runtime() {
        let join = tokio::task::spawn_blocking(move || rt.engine.shutdown());
        if tokio::time::timeout(Duration::from_secs(30), join).await.is_err() {
            tracing::warn!("the engine did not stop within 30 s");
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for SIGINT: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
