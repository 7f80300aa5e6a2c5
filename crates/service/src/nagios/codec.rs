//! The wire format of Nagios 4's worker protocol ("wproc"), both directions.
//!
//! Every message after registration is a list of `key=value` pairs, each
//! followed by a NUL byte, and then the 4-byte delimiter `\x01\0\0\0`
//! (`MSG_DELIM` in Nagios' `lib/worker.h`, its terminating NUL included).
//! Values never contain NUL, so the delimiter cannot occur inside a message.

use crate::readbuf::ReadBuf;

/// The bytes that end every message.
pub const MSG_DELIM: &[u8; 4] = b"\x01\x00\x00\x00";

/// Largest message the decoder buffers before it gives up on the stream
/// (the core's own limit for a worker's read cache is far below this).
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// One decoded message: its `key=value` pairs in the order they came.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// The pairs, in wire order (keys may repeat; lookups take the first).
    pub pairs: Vec<(String, String)>,
}

impl Message {
    /// The value of the first pair named `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Append a pair.
    pub fn push(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.pairs.push((key.into(), value.into()));
    }
}

/// Why a stream of bytes could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// No delimiter within [`MAX_MESSAGE`] bytes: the stream is not speaking wproc.
    #[error(
        "no message delimiter within {0} bytes; the peer does not speak the Nagios worker protocol"
    )]
    TooLong(usize),
}

/// Append one encoded message to `out`. NUL bytes in keys and values are
/// removed (the format has no escape for them); a `=` in a key would be read
/// back as part of the value, so keys are expected to be plain names.
pub fn encode_into<K, V>(pairs: impl IntoIterator<Item = (K, V)>, out: &mut Vec<u8>)
where
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    for (k, v) in pairs {
        push_without_nul(out, k.as_ref());
        out.push(b'=');
        push_without_nul(out, v.as_ref());
        out.push(0);
    }
    out.extend_from_slice(MSG_DELIM);
}

/// One encoded message.
pub fn encode<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Vec<u8>
where
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let mut out = Vec::new();
    encode_into(pairs, &mut out);
    out
}

fn push_without_nul(out: &mut Vec<u8>, bytes: &[u8]) {
    if memchr_nul(bytes).is_none() {
        out.extend_from_slice(bytes);
    } else {
        out.extend(bytes.iter().copied().filter(|&b| b != 0));
    }
}

fn memchr_nul(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == 0)
}

/// Parse the body of one message (the bytes before its delimiter).
/// Segments without `=` are not pairs (line noise, a stray prefix): they are
/// skipped and counted in the second value returned.
pub fn parse_body(body: &[u8]) -> (Message, usize) {
    let mut msg = Message::default();
    let mut skipped = 0;
    for seg in body.split(|&b| b == 0) {
        if seg.is_empty() {
            continue;
        }
        match seg.iter().position(|&b| b == b'=') {
            Some(eq) if eq > 0 => msg.push(
                String::from_utf8_lossy(&seg[..eq]).into_owned(),
                String::from_utf8_lossy(&seg[eq + 1..]).into_owned(),
            ),
            _ => skipped += 1,
        }
    }
    (msg, skipped)
}

