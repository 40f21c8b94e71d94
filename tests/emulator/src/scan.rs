//! DynamoDB `Scan` over a table's items: which segment of a parallel scan an item belongs to, the order
//! a segment is read in, where a page ends, and what it costs in read units; and the *synthetic* item
//! source of the backfill benchmark.
//!
//! Invariants kept here:
//! - an item belongs to exactly one segment of `TotalSegments`, chosen by a hash of its key that does
//!   not change between calls or runs (like DynamoDB, which splits the key-hash space into ranges);
//! - within a segment items are read in key order, so a page that starts after its
//!   `ExclusiveStartKey` continues exactly where the previous page stopped: reading a segment page by
//!   page yields each of its items once;
//! - a page holds at most `Limit` items and at most 1 MB of them (at least one), and says
//!   `LastEvaluatedKey` exactly when the segment holds more items after it;
//! - capacity is charged as DynamoDB charges a `Scan`: the summed size of the items read, rounded up
//!   to 4 KB units, one unit per 4 KB when strongly consistent and half of one when eventually
//!   consistent.
//!
//! A synthetic table's items are not stored: item `i` (key `i` zero-padded to [`KEY_DIGITS`] digits)
//! is generated from `i` whenever it is read, always the same, so a million items of 1 KB cost
//! nothing until they are scanned.

use std::fmt::Write as _;

use serde_json::Value;

use super::types::Attributes;

/// A `Scan` page reads at most 1 MB of items ("If the total size of scanned items exceeds the maximum
/// dataset size limit of 1 MB, the scan completes", the `Scan` API reference).
const MAX_BYTES_PER_PAGE: usize = 1 << 20;

/// Read capacity is charged per 4 KB of items read (DynamoDB's read request unit).
const READ_UNIT_BYTES: usize = 4096;

/// `TotalSegments` may be at most 1,000,000 (the `Scan` API reference).
pub(crate) const MAX_TOTAL_SEGMENTS: u32 = 1_000_000;

/// Digits of a synthetic item's key: room for ten billion items, far more than any test generates.
pub(crate) const KEY_DIGITS: usize = 10;

/// Items generated on demand: `items` of them, each of `item_bytes` bytes by DynamoDB's size rules
/// (or the smallest the fixed attributes allow, if that is more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Synthetic {
    pub items: u64,
    pub item_bytes: usize,
}

/// One item as a page carries it.
pub(crate) struct ScanItem {
    /// The value of the (string) key attribute.
    pub key: String,
    /// The item in DynamoDB JSON, as `Items` lists it.
    pub json: String,
    /// Its size by DynamoDB's rules ([`item_size`]).
    pub size: usize,
}

/// One page of a segment: the parts of the `Scan` output that depend on the items.
pub(crate) struct ScanPage {
    pub items: Vec<ScanItem>,
    /// The key of the last item, when the segment holds more after it.
    pub last_evaluated_key: Option<String>,
    pub bytes: usize,
}

impl ScanPage {
    /// The read units the page consumed: its bytes in 4 KB units (at least one: DynamoDB charges a
    /// page that found nothing too), halved for an eventually consistent read.
    pub fn capacity_units(&self, consistent: bool) -> f64 {
        let units = self.bytes.div_ceil(READ_UNIT_BYTES).max(1) as f64;
        if consistent { units } else { units / 2.0 }
    }
}

/// The segment of `total` that the item keyed `key` belongs to: a hash of the key scaled onto
/// `0..total`, so segments are ranges of the hash space.
pub(crate) fn segment_of(key: &str, total: u32) -> u32 {
    ((u128::from(key_hash(key)) * u128::from(total)) >> 64) as u32
}

