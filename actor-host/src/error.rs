//! Dapr's HTTP error model, in one place: `{"errorCode","message"}` with the status Dapr uses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use components::state::StateError;

/// An API failure as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn malformed(message: impl Into<String>) -> Self {
        Self::bad_request("ERR_MALFORMED_REQUEST", message)
    }

    /// Maps a state-store failure; `code` is the operation's Dapr code (`ERR_STATE_SAVE`, ...)
    /// and `what` its description ("failed saving state in state store statestore").
    pub fn state(code: &'static str, what: &str, e: StateError) -> Self {
        let status = match e {
            StateError::EtagMismatch { .. } => StatusCode::CONFLICT,
            StateError::InvalidEtag { .. } => StatusCode::BAD_REQUEST,
            StateError::Backend(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, code, format!("{what}: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "errorCode": self.code, "message": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}

/// `axum::extract::Path` with path errors (bad percent-encoding, non-UTF-8) answered as
/// Dapr's `ERR_MALFORMED_REQUEST` instead of axum's plain-text rejection.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e| ApiError::malformed(format!("invalid request path: {}", e.body_text())))
    }
}