/// Reassembles messages from a byte stream read in arbitrary pieces.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: ReadBuf,
    /// Where in the unread bytes to resume looking for a delimiter (bytes
    /// before it hold none).
    scanned: usize,
    /// Non-pair segments skipped so far.
    skipped: u64,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Add bytes read from the stream.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend(data);
    }

    /// The next complete message, if one is buffered. Empty frames (a stray
    /// delimiter, or garbage with no `key=value` in it) are skipped.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        loop {
            let unread = self.buf.unread();
            let from = self.scanned;
            let found = find(&unread[from..], MSG_DELIM).map(|i| from + i);
            let Some(end) = found else {
                // Keep the last 3 bytes unscanned: a delimiter may straddle reads.
                self.scanned = unread.len().saturating_sub(MSG_DELIM.len() - 1);
                if unread.len() > MAX_MESSAGE {
                    return Err(DecodeError::TooLong(MAX_MESSAGE));
                }
                return Ok(None);
            };
            let (msg, skipped) = parse_body(&unread[..end]);
            self.buf.consume(end + MSG_DELIM.len());
            self.scanned = 0;
            self.skipped += skipped as u64;
            if !msg.pairs.is_empty() {
                return Ok(Some(msg));
            }
        }
    }

    /// Segments that were not `key=value` pairs, skipped so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Bytes buffered that do not yet form a whole message.
    pub fn pending(&self) -> usize {
        self.buf.unread().len()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A wall-clock time in microseconds since the epoch, as the core parses it:
/// `SECONDS.MICROSECONDS`, the microseconds zero-padded to 6 digits (the core
/// reads them with `strtoul`, so `1.5` would mean 5 µs, not half a second).
pub fn format_timeval(unix_us: u64) -> String {
    format!("{}.{:06}", unix_us / 1_000_000, unix_us % 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(pairs: &[(&str, &str)]) -> Message {
        Message {
            pairs: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn drain(d: &mut Decoder) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(m) = d.next_message().unwrap() {
            out.push(m);
        }
        out
    }

    #[test]
    fn encodes_pairs_then_delimiter() {
        let bytes = encode([("job_id", "7"), ("type", "0")]);
        assert_eq!(bytes, b"job_id=7\0type=0\0\x01\0\0\0");
    }

    #[test]
    fn round_trip() {
        let m = msg(&[
            ("job_id", "12"),
            ("type", "0"),
            ("command", "/usr/lib/nagios/plugins/check_dummy 0 'a = b'"),
            ("timeout", "60"),
            ("outstd", "OK - fine|x=1;2;3\nlong text\x01 with SOH"),
            ("empty", ""),
        ]);
        let bytes = encode(m.pairs.iter().map(|(k, v)| (k, v)));
        let mut d = Decoder::new();
        d.feed(&bytes);
        assert_eq!(drain(&mut d), vec![m]);
        assert_eq!(d.pending(), 0);
        assert_eq!(d.skipped(), 0);
    }

    #[test]
    fn value_may_contain_equals_sign() {
        let (m, skipped) = parse_body(b"command=check_x -a=b\0");
        assert_eq!(m.get("command"), Some("check_x -a=b"));
        assert_eq!(skipped, 0);
    }

    #[test]
    fn nul_bytes_are_stripped_from_values_and_keys() {
        let bytes = encode([("out\0std", "a\0b\0\0c")]);
        assert_eq!(bytes, b"outstd=abc\0\x01\0\0\0");
        let mut d = Decoder::new();
        d.feed(&bytes);
        assert_eq!(drain(&mut d), vec![msg(&[("outstd", "abc")])]);
    }

    #[test]
    fn nul_stripping_keeps_a_delimiter_out_of_the_value() {
        // Plugin output that itself contains the delimiter bytes must not end
        // the message early once NULs are stripped.
        let bytes = encode([("outstd", "x\x01\0\0\0y"), ("exited_ok", "1")]);
        let mut d = Decoder::new();
        d.feed(&bytes);
        assert_eq!(
            drain(&mut d),
            vec![msg(&[("outstd", "x\x01y"), ("exited_ok", "1")])]
        );
    }

    #[test]
    fn message_split_across_every_possible_read_boundary() {
        let one = encode([("job_id", "1"), ("command", "check_a")]);
        let two = encode([("job_id", "2"), ("command", "check_b")]);
        let stream = [one.clone(), two.clone()].concat();
        for cut in 0..=stream.len() {
            let mut d = Decoder::new();
            d.feed(&stream[..cut]);
            let mut got = drain(&mut d);
            d.feed(&stream[cut..]);
            got.extend(drain(&mut d));
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert_eq!(got[0].get("job_id"), Some("1"));
            assert_eq!(got[1].get("job_id"), Some("2"));
        }
    }

    #[test]
    fn message_fed_one_byte_at_a_time() {
        let stream = encode([("job_id", "9"), ("timeout", "30")]);
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &stream {
            d.feed(std::slice::from_ref(b));
            got.extend(drain(&mut d));
        }
        assert_eq!(got, vec![msg(&[("job_id", "9"), ("timeout", "30")])]);
    }

    #[test]
    fn several_messages_in_one_read() {
        let mut bytes = Vec::new();
        for i in 0..100 {
            encode_into([("job_id", i.to_string())], &mut bytes);
        }
        let mut d = Decoder::new();
        d.feed(&bytes);
        let got = drain(&mut d);
        assert_eq!(got.len(), 100);
        for (i, m) in got.iter().enumerate() {
            assert_eq!(m.get("job_id"), Some(i.to_string().as_str()));
        }
    }

    #[test]
    fn garbage_between_messages_is_skipped() {
        let mut bytes = b"OK\0".to_vec(); // e.g. a registration answer read late
        encode_into([("job_id", "1")], &mut bytes);
        bytes.extend_from_slice(b"\x01\0\0\0"); // a stray delimiter
        bytes.extend_from_slice(b"noise without pairs\0\x01\0\0\0");
        bytes.extend_from_slice(b"junk\0\xff\xfe\0");
        encode_into([("job_id", "2")], &mut bytes);
        let mut d = Decoder::new();
        d.feed(&bytes);
        let got = drain(&mut d);
        assert_eq!(got, vec![msg(&[("job_id", "1")]), msg(&[("job_id", "2")]),]);
        assert_eq!(d.skipped(), 4); // "OK", "noise…", "junk", "\xff\xfe"
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let mut d = Decoder::new();
        d.feed(b"outstd=a\xffb\0\x01\0\0\0");
        let got = drain(&mut d);
        assert_eq!(got[0].get("outstd"), Some("a\u{fffd}b"));
    }

    #[test]
    fn endless_stream_without_delimiter_is_an_error() {
        let mut d = Decoder::new();
        let chunk = vec![b'a'; 1024 * 1024];
        let mut err = None;
        for _ in 0..(MAX_MESSAGE / chunk.len() + 2) {
            d.feed(&chunk);
            if let Err(e) = d.next_message() {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(DecodeError::TooLong(MAX_MESSAGE)));
    }

    #[test]
    fn buffer_is_compacted_over_a_long_stream() {
        let mut d = Decoder::new();
        let pad = "x".repeat(1000);
        let one = encode([("job_id", "1"), ("pad", pad.as_str())]);
        for _ in 0..10_000 {
            d.feed(&one[..500]);
            assert!(d.next_message().unwrap().is_none());
            d.feed(&one[500..]);
            assert!(d.next_message().unwrap().is_some());
        }
        assert!(d.buf.capacity() < 1024 * 1024, "{}", d.buf.capacity());
    }

    #[test]
    fn compaction_with_a_short_tail_after_a_big_message() {
        let pad = "x".repeat(100 * 1024);
        let big = encode([("job_id", "1"), ("pad", pad.as_str())]);
        let next = encode([("job_id", "2")]);
        let mut d = Decoder::new();
        d.feed(&big);
        d.feed(&next[..2]); // a tail shorter than the delimiter
        assert_eq!(d.next_message().unwrap().unwrap().get("job_id"), Some("1"));
        assert!(d.next_message().unwrap().is_none());
        d.feed(&next[2..]); // compacts: the consumed big message goes
        assert_eq!(d.next_message().unwrap().unwrap().get("job_id"), Some("2"));
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn random_messages_in_random_chunks() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut expected = Vec::new();
        let mut stream = Vec::new();
        for i in 0..2000 {
            let len = [0, 1, 3, 4, 5, 100, 70_000][rand(7)];
            // Values with SOH, NUL and '=' in them; NULs are stripped on encode.
            let value: Vec<u8> = (0..len).map(|_| b"ab=\x01\0z"[rand(6)]).collect();
            let job_id = i.to_string();
            encode_into(
                [("job_id".as_bytes(), job_id.as_bytes()), (b"v", &value)],
                &mut stream,
            );
            let stripped: Vec<u8> = value.into_iter().filter(|&b| b != 0).collect();
            expected.push((job_id, String::from_utf8(stripped).unwrap()));
        }
        let mut d = Decoder::new();
        let mut got = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            let n = (1 + rand(9000)).min(stream.len() - at);
            d.feed(&stream[at..at + n]);
            at += n;
            while let Some(m) = d.next_message().unwrap() {
                got.push((
                    m.get("job_id").unwrap().to_string(),
                    m.get("v").unwrap().to_string(),
                ));
            }
        }
        assert_eq!(got, expected);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn timeval_has_six_digit_microseconds() {
        assert_eq!(format_timeval(1_700_000_000_000_005), "1700000000.000005");
        assert_eq!(format_timeval(1_700_000_000_500_000), "1700000000.500000");
        assert_eq!(format_timeval(1_700_000_000_999_999), "1700000000.999999");
        assert_eq!(format_timeval(0), "0.000000");
        assert_eq!(format_timeval(42), "0.000042");
    }
}