/// FNV-1a over the key's bytes, then the SplitMix64 finalizer: sequential keys differ in their last
/// digits only, and FNV alone leaves its high bits (which choose the segment) poorly mixed for them.
fn key_hash(key: &str) -> u64 {
    let fnv = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let mut z = fnv.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Takes one page from `members` (a segment's items in order, from just after the start key): at
/// most `limit` items and 1 MB, at least one.
pub(crate) fn page(members: impl Iterator<Item = ScanItem>, limit: usize) -> ScanPage {
    let mut members = members.peekable();
    let (mut items, mut bytes) = (Vec::new(), 0);
    while items.len() < limit {
        let Some(next) = members.peek() else { break };
        if !items.is_empty() && bytes + next.size > MAX_BYTES_PER_PAGE {
            break;
        }
        bytes += next.size;
        items.extend(members.next());
    }
    let more = members.peek().is_some();
    let last_evaluated_key = items.last().filter(|_| more).map(|item| item.key.clone());
    ScanPage { items, last_evaluated_key, bytes }
}

/// A stored item as a page carries it.
pub(crate) fn stored_item(key: &str, item: &Attributes) -> ScanItem {
    ScanItem { key: key.to_owned(), json: Value::Object(item.clone()).to_string(), size: item_size(item) }
}

/// The size of an item by DynamoDB's rules ("Item sizes and formats" in the developer guide): the
/// length of each attribute name plus the size of its value.
pub(crate) fn item_size(item: &Attributes) -> usize {
    item.iter().map(|(name, value)| name.len() + value_size(value)).sum()
}

/// The size of one attribute value in DynamoDB JSON: strings and binaries by their bytes, numbers by
/// their significant digits, `BOOL` and `NULL` one byte, sets by their members, lists and maps 3 bytes
/// plus one per element plus the elements (and a map's names).
fn value_size(value: &Value) -> usize {
    let Some((kind, inner)) = value.as_object().and_then(|typed| typed.iter().next()) else { return 0 };
    let text = || inner.as_str().unwrap_or_default();
    let members = || inner.as_array().map(Vec::as_slice).unwrap_or_default();
    match kind.as_str() {
        "S" => text().len(),
        "N" => number_size(text()),
        "B" => base64_len(text()),
        "BOOL" | "NULL" => 1,
        "SS" => members().iter().map(|m| m.as_str().map_or(0, str::len)).sum(),
        "NS" => members().iter().map(|m| number_size(m.as_str().unwrap_or_default())).sum(),
        "BS" => members().iter().map(|m| base64_len(m.as_str().unwrap_or_default())).sum(),
        "L" => 3 + members().iter().map(|element| 1 + value_size(element)).sum::<usize>(),
        "M" => {
            let fields = inner.as_object().into_iter().flatten();
            3 + fields.map(|(name, element)| name.len() + 1 + value_size(element)).sum::<usize>()
        }
        _ => 0,
    }
}

/// A number's size: one byte per two significant digits, plus one (leading and trailing zeros do not
/// count).
fn number_size(text: &str) -> usize {
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    let significant = digits.trim_start_matches('0').trim_end_matches('0').len();
    significant.div_ceil(2) + 1
}

/// The decoded length of standard base64 text.
fn base64_len(text: &str) -> usize {
    (text.len() / 4 * 3).saturating_sub(text.bytes().rev().take_while(|b| *b == b'=').count())
}

impl Synthetic {
    /// The key of item `index`.
    pub fn key(index: u64) -> String {
        format!("{index:0KEY_DIGITS$}")
    }

    /// The index of the item keyed `key`, if it is one of this source's keys.
    pub fn index(&self, key: &str) -> Option<u64> {
        let index = key.parse::<u64>().ok().filter(|_| key.len() == KEY_DIGITS)?;
        (index < self.items).then_some(index)
    }

    /// The items of `segment` of `total` after item `after` (from the first when `None`), in order.
    pub fn members(&self, segment: u32, total: u32, after: Option<u64>) -> impl Iterator<Item = ScanItem> + '_ {
        let first = after.map_or(0, |index| index + 1);
        (first..self.items)
            .map(Synthetic::key)
            .filter(move |key| segment_of(key, total) == segment)
            .map(|key| self.item(key))
    }

    /// The table's size by DynamoDB's rules: exact when `item_bytes` leaves room for a payload (every
    /// item has that size then), an estimate from the first item otherwise.
    pub fn size_bytes(&self) -> u64 {
        if self.items == 0 {
            return 0;
        }
        self.item(Synthetic::key(0)).size as u64 * self.items
    }

    /// Item `key` (a key of [`Self::key`]): the key `pk`, a number `n`, a boolean `even`, a list `tags`
    /// of a string and a number, and a string `payload` of letters and digits that brings the item to
    /// `item_bytes`. The payload is pseudo-random (seeded by the index) so it compresses like real data
    /// rather than like a run of one letter.
    fn item(&self, key: String) -> ScanItem {
        let index: u64 = key.parse().unwrap_or_default();
        let number = index.to_string();
        let tag = format!("t{}", index % 7);
        let small = (index % 100).to_string();
        let fixed = "pk".len()
            + key.len()
            + "n".len()
            + number_size(&number)
            + "even".len()
            + 1
            + "tags".len()
            + 3
            + (1 + tag.len())
            + (1 + number_size(&small))
            + "payload".len();
        let padding = self.item_bytes.saturating_sub(fixed);
        let mut json = String::with_capacity(padding + 160);
        let even = index.is_multiple_of(2);
        let _ = write!(
            json,
            r#"{{"pk":{{"S":"{key}"}},"n":{{"N":"{number}"}},"even":{{"BOOL":{even}}},"tags":{{"L":[{{"S":"{tag}"}},{{"N":"{small}"}}]}},"payload":{{"S":""#
        );
        payload(index, padding, &mut json);
        json.push_str("\"}}");
        ScanItem { key, json, size: fixed + padding }
    }
}

/// Appends `len` letters and digits drawn from xorshift64* seeded by `index`.
fn payload(index: u64, len: usize, out: &mut String) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut state = index.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut left = len;
    while left > 0 {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let mut bits = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        for _ in 0..left.min(10) {
            out.push(char::from(ALPHABET[(bits & 63) as usize]));
            bits >>= 6;
        }
        left = left.saturating_sub(10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Attributes {
        serde_json::from_str(json).unwrap_or_else(|err| panic!("{err}: {json}"))
    }

    #[test]
    fn synthetic_items_are_valid_json_of_the_size_asked_for_and_the_same_every_time() {
        let source = Synthetic { items: 5000, item_bytes: 1024 };
        for index in [0, 1, 9, 10, 99, 100, 4321, 4999] {
            let item = source.item(Synthetic::key(index));
            let attributes = parse(&item.json);
            assert_eq!(item_size(&attributes), item.size, "item {index}");
            assert_eq!(item.size, 1024, "item {index}");
            assert_eq!(attributes["pk"]["S"], Synthetic::key(index));
            assert_eq!(source.item(Synthetic::key(index)).json, item.json, "item {index} is generated again alike");
        }
        assert_eq!(source.size_bytes(), 5000 * 1024);
        let tiny = Synthetic { items: 1, item_bytes: 1 };
        assert_eq!(tiny.item(Synthetic::key(0)).size, item_size(&parse(&tiny.item(Synthetic::key(0)).json)));
    }

    #[test]
    fn sizes_follow_dynamodb_rules() {
        let item = parse(
            r#"{"a":{"S":"héllo"},"n":{"N":"-0012300.0"},"b":{"B":"AAEC"},"t":{"BOOL":true},"z":{"NULL":true},
                "l":{"L":[{"S":"x"},{"N":"7"}]},"m":{"M":{"k":{"S":"v"}}},"ss":{"SS":["ab","c"]}}"#,
        );
        // a: 1+6, n: 1+(3 digits → 2)+1, b: 1+3, t: 1+1, z: 1+1, l: 1+3+(1+1)+(1+2), m: 1+3+(1+1+1),
        // ss: 2+3
        assert_eq!(item_size(&item), 7 + 4 + 4 + 2 + 2 + 9 + 7 + 5);
    }

    #[test]
    fn segments_split_keys_evenly_and_stably() {
        let total = 8;
        let mut counts = [0usize; 8];
        for index in 0..8000 {
            let segment = segment_of(&Synthetic::key(index), total);
            assert_eq!(segment, segment_of(&Synthetic::key(index), total));
            counts[segment as usize] += 1;
        }
        assert!(counts.iter().all(|count| (800..1200).contains(count)), "{counts:?}");
        assert_eq!(segment_of("anything", 1), 0);
    }

    #[test]
    fn pages_stop_at_the_limit_or_one_megabyte_and_say_whether_more_follow() {
        let source = Synthetic { items: 3000, item_bytes: 1000 };
        let by_limit = page(source.members(0, 1, None), 10);
        assert_eq!(by_limit.items.len(), 10);
        assert_eq!(by_limit.last_evaluated_key.as_deref(), Some(Synthetic::key(9).as_str()));
        assert_eq!(by_limit.capacity_units(false), 1.5, "10,000 bytes are three 4 KB units, halved");
        assert_eq!(by_limit.capacity_units(true), 3.0);
        let by_size = page(source.members(0, 1, None), 2000);
        assert_eq!(by_size.items.len(), MAX_BYTES_PER_PAGE / 1000);
        let last = page(source.members(0, 1, Some(2990)), 100);
        assert_eq!((last.items.len(), last.last_evaluated_key), (9, None));
        let exact = page(source.members(0, 1, Some(2989)), 10);
        assert_eq!((exact.items.len(), exact.last_evaluated_key), (10, None), "nothing follows: no key");
        let empty = page(source.members(0, 1, Some(2999)), 10);
        assert_eq!((empty.items.len(), empty.capacity_units(false)), (0, 0.5));
        let huge = Synthetic { items: 2, item_bytes: 2 * MAX_BYTES_PER_PAGE };
        assert_eq!(page(huge.members(0, 1, None), 10).items.len(), 1, "at least one item");
    }

    #[test]
    fn synthetic_keys_are_recognised_only_in_range() {
        let source = Synthetic { items: 100, item_bytes: 100 };
        assert_eq!(source.index(&Synthetic::key(42)), Some(42));
        assert_eq!(source.index(&Synthetic::key(100)), None);
        assert_eq!(source.index("42"), None);
        assert_eq!(source.index("not a key"), None);
    }
}
