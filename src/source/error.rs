//! Classification of AWS errors, done once at the boundary.
//!
//! The SDK's per-operation error enums are turned into [`ReadError`] by the error code AWS sent (the
//! same codes across operations), the HTTP status, or the transport failure, so the shard reader
//! branches on what to do, not on which call failed.

use aws_sdk_dynamodbstreams::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::http::Response;

use crate::metrics::ReadErrorKind;

/// What went wrong with a DynamoDB or DynamoDB Streams call, by what the caller does about it.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ReadError {
    /// The shard iterator is older than 15 minutes: get a new one from the last position.
    #[error("shard iterator expired")]
    IteratorExpired,
    /// The requested position is beyond the stream's 24 h retention: records were lost.
    #[error("requested records were trimmed from the stream: {0}")]
    Trimmed(String),
    /// Too many requests: back off and retry.
    #[error("throttled: {0}")]
    Throttled(String),
    /// The stream, shard or table does not exist (any more).
    #[error("not found: {0}")]
    NotFound(String),
    /// A server error, time-out or connection failure: back off and retry.
    #[error("transient failure: {0}")]
    Transient(String),
    /// Anything else (bad request, access denied): back off and retry, and log it loudly.
    #[error("{0}")]
    Other(String),
}

impl ReadError {
    /// The bounded `kind` label for metrics.
    pub fn kind(&self) -> ReadErrorKind {
        match self {
            ReadError::IteratorExpired => ReadErrorKind::IteratorExpired,
            ReadError::Trimmed(_) => ReadErrorKind::Trimmed,
            ReadError::Throttled(_) => ReadErrorKind::Throttled,
            ReadError::NotFound(_) => ReadErrorKind::NotFound,
            ReadError::Transient(_) => ReadErrorKind::Transient,
            ReadError::Other(_) => ReadErrorKind::Other,
        }
    }

    /// Classifies any SDK error of DynamoDB or DynamoDB Streams.
    pub fn from_sdk<E>(error: SdkError<E, Response>) -> ReadError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let message = aws_smithy_types::error::display::DisplayErrorContext(&error).to_string();
        match &error {
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
                return ReadError::Transient(message);
            }
            _ => {}
        }
        let status = error.raw_response().map(|response| response.status().as_u16());
        classify(error.code(), status, message)
    }
}

/// Classifies by AWS error code, then by HTTP status.
pub fn classify(code: Option<&str>, status: Option<u16>, message: String) -> ReadError {
    match code {
        Some("ExpiredIteratorException") => ReadError::IteratorExpired,
        Some("TrimmedDataAccessException") => ReadError::Trimmed(message),
        Some(
            "LimitExceededException"
            | "ProvisionedThroughputExceededException"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "TooManyRequestsException",
        ) => ReadError::Throttled(message),
        Some("ResourceNotFoundException") => ReadError::NotFound(message),
        Some("InternalServerError" | "InternalFailure" | "ServiceUnavailable") => ReadError::Transient(message),
        _ => match status {
            Some(429) => ReadError::Throttled(message),
            Some(500..=599) => ReadError::Transient(message),
            _ => ReadError::Other(message),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_decide_before_statuses() {
        let c = |code: Option<&str>, status| classify(code, status, String::new()).kind().as_str();
        assert_eq!(c(Some("ExpiredIteratorException"), Some(400)), "iterator_expired");
        assert_eq!(c(Some("TrimmedDataAccessException"), Some(400)), "trimmed");
        assert_eq!(c(Some("LimitExceededException"), Some(400)), "throttled");
        assert_eq!(c(Some("ProvisionedThroughputExceededException"), Some(400)), "throttled");
        assert_eq!(c(Some("ResourceNotFoundException"), Some(400)), "not_found");
        assert_eq!(c(Some("InternalServerError"), Some(500)), "transient");
        // moto answers some bad requests with an HTML 500 and no code.
        assert_eq!(c(None, Some(500)), "transient");
        assert_eq!(c(None, Some(429)), "throttled");
        assert_eq!(c(Some("AccessDeniedException"), Some(400)), "other");
    }

    /// A `Scan` refused for capacity, as the DynamoDB client reports it, is throttling (retried with
    /// backoff by the segment reader), not a failure to log loudly.
    #[test]
    fn scan_throttling_of_the_dynamodb_client_is_throttled() {
        use aws_sdk_dynamodb::operation::scan::ScanError;
        use aws_smithy_runtime_api::http::StatusCode;
        use aws_smithy_types::body::SdkBody;
        use aws_smithy_types::error::ErrorMetadata;

        let scan_error = |code: &str| {
            let error = ScanError::generic(ErrorMetadata::builder().code(code).message("slow down").build());
            let status = StatusCode::try_from(400).expect("a valid status");
            ReadError::from_sdk(SdkError::service_error(error, Response::new(status, SdkBody::empty())))
        };
        for code in ["ProvisionedThroughputExceededException", "RequestLimitExceeded", "ThrottlingException"] {
            assert!(matches!(scan_error(code), ReadError::Throttled(_)), "{code}: {:?}", scan_error(code));
        }
        assert!(matches!(scan_error("ValidationException"), ReadError::Other(_)));
    }
}
