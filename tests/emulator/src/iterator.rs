//! Shard iterators: opaque, stateless tokens that carry everything `GetRecords` needs.
//!
//! A token encodes the stream, the shard, the next position to read (a sequence number: records at or
//! after it) and the generation it was issued under. The server keeps no iterator state, so a token
//! can be reused like DynamoDB's, and `expire_iterators` only has to bump the generation.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// What a shard iterator points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IteratorToken {
    #[serde(rename = "a")]
    pub stream_arn: String,
    #[serde(rename = "s")]
    pub shard_id: String,
    /// A decimal string: JSON numbers cannot hold every `u128`.
    #[serde(rename = "p")]
    position: String,
    #[serde(rename = "g")]
    pub generation: u64,
}

impl IteratorToken {
    pub fn new(stream_arn: &str, shard_id: &str, position: u128, generation: u64) -> IteratorToken {
        IteratorToken {
            stream_arn: stream_arn.to_owned(),
            shard_id: shard_id.to_owned(),
            position: position.to_string(),
            generation,
        }
    }

    /// The same shard and generation, at another position.
    pub fn at(&self, position: u128) -> IteratorToken {
        IteratorToken::new(&self.stream_arn, &self.shard_id, position, self.generation)
    }

    /// The first sequence number this iterator reads.
    pub fn position(&self) -> u128 {
        self.position.parse().unwrap_or(u128::MAX)
    }

    pub fn encode(&self) -> String {
        // Serializing a struct of strings and integers into JSON cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        URL_SAFE_NO_PAD.encode(json)
    }

    /// The token in `text`, or `None` for anything this server did not issue.
    pub fn decode(text: &str) -> Option<IteratorToken> {
        let json = URL_SAFE_NO_PAD.decode(text).ok()?;
        let token: IteratorToken = serde_json::from_slice(&json).ok()?;
        token.position.parse::<u128>().ok()?;
        Some(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let token = IteratorToken::new("arn:aws:dynamodb:us-east-1:1:table/t/stream/x", "shardId-1", u128::MAX - 1, 7);
        let decoded = IteratorToken::decode(&token.encode());
        assert_eq!(decoded.as_ref(), Some(&token));
        assert_eq!(decoded.map(|t| t.position()), Some(u128::MAX - 1));
        assert_eq!(IteratorToken::decode("not a token"), None);
        assert_eq!(IteratorToken::decode(&URL_SAFE_NO_PAD.encode(br#"{"a":"x","s":"y","p":"-1","g":0}"#)), None);
    }
}
