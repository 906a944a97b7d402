//! The event model and its canonical encoding.
//!
//! An event's hashed bytes `E` are the RFC 8785 canonical JSON of
//! `{action, actor{id,kind}, chain, details, prev_hash, resource{id,type}, seq, tenant, time, v}`
//! and its hash is `SHA-256(E)`. In an export each event is one line,
//! `{"event":E,"hash":"<hex>"}`, itself canonical JSON, so `E` appears on the line byte for byte
//! between the leading `{"event":` and the trailing `,"hash":"…"}`.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::canonical;
use crate::hash::{self, Hash};

/// Version of the event encoding, written as `"v"` in every event.
pub const EVENT_VERSION: u32 = 1;

/// What is wrong with an event before it is written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("tenant id `{0}` is invalid: use 1-64 characters from A-Z a-z 0-9 . _ - starting with a letter or digit")]
    InvalidTenant(String),
    #[error("action `{0}` is invalid: use 1-64 characters from a-z 0-9 . _ (for example `job.created`)")]
    InvalidAction(String),
    #[error("{what} must be 1-200 characters with no control characters")]
    InvalidField { what: &'static str },
    #[error("chain `{0}` is not `operator` or `tenant:<id>`")]
    InvalidChain(String),
}

fn valid_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn valid_text(s: &str) -> bool {
    (1..=200).contains(&s.len()) && !s.chars().any(char::is_control)
}

/// A validated tenant id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    /// Checks and wraps a tenant id.
    pub fn new(id: impl Into<String>) -> Result<Self, EventError> {
        let id = id.into();
        if valid_id(&id) {
            Ok(Self(id))
        } else {
            Err(EventError::InvalidTenant(id))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which hash chain an event belongs to: one per tenant, and one for operator/admin events.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Chain {
    /// A tenant's own chain, `tenant:<id>`.
    Tenant(TenantId),
    /// The operators' chain, `operator`.
    Operator,
}

impl Chain {
    /// The chain's name as stored and exported: `tenant:<id>` or `operator`.
    pub fn key(&self) -> String {
        match self {
            Chain::Tenant(t) => format!("tenant:{t}"),
            Chain::Operator => "operator".to_owned(),
        }
    }

    /// Parses a chain name.
    pub fn parse(s: &str) -> Result<Self, EventError> {
        if s == "operator" {
            return Ok(Chain::Operator);
        }
        match s.strip_prefix("tenant:") {
            Some(t) if valid_id(t) => Ok(Chain::Tenant(TenantId(t.to_owned()))),
            _ => Err(EventError::InvalidChain(s.to_owned())),
        }
    }

    /// The tenant whose chain this is.
    pub fn tenant(&self) -> Option<&TenantId> {
        match self {
            Chain::Tenant(t) => Some(t),
            Chain::Operator => None,
        }
    }
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// Who did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A tenant's API key, by key id.
    ApiKey(String),
    /// An operator, by admin id.
    Admin(String),
    /// A Cella component acting on its own (`worker`, `scheduler`, …).
    System(String),
}

impl Actor {
    fn kind(&self) -> &'static str {
        match self {
            Actor::ApiKey(_) => "api_key",
            Actor::Admin(_) => "admin",
            Actor::System(_) => "system",
        }
    }

    fn id(&self) -> &str {
        match self {
            Actor::ApiKey(id) | Actor::Admin(id) | Actor::System(id) => id,
        }
    }
}

/// What it was done to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// `job`, `session`, `api_key`, …
    pub kind: String,
    /// The resource's id.
    pub id: String,
}

impl Resource {
    /// A resource of `kind` with `id`.
    pub fn new(kind: impl Into<String>, id: impl Into<String>) -> Self {
        Self { kind: kind.into(), id: id.into() }
    }
}

/// An event to append; the store assigns `seq`, `time` and `prev_hash`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The chain it goes into.
    pub chain: Chain,
    /// The tenant it concerns: the chain's tenant for tenant chains, optional for the operator chain.
    pub tenant: Option<TenantId>,
    /// Who did it.
    pub actor: Actor,
    /// What was done, `noun.verb` (`job.created`, `session.suspended`).
    pub action: String,
    /// What it was done to.
    pub resource: Resource,
    /// Free-form JSON details.
    pub details: Value,
}

