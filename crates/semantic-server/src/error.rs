//! One error type for every route, rendered once per dialect.
//!
//! Handlers return `Result<_, OpenAiError>` or `Result<_, AnthropicError>`;
//! both wrap [`ApiError`], so `?` works on anything that converts into it.
//! Bad input is always a 4xx that names the offending field (`param`);
//! a 5xx means the engine failed or is not there.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use semantic_core::{AgentIdError, SamplingError};
use semantic_engine::EngineError;
use serde_json::json;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or out of range; `param` names the field.
    #[error("{message}")]
    InvalidRequest { param: Option<String>, message: String },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The resource is busy (an agent with a running request).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    NotImplemented(String),
    /// Too many requests queued; the client should retry after `retry_after` s.
    #[error("{message}")]
    Overloaded { message: String, retry_after: u64 },
    /// The model is still loading or the server is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// The engine failed while generating.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest { param: Some(param.into()), message: message.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Overloaded { .. } | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn param(&self) -> Option<&str> {
        match self {
            ApiError::InvalidRequest { param, .. } => param.as_deref(),
            _ => None,
        }
    }

    /// The body of an OpenAI error: `{"error":{"message","type","param","code"}}`.
    pub fn openai_body(&self) -> serde_json::Value {
        let (kind, code) = match self {
            ApiError::InvalidRequest { .. } => ("invalid_request_error", None),
            ApiError::Unauthorized(_) => ("invalid_request_error", Some("invalid_api_key")),
            ApiError::Forbidden(_) => ("permission_error", Some("admin_key_required")),
            ApiError::NotFound(_) => ("invalid_request_error", Some("not_found")),
            ApiError::Conflict(_) => ("invalid_request_error", Some("conflict")),
            ApiError::PayloadTooLarge(_) => ("invalid_request_error", Some("request_too_large")),
            ApiError::NotImplemented(_) => ("invalid_request_error", Some("not_implemented")),
            ApiError::Overloaded { .. } => ("server_error", Some("overloaded")),
            ApiError::Unavailable(_) => ("server_error", Some("unavailable")),
            ApiError::Internal(_) => ("server_error", None),
        };
        json!({"error": {
            "message": self.to_string(),
            "type": kind,
            "param": self.param(),
            "code": code,
        }})
    }

    /// The body of an Anthropic error: `{"type":"error","error":{"type","message"}}`.
    pub fn anthropic_body(&self) -> serde_json::Value {
        let kind = match self {
            ApiError::InvalidRequest { .. } | ApiError::NotImplemented(_) | ApiError::Conflict(_) => {
                "invalid_request_error"
            }
            ApiError::Unauthorized(_) => "authentication_error",
            ApiError::Forbidden(_) => "permission_error",
            ApiError::NotFound(_) => "not_found_error",
            ApiError::PayloadTooLarge(_) => "request_too_large",
            ApiError::Overloaded { .. } | ApiError::Unavailable(_) => "overloaded_error",
            ApiError::Internal(_) => "api_error",
        };
        json!({"type": "error", "error": {"type": kind, "message": self.to_string()}})
    }

    fn into_response_with(self, body: serde_json::Value) -> Response {
        let mut resp = (self.status(), Json(body)).into_response();
        if let ApiError::Overloaded { retry_after, .. } = self {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        }
        resp
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match e {
            EngineError::Overloaded { .. } => ApiError::Overloaded { message, retry_after: 1 },
            EngineError::PromptTooLong { .. } | EngineError::EmptyPrompt => ApiError::invalid("messages", message),
            EngineError::PoolTooSmall { .. } => ApiError::invalid("max_tokens", message),
            EngineError::Stopped => ApiError::Unavailable(message),
            EngineError::AgentBusy(_) => ApiError::Conflict(message),
            EngineError::Storage(_) | EngineError::Setup(_) => ApiError::Internal(message),
        }
    }
}

impl From<SamplingError> for ApiError {
    fn from(e: SamplingError) -> Self {
        let param = match e {
            SamplingError::Temperature(_) => "temperature",
            SamplingError::TopP(_) => "top_p",
            SamplingError::MinP(_) => "min_p",
            SamplingError::RepetitionPenalty(_) => "repetition_penalty",
            SamplingError::PresencePenalty(_) => "presence_penalty",
            SamplingError::FrequencyPenalty(_) => "frequency_penalty",
            SamplingError::LogitBias(_) => "logit_bias",
            SamplingError::MaxTokens(_) => "max_tokens",
            SamplingError::Stop => "stop",
        };
        ApiError::invalid(param, e.to_string())
    }
}

/// An invalid agent id, naming where it came from (a header or `session_id`).
pub fn bad_agent_id(source: &str, e: AgentIdError) -> ApiError {
    ApiError::invalid(source, format!("invalid agent id in `{source}`: {e}"))
}

/// [`ApiError`] in the OpenAI format.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

/// [`ApiError`] in the Anthropic format.
#[derive(Debug)]
pub struct AnthropicError(pub ApiError);

impl<E: Into<ApiError>> From<E> for OpenAiError {
    fn from(e: E) -> Self {
        OpenAiError(e.into())
    }
}

impl<E: Into<ApiError>> From<E> for AnthropicError {
    fn from(e: E) -> Self {
        AnthropicError(e.into())
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = self.0.openai_body();
        self.0.into_response_with(body)
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let body = self.0.anthropic_body();
        self.0.into_response_with(body)
    }
}

/// Which dialect's error format a path uses (for middleware and fallbacks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
}

impl Dialect {
    pub fn of_path(path: &str) -> Dialect {
        if path.starts_with("/v1/messages") {
            Dialect::Anthropic
        } else {
            Dialect::OpenAi
        }
    }

    pub fn render(self, e: ApiError) -> Response {
        match self {
            Dialect::OpenAi => OpenAiError(e).into_response(),
            Dialect::Anthropic => AnthropicError(e).into_response(),
        }
    }
}
