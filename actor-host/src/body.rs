//! Reading request bodies under the size limit (Dapr's `--max-body-size`, 4 MiB by default).

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use bytes::Bytes;

use crate::error::ApiError;

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "ERR_BODY_READ",
        format!("request body is larger than the {limit}-byte limit; raise it with --max-body-size"),
    )
}

/// Reads the whole body, refusing more than `limit` bytes before buffering them.
pub async fn read(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(b) => Ok(b),
        Err(e) => {
            let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = src {
                if s.is::<http_body_util::LengthLimitError>() {
                    return Err(too_large(limit));
                }
                src = s.source();
            }
            Err(ApiError::bad_request("ERR_BODY_READ", format!("failed to read the request body: {e}")))
        }
    }
}

/// Parses a JSON body with Dapr's error for bodies that do not parse.
pub fn json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::malformed(format!("failed deserializing HTTP body: {e}")))
}
