//! The one mapping from the crate's [`Error`] to an HTTP status and OpenAI's error body
//! `{"error":{"message","type","param","code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::Error;

/// Seconds a client is told to wait when the queue is full or every model is busy.
pub const RETRY_AFTER_S: u64 = 1;

/// An error response.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status of the response.
    pub status: StatusCode,
    /// The body's `error.message`, for people.
    pub message: String,
    /// The body's `error.type`, e.g. `"invalid_request_error"`.
    pub kind: &'static str,
    /// The body's `error.param`: the request field at fault, if any.
    pub param: Option<String>,
    /// The body's `error.code`, e.g. `"model_not_found"`, if any.
    pub code: Option<&'static str>,
    /// `Retry-After` seconds (429/503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: Option<&'static str>, message: String) -> Self {
        Self { status, message, kind, param: None, code, retry_after: None }
    }

    /// 400 `invalid_request_error` about `param`.
    pub fn invalid(param: Option<String>, message: String) -> Self {
        Self { param, ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", None, message) }
    }

    /// 401.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            Some("invalid_api_key"),
            "missing or wrong API key: send `Authorization: Bearer <key>`".into(),
        )
    }

    /// 404 for a path that is not an endpoint.
    pub fn no_route(path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found"), format!("no endpoint {path}"))
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Some("request_too_large"),
            format!("the request body is over the limit of {limit} bytes"),
        )
    }

    /// 503 while the first model loads or while shutting down.
    pub fn unavailable(message: String) -> Self {
        Self { retry_after: Some(RETRY_AFTER_S), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable_error", Some("unavailable"), message) }
    }

    /// The same error about `param`, whatever the crate error named.
    pub fn about(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    /// A failure of the generation itself (5xx) says which model failed: `model `id`: …`.
    pub fn in_model(mut self, model: &str) -> Self {
        if self.status.is_server_error() {
            self.message = format!("model `{model}`: {}", self.message);
        }
        self
    }

    /// The OpenAI error body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::InvalidParameter { name, .. } => Self::invalid(Some(name.to_string()), message),
            Error::ContextOverflow { prompt_tokens, context } => Self {
                code: Some("context_length_exceeded"),
                ..Self::invalid(
                    None,
                    format!(
                        "This model's maximum context length is {context} tokens. However, your prompt has {prompt_tokens} tokens \
                         (n_prompt_tokens = {prompt_tokens}, n_ctx = {context}). Shorten the prompt; it is never truncated."
                    ),
                )
            },
            Error::ChatTemplate { .. } => Self::invalid(Some("messages".into()), message),
            Error::ModelNotFound { .. } => {
                Self { param: Some("model".into()), ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", Some("model_not_found"), message) }
            }
            Error::QueueFull { .. } => Self {
                retry_after: Some(RETRY_AFTER_S),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("queue_full"), message)
            },
            Error::ModelsBusy { .. } => Self {
                retry_after: Some(RETRY_AFTER_S),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable_error", Some("models_busy"), message)
            },
            Error::EngineStopped => Self::unavailable("the server is shutting down".into()),
            // The model produced NaN/Inf (damaged weights): this request fails, the others go on.
            Error::NonFinite { .. } => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", Some("non_finite_output"), message),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}
