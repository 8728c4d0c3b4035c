//! Reading request bodies under the size limit (Dapr's `--max-body-size`, 4 MiB by default).

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::error::ApiError;

/// How much of an oversized body is read and thrown away so that the client, still sending,
/// gets to read our 413 instead of a reset connection. Past this the connection is dropped.
const DRAIN_CAP: usize = 64 << 20;

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "ERR_BODY_READ",
        format!(
            "request body is larger than the {limit}-byte limit; raise it with --max-body-size"
        ),
    )
}

/// Reads the whole body, buffering at most `limit` bytes.
pub async fn read(headers: &HeaderMap, mut body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > DRAIN_CAP as u64) {
        return Err(too_large(limit));
    }
    let mut buf = BytesMut::with_capacity(declared.map_or(0, |n| n.min(limit as u64) as usize));
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::bad_request(
                "ERR_BODY_READ",
                format!("failed to read the request body: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen > limit {
            if seen > DRAIN_CAP {
                return Err(too_large(limit));
            }
            continue;
        }
        buf.extend_from_slice(&data);
    }
    if seen > limit {
        return Err(too_large(limit));
    }
    Ok(buf.freeze())
}

/// Parses a JSON body with Dapr's error for bodies that do not parse.
pub fn json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::malformed(format!("failed deserializing HTTP body: {e}")))
}