impl NewEvent {
    /// An event for `tenant`'s chain.
    pub fn tenant(tenant: TenantId, actor: Actor, action: &str, resource: Resource, details: Value) -> Self {
        Self {
            chain: Chain::Tenant(tenant.clone()),
            tenant: Some(tenant),
            actor,
            action: action.to_owned(),
            resource,
            details,
        }
    }

    /// An event for the operator chain, optionally about a tenant.
    pub fn operator(
        concerning: Option<TenantId>,
        actor: Actor,
        action: &str,
        resource: Resource,
        details: Value,
    ) -> Self {
        Self {
            chain: Chain::Operator,
            tenant: concerning,
            actor,
            action: action.to_owned(),
            resource,
            details,
        }
    }

    /// Checks every field a reader relies on.
    pub fn validate(&self) -> Result<(), EventError> {
        let action_ok = (1..=64).contains(&self.action.len())
            && self
                .action
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_');
        if !action_ok {
            return Err(EventError::InvalidAction(self.action.clone()));
        }
        if !valid_text(self.actor.id()) {
            return Err(EventError::InvalidField { what: "actor id" });
        }
        if !valid_text(&self.resource.kind) {
            return Err(EventError::InvalidField { what: "resource type" });
        }
        if !valid_text(&self.resource.id) {
            return Err(EventError::InvalidField { what: "resource id" });
        }
        if let Chain::Tenant(t) = &self.chain {
            if self.tenant.as_ref() != Some(t) {
                return Err(EventError::InvalidField {
                    what: "tenant of a tenant-chain event (it must be the chain's tenant)",
                });
            }
        }
        Ok(())
    }

    /// The canonical bytes `E` of this event at position `seq`, written at `time`, after `prev`.
    pub fn encode(&self, seq: u64, time: OffsetDateTime, prev: &Hash) -> Vec<u8> {
        let body = json!({
            "action": self.action,
            "actor": {"id": self.actor.id(), "kind": self.actor.kind()},
            "chain": self.chain.key(),
            "details": self.details,
            "prev_hash": hash::to_hex(prev),
            "resource": {"id": self.resource.id, "type": self.resource.kind},
            "seq": seq,
            "tenant": self.tenant.as_ref().map(TenantId::as_str),
            "time": format_time(time),
            "v": EVENT_VERSION,
        });
        canonical::to_vec(&body)
    }
}

/// `time` truncated to microseconds (what PostgreSQL keeps).
pub fn truncate_to_micros(time: OffsetDateTime) -> OffsetDateTime {
    let micros = time.microsecond();
    time.replace_microsecond(micros).unwrap_or(time)
}

/// RFC 3339 in UTC with exactly six fractional digits: `2026-11-28T13:23:04.123456Z`.
pub fn format_time(time: OffsetDateTime) -> String {
    let t = time.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// Parses the output of [`format_time`] (any RFC 3339 time, in fact).
pub fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

const LINE_PREFIX: &[u8] = b"{\"event\":";
const HASH_PREFIX: &[u8] = b",\"hash\":\"";
const LINE_SUFFIX_LEN: usize = HASH_PREFIX.len() + 64 + 2;

/// An export line for the hashed bytes `body` with hash `hash`.
pub fn export_line(body: &[u8], hash: &Hash, out: &mut Vec<u8>) {
    out.extend_from_slice(LINE_PREFIX);
    out.extend_from_slice(body);
    out.extend_from_slice(HASH_PREFIX);
    out.extend_from_slice(hash::to_hex(hash).as_bytes());
    out.extend_from_slice(b"\"}");
}

/// Length of the export line [`export_line`] writes for hashed bytes of `body_len` bytes (without
/// the newline), so an export can announce `events.jsonl`'s size before writing it.
pub fn export_line_len(body_len: u64) -> u64 {
    body_len + (LINE_PREFIX.len() + LINE_SUFFIX_LEN) as u64
}

/// Splits an export line into the hashed bytes `E` and the hash it states.
pub fn split_line(line: &[u8]) -> Option<(&[u8], Hash)> {
    if line.len() < LINE_PREFIX.len() + LINE_SUFFIX_LEN || !line.starts_with(LINE_PREFIX) {
        return None;
    }
    let (head, tail) = line.split_at(line.len() - LINE_SUFFIX_LEN);
    if !tail.starts_with(HASH_PREFIX) || !tail.ends_with(b"\"}") {
        return None;
    }
    let hex = std::str::from_utf8(&tail[HASH_PREFIX.len()..HASH_PREFIX.len() + 64]).ok()?;
    Some((&head[LINE_PREFIX.len()..], hash::hash_from_hex(hex)?))
}

/// The fields of `E` the verifier needs, borrowed from the line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventHead<'a> {
    #[serde(borrow)]
    pub action: Cow<'a, str>,
    pub actor: serde::de::IgnoredAny,
    #[serde(borrow)]
    pub chain: Cow<'a, str>,
    pub details: serde::de::IgnoredAny,
    #[serde(borrow)]
    pub prev_hash: Cow<'a, str>,
    pub resource: serde::de::IgnoredAny,
    pub seq: u64,
    #[serde(borrow)]
    pub tenant: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub time: Cow<'a, str>,
    pub v: u32,
}

