//! Request bodies: read within the body read timeout (`--body-read-timeout`, 408 past it) and
//! the body limit (413), then parsed as JSON on the [`CpuPool`](crate::cpu::CpuPool), so that
//! a 30 MB body costs the async workers nothing.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::AppState;
use crate::openai::error::ApiError;

/// A JSON request body of type `T`.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned + Send + 'static> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::bad_request(
                "Expected request with `Content-Type: application/json`",
            ));
        }
        let limit = state.limits.body_read;
        let bytes = tokio::time::timeout(limit, Bytes::from_request(req, state))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {} s (--body-read-timeout)",
                        limit.as_secs_f64()
                    ),
                )
            })?
            .map_err(|r| match r.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body is larger than the server's limit",
                ),
                _ => ApiError::bad_request(r.body_text()),
            })?;
        let parsed = state
            .cpu
            .run(move || axum::Json::<T>::from_bytes(&bytes))
            .await??;
        Ok(ApiJson(parsed.0))
    }
}

/// `application/json`, or any `application/...+json`, with parameters or not (as axum's Json).
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = value.split(';').next().unwrap_or("").trim();
    let Some((kind, sub)) = mime.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (sub.eq_ignore_ascii_case("json") || sub.to_ascii_lowercase().ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_as_axum() {
        let check = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, v.parse().unwrap());
            json_content_type(&h)
        };
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON;charset=utf-8",
            "application/cloudevents+json",
        ] {
            assert!(check(ok), "{ok}");
        }
        for no in [
            "text/json",
            "application/jsonp",
            "application",
            "text/plain",
        ] {
            assert!(!check(no), "{no}");
        }
        assert!(!json_content_type(&HeaderMap::new()));
    }
}
