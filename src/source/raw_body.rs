//! The body of a successful `GetRecords` response as it arrived, for the transcoder
//! (`publish::event::transcode`; issue 19), while the SDK keeps signing, credentials, retries,
//! time-outs and error classification.
//!
//! How: an interceptor added to the call swaps the operation's response deserializer for one that,
//! on a success status, keeps the body and lets the SDK's own deserializer read `{}` in its place
//! (so it parses almost nothing and still builds its output, request id included); any other status goes to the SDK's
//! deserializer untouched, so errors are classified as before. The body is kept by the last attempt
//! that succeeded (a retried attempt overwrites nothing until it succeeds).

use std::sync::{Arc, Mutex};

use aws_sdk_dynamodbstreams::operation::get_records::GetRecords;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::{BeforeSerializationInterceptorContextMut, Error, Output};
use aws_smithy_runtime_api::client::orchestrator::{HttpResponse, OrchestratorError};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::client::runtime_plugin::RuntimePlugin;
use aws_smithy_runtime_api::client::ser_de::{DeserializeResponse, SharedResponseDeserializer};
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::config_bag::{ConfigBag, FrozenLayer};
use bytes::Bytes;

/// Add to one call (`.customize().interceptor(…)`); [`KeepBody::take`] the body after it returned.
#[derive(Debug, Clone, Default)]
pub struct KeepBody {
    slot: Arc<Mutex<Option<Bytes>>>,
}

impl KeepBody {
    /// The body of the call's successful response (`None` if it failed or was not made).
    pub fn take(&self) -> Option<Bytes> {
        self.slot.lock().ok()?.take()
    }
}

impl Intercept for KeepBody {
    fn name(&self) -> &'static str {
        "KeepBody"
    }

    /// Once per call, before the first attempt (so retries do not wrap it again).
    fn modify_before_serialization(
        &self,
        _context: &mut BeforeSerializationInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        // The SDK's own `GetRecords` configuration, which holds its response deserializer (the one in
        // `cfg` cannot be taken out of it).
        let sdk = GetRecords::new().config().ok_or("GetRecords has no configuration")?;
        if sdk.load::<SharedResponseDeserializer>().is_none() {
            return Err("GetRecords has no response deserializer".into());
        }
        let keeping = Keeping { sdk, slot: self.slot.clone() };
        cfg.interceptor_state().store_put(SharedResponseDeserializer::new(keeping));
        Ok(())
    }
}

#[derive(Debug)]
struct Keeping {
    /// Holds the SDK's deserializer of `GetRecords` responses.
    sdk: FrozenLayer,
    slot: Arc<Mutex<Option<Bytes>>>,
}

impl DeserializeResponse for Keeping {
    fn deserialize_nonstreaming_with_config(
        &self,
        response: &HttpResponse,
        cfg: &ConfigBag,
    ) -> Result<Output, OrchestratorError<Error>> {
        let Some(sdk) = self.sdk.load::<SharedResponseDeserializer>() else {
            return Err(OrchestratorError::other("GetRecords has no response deserializer"));
        };
        let body = response.body().bytes().filter(|_| response.status().is_success());
        let Some(body) = body else {
            return sdk.deserialize_nonstreaming_with_config(response, cfg);
        };
        let mut stand_in = HttpResponse::new(response.status(), SdkBody::from("{}"));
        *stand_in.headers_mut() = response.headers().clone();
        let output = sdk.deserialize_nonstreaming_with_config(&stand_in, cfg)?;
        if let Ok(mut slot) = self.slot.lock() {
            *slot = Some(Bytes::copy_from_slice(body));
        }
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_dynamodbstreams::config::{BehaviorVersion, Credentials, Region};
    use aws_smithy_runtime_api::client::http::{
        HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
    };
    use aws_smithy_runtime_api::client::orchestrator::HttpRequest;

    use super::*;
    use crate::source::error::ReadError;

    /// Answers every request with `status` and `body`.
    #[derive(Debug, Clone)]
    struct Canned(u16, &'static str);

    impl HttpConnector for Canned {
        fn call(&self, _request: HttpRequest) -> HttpConnectorFuture {
            let status = aws_smithy_runtime_api::http::StatusCode::try_from(self.0).expect("a status");
            let mut response = HttpResponse::new(status, SdkBody::from(self.1));
            response.headers_mut().insert("content-type", "application/x-amz-json-1.0");
            HttpConnectorFuture::ready(Ok(response))
        }
    }

    impl HttpClient for Canned {
        fn http_connector(&self, _: &HttpConnectorSettings, _: &RuntimeComponents) -> SharedHttpConnector {
            SharedHttpConnector::new(self.clone())
        }
    }

    fn client(status: u16, body: &'static str) -> aws_sdk_dynamodbstreams::Client {
        let config = aws_sdk_dynamodbstreams::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .retry_config(aws_smithy_types::retry::RetryConfig::disabled())
            .http_client(Canned(status, body))
            .build();
        aws_sdk_dynamodbstreams::Client::from_conf(config)
    }

    #[tokio::test]
    async fn a_successful_body_is_kept_and_the_sdk_parses_none_of_it() {
        let body = r#"{"Records":[{"eventID":"e","dynamodb":{"SequenceNumber":"1"}}],"NextShardIterator":"n"}"#;
        let keep = KeepBody::default();
        let output =
            client(200, body).get_records().shard_iterator("i").customize().interceptor(keep.clone()).send().await;
        let output = output.expect("a successful call");
        assert_eq!(output.records, None, "the SDK read the stand-in");
        assert_eq!(output.next_shard_iterator, None);
        assert_eq!(keep.take().as_deref(), Some(body.as_bytes()));
    }

    #[tokio::test]
    async fn an_error_is_classified_by_the_sdk_and_no_body_is_kept() {
        let body = r#"{"__type":"com.amazonaws.dynamodb.v20120810#ExpiredIteratorException","message":"expired"}"#;
        let keep = KeepBody::default();
        let result =
            client(400, body).get_records().shard_iterator("i").customize().interceptor(keep.clone()).send().await;
        let err = ReadError::from_sdk(result.expect_err("an error status"));
        assert!(matches!(err, ReadError::IteratorExpired), "{err:?}");
        assert_eq!(keep.take(), None);
    }
}