/// The fields the verifier needs, found by a single pass over `E` laid out the way
/// [`NewEvent::encode`] writes it (canonical key order, no whitespace).
///
/// This is the verifier's fast path: it checks the top-level layout and that nested values
/// are balanced, not that `details` is valid JSON (its bytes are covered by the hash either
/// way). `None` means "not in the canonical layout"; the caller then falls back to
/// [`EventHead`] through serde for a precise message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScannedHead<'a> {
    pub chain: &'a str,
    /// `None` when `prev_hash` is a string but not 64 lowercase hex digits.
    pub prev_hash: Option<Hash>,
    pub seq: u64,
    pub tenant: Option<&'a str>,
    pub v: u32,
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    #[inline]
    fn expect(&mut self, lit: &[u8]) -> Option<()> {
        if self.b.get(self.i..self.i + lit.len())? == lit {
            self.i += lit.len();
            Some(())
        } else {
            None
        }
    }

    /// Skips a string starting at the opening quote.
    #[inline]
    fn skip_string(&mut self) -> Option<()> {
        self.expect(b"\"")?;
        loop {
            self.i = find_special(self.b, self.i)?;
            match self.b[self.i] {
                b'"' => {
                    self.i += 1;
                    return Some(());
                }
                b'\\' => self.i += 2,
                _ => return None,
            }
        }
    }

    /// A string without escapes, returned without its quotes.
    #[inline]
    fn plain_string(&mut self) -> Option<&'a str> {
        self.expect(b"\"")?;
        let start = self.i;
        let end = find_special(self.b, start)?;
        if self.b[end] != b'"' {
            return None;
        }
        self.i = end + 1;
        std::str::from_utf8(&self.b[start..end]).ok()
    }

    /// A string without escapes holding a hash: `Some(None)` when it is some other text.
    #[inline]
    fn hash_string(&mut self) -> Option<Option<Hash>> {
        let start = self.i;
        if let Some(h) = self.b.get(start + 1..start + 65).and_then(hash::hash_from_hex) {
            if self.b.get(start) == Some(&b'"') && self.b.get(start + 65) == Some(&b'"') {
                self.i = start + 66;
                return Some(Some(h));
            }
        }
        self.plain_string().map(|_| None)
    }

    /// Skips any value: strings, balanced objects/arrays, scalars.
    fn skip_value(&mut self) -> Option<()> {
        match *self.b.get(self.i)? {
            b'"' => self.skip_string(),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match *self.b.get(self.i)? {
                        b'"' => {
                            self.skip_string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                let len = self.b[self.i..].iter().position(|&c| matches!(c, b',' | b'}' | b']'))?;
                (len > 0).then(|| self.i += len)
            }
        }
    }

    #[inline]
    fn number(&mut self) -> Option<u64> {
        let len = self.b[self.i..].iter().position(|c| !c.is_ascii_digit())?;
        let digits = &self.b[self.i..self.i + len];
        if len == 0 || len > 19 || (len > 1 && digits[0] == b'0') {
            return None;
        }
        self.i += len;
        // At most 19 digits: always below u64::MAX.
        Some(digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
    }
}

/// Index of the first `"`, `\\` or control character at or after `i`, eight bytes at a time.
#[inline]
fn find_special(b: &[u8], mut i: usize) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    while let Some(chunk) = b.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let quote = w ^ (LO * u64::from(b'"'));
        let backslash = w ^ (LO * u64::from(b'\\'));
        // A byte is flagged when it is zero (after the xor) or below 0x20; the lowest flagged
        // byte is always a true match, which is the only one used.
        let m = (quote.wrapping_sub(LO) & !quote & HI)
            | (backslash.wrapping_sub(LO) & !backslash & HI)
            | (w.wrapping_sub(LO * 0x20) & !w & HI);
        if m != 0 {
            return Some(i + (m.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    b[i.min(b.len())..].iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20).map(|p| i + p)
}

/// Scans `E` for the verifier; see [`ScannedHead`].
pub fn scan_head(body: &[u8]) -> Option<ScannedHead<'_>> {
    scan_head_prefix(body).and_then(|(head, len)| (len == body.len()).then_some(head))
}

/// Scans an event that starts `bytes` and may be followed by anything; returns it and its length.
pub fn scan_head_prefix(bytes: &[u8]) -> Option<(ScannedHead<'_>, usize)> {
    let mut s = Scanner { b: bytes, i: 0 };
    s.expect(b"{\"action\":")?;
    s.skip_string()?;
    s.expect(b",\"actor\":{")?;
    s.i -= 1;
    s.skip_value()?;
    s.expect(b",\"chain\":")?;
    let chain = s.plain_string()?;
    s.expect(b",\"details\":")?;
    s.skip_value()?;
    s.expect(b",\"prev_hash\":")?;
    let prev_hash = s.hash_string()?;
    s.expect(b",\"resource\":{")?;
    s.i -= 1;
    s.skip_value()?;
    s.expect(b",\"seq\":")?;
    let seq = s.number()?;
    s.expect(b",\"tenant\":")?;
    let tenant = if s.expect(b"null").is_some() { None } else { Some(s.plain_string()?) };
    s.expect(b",\"time\":")?;
    s.skip_string()?;
    s.expect(b",\"v\":")?;
    let v = u32::try_from(s.number()?).ok()?;
    s.expect(b"}")?;
    Some((ScannedHead { chain, prev_hash, seq, tenant, v }, s.i))
}

/// Reads one export line from the start of `bytes` on the fast path: the hashed bytes, the
/// stated hash, the scanned fields and the line's length (without its `\n`). `None` when the
/// line is not laid out canonically; the caller then takes the slow path for a precise message.
pub fn scan_line(bytes: &[u8]) -> Option<(&[u8], Hash, ScannedHead<'_>, usize)> {
    let rest = bytes.strip_prefix(LINE_PREFIX)?;
    let (head, len) = scan_head_prefix(rest)?;
    let tail = &rest[len..];
    if tail.len() < LINE_SUFFIX_LEN || !tail.starts_with(HASH_PREFIX) {
        return None;
    }
    let stated = hash::hash_from_hex(&tail[HASH_PREFIX.len()..HASH_PREFIX.len() + 64])?;
    if &tail[HASH_PREFIX.len() + 64..LINE_SUFFIX_LEN] != b"\"}" {
        return None;
    }
    if !matches!(tail.get(LINE_SUFFIX_LEN), None | Some(b'\n')) {
        return None;
    }
    Some((&rest[..len], stated, head, LINE_PREFIX.len() + len + LINE_SUFFIX_LEN))
}

/// A whole event, read back from its hashed bytes.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub action: String,
    pub actor: EventActor,
    pub chain: String,
    pub details: Value,
    pub prev_hash: String,
    pub resource: EventResource,
    pub seq: u64,
    pub tenant: Option<String>,
    pub time: String,
    pub v: u32,
}

