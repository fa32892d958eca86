//! One table from errors to HTTP statuses and OpenAI error objects, the same shape whether the
//! response streams or not: `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    /// The error's `code` where the status alone does not say it.
    pub code: Option<&'static str>,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorObject {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn param(mut self, p: &str) -> Self {
        self.param = Some(p.to_string());
        self
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
    /// 404 for a response id the store does not hold (never stored, deleted, evicted or
    /// expired); `param` names the field that gave the id.
    pub fn response_not_found(id: &str, param: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            format!("Response with id '{id}' not found."),
        )
        .param(param);
        e.code = Some("response_not_found");
        e
    }

    pub fn body(&self) -> ErrorBody {
        let (kind, code) = match self.status {
            StatusCode::BAD_REQUEST => ("invalid_request_error", "invalid_request"),
            StatusCode::UNAUTHORIZED => ("authentication_error", "invalid_api_key"),
            StatusCode::NOT_FOUND => ("not_found_error", "model_not_found"),
            StatusCode::PAYLOAD_TOO_LARGE => ("invalid_request_error", "request_too_large"),
            StatusCode::REQUEST_TIMEOUT => ("invalid_request_error", "request_timeout"),
            StatusCode::SERVICE_UNAVAILABLE => ("service_unavailable_error", "service_unavailable"),
            _ => ("internal_error", "internal_error"),
        };
        ErrorBody {
            error: ErrorObject {
                message: self.message.clone(),
                kind: kind.into(),
                param: self.param.clone(),
                code: Some(self.code.unwrap_or(code).into()),
            },
        }
    }
}

/// Seconds a client is told to wait before retrying a 503 (the engine's queue is full, or it is
/// not ready yet).
pub const RETRY_AFTER_SECS: u32 = 1;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, RETRY_AFTER_SECS.into());
        }
        response
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> Self {
        use axum::extract::rejection::JsonRejection::*;
        match r {
            BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body is larger than the server's limit",
            ),
            // 400, not axum's 422, as OpenAI and vLLM answer.
            other => ApiError::bad_request(other.body_text()),
        }
    }
}