/// `actor` as stored in an event.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct EventActor {
    pub id: String,
    pub kind: String,
}

/// `resource` as stored in an event.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct EventResource {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NewEvent {
        NewEvent::tenant(
            TenantId::new("acme").unwrap(),
            Actor::ApiKey("key_1".into()),
            "job.created",
            Resource::new("job", "j-1"),
            json!({"b": 2, "a": [1, "x"]}),
        )
    }

    #[test]
    fn encodes_events_as_canonical_json_with_every_field() {
        let t = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let body = sample().encode(7, t, &[0xab; 32]);
        let want = format!(
            "{{\"action\":\"job.created\",\"actor\":{{\"id\":\"key_1\",\"kind\":\"api_key\"}},\"chain\":\"tenant:acme\",\
             \"details\":{{\"a\":[1,\"x\"],\"b\":2}},\"prev_hash\":\"{}\",\"resource\":{{\"id\":\"j-1\",\"type\":\"job\"}},\
             \"seq\":7,\"tenant\":\"acme\",\"time\":\"2027-01-15T08:00:00.000000Z\",\"v\":1}}",
            "ab".repeat(32)
        );
        assert_eq!(String::from_utf8(body).unwrap(), want);
    }

    #[test]
    fn export_line_is_canonical_json_containing_the_hashed_bytes() {
        let t = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let body = sample().encode(1, t, &hash::GENESIS);
        let h = hash::sha256(&body);
        let mut line = Vec::new();
        export_line(&body, &h, &mut line);
        let value: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(canonical::to_vec(&value), line);
        assert_eq!(split_line(&line), Some((&body[..], h)));
    }

    #[test]
    fn scanner_reads_what_serde_reads_from_canonical_events() {
        let t = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let mut e = sample();
        e.details = json!({"s": "a\"}{[", "n": [1, {"x": null}], "e": ""});
        let body = e.encode(42, t, &[0xcd; 32]);
        let fast = scan_head(&body).unwrap();
        let slow: EventHead<'_> = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (fast.seq, fast.chain, fast.prev_hash, fast.tenant, fast.v),
            (42, "tenant:acme", hash::hash_from_hex(&*slow.prev_hash), Some("acme"), 1)
        );
        let op = NewEvent::operator(
            None,
            Actor::System("worker".into()),
            "vm.scrubbed",
            Resource::new("vm", "v"),
            json!(null),
        );
        assert_eq!(scan_head(&op.encode(1, t, &[0; 32])).unwrap().tenant, None);
    }

    #[test]
    fn find_special_finds_the_first_quote_backslash_or_control_byte() {
        for (text, want) in [
            (&b"abcdefghij\"k"[..], Some(10)),
            (b"abc\\defghijklmnop\"", Some(3)),
            (b"\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\n", Some(10)),
            (b"abcdefghijklmnop", None),
            (b"\"", Some(0)),
            (b"12345678\x01", Some(8)),
        ] {
            assert_eq!(find_special(text, 0), want, "{text:?}");
        }
        assert_eq!(find_special(b"ab\"cdefghijkl\"", 3), Some(13));
    }

    #[test]
    fn scanner_reads_prev_hash_as_a_digest_or_flags_other_text() {
        let t = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let body = String::from_utf8(sample().encode(1, t, &[0xcd; 32])).unwrap();
        assert_eq!(scan_head(body.as_bytes()).unwrap().prev_hash, Some([0xcd; 32]));
        let short = body.replace(&"cd".repeat(32), "cdcd");
        assert_eq!(scan_head(short.as_bytes()).unwrap().prev_hash, None);
        let upper = body.replace(&"cd".repeat(32), &"CD".repeat(32));
        assert_eq!(scan_head(upper.as_bytes()).unwrap().prev_hash, None);
        let unquoted = body.replace(&format!("\"{}\"", "cd".repeat(32)), &"1".repeat(66));
        assert!(scan_head(unquoted.as_bytes()).is_none());
    }

    #[test]
    fn scanner_reads_seq_up_to_nineteen_digits_without_leading_zeros() {
        let t = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let body = String::from_utf8(sample().encode(1, t, &[0; 32])).unwrap();
        let with_seq = |seq: &str| body.replace("\"seq\":1,", &format!("\"seq\":{seq},"));
        assert_eq!(
            scan_head(with_seq("9999999999999999999").as_bytes()).unwrap().seq,
            9_999_999_999_999_999_999
        );
        assert_eq!(scan_head(with_seq("0").as_bytes()).unwrap().seq, 0);
        for bad in ["01", "18446744073709551615", "", "-1"] {
            assert!(scan_head(with_seq(bad).as_bytes()).is_none(), "{bad}");
        }
    }

    #[test]
    fn scanner_rejects_reordered_or_trailing_bytes() {
        let t = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let body = sample().encode(1, t, &[0; 32]);
        let mut trailing = body.clone();
        trailing.push(b' ');
        assert!(scan_head(&trailing).is_none());
        let reordered = String::from_utf8(body).unwrap().replacen("{\"action\"", "{\"zzz\":1,\"action\"", 1);
        assert!(scan_head(reordered.as_bytes()).is_none());
    }

    #[test]
    fn rejects_invalid_tenants_actions_and_chains() {
        assert!(TenantId::new("../x").is_err());
        assert!(TenantId::new("").is_err());
        let mut e = sample();
        e.action = "Job Created".into();
        assert_eq!(e.validate(), Err(EventError::InvalidAction("Job Created".into())));
        assert!(Chain::parse("tenant:").is_err());
        assert_eq!(Chain::parse("operator"), Ok(Chain::Operator));
    }
}
