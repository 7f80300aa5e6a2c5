//! The daemon's wire protocol: newline-delimited JSON over a Unix stream socket.
//!
//! Every wire type and all request parsing live here, so `PROTOCOL.md`, the
//! server and the client commands agree by construction. One request per
//! line, one JSON object per response line; answers to pipelined submits come
//! back in completion order, matched by the client-chosen `id`.

use crate::metrics::MetricsSnapshot;
use crate::result::CheckResult;
use crate::state::State;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// A client-chosen request id: a JSON string or number, echoed back verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClientId {
    /// A string id.
    Str(String),
    /// A numeric id.
    Num(serde_json::Number),
}

impl ClientId {
    /// The id as plain text (a string without quotes), e.g. for the check's tag.
    pub fn as_text(&self) -> String {
        match self {
            ClientId::Str(s) => s.clone(),
            ClientId::Num(n) => n.to_string(),
        }
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientId::Str(s) => write!(f, "{s:?}"),
            ClientId::Num(n) => write!(f, "{n}"),
        }
    }
}

/// A duration on the wire: a number of seconds (`10`, `0.5`) or a string (`"10s"`, `"500ms"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WireDuration(pub Duration);

impl<'de> Deserialize<'de> for WireDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(f64),
            Text(String),
            Other(serde::de::IgnoredAny),
        }
        match Raw::deserialize(d)? {
            Raw::Other(_) => Err(serde::de::Error::custom(
                "a duration is a number of seconds or a string such as \"10s\" or \"500ms\"",
            )),
            Raw::Secs(s) if s.is_finite() && (0.0..=1e9).contains(&s) => {
                Ok(WireDuration(Duration::from_secs_f64(s)))
            }
            Raw::Secs(s) => {
                // 1e300 would print as 301 digits.
                let shown = if s.abs() < 1e12 {
                    format!("{s}")
                } else {
                    format!("{s:e}")
                };
                Err(serde::de::Error::custom(format!(
                    "duration {shown} seconds is out of range (0 to 1e9 seconds)"
                )))
            }
            Raw::Text(t) => crate::units::parse_duration(&t)
                .map(WireDuration)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// A byte size on the wire: a number of bytes or a string (`"64k"`, `"1MiB"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WireSize(pub usize);

impl<'de> Deserialize<'de> for WireSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
            Other(serde::de::IgnoredAny),
        }
        match Raw::deserialize(d)? {
            Raw::Other(_) => Err(serde::de::Error::custom(
                "a size is a whole number of bytes or a string such as \"64k\" or \"1MiB\"",
            )),
            Raw::Bytes(n) => usize::try_from(n)
                .map(WireSize)
                .map_err(|_| serde::de::Error::custom("size is too large")),
            Raw::Text(t) => crate::units::parse_size(&t)
                .map(WireSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// `{"op":"submit", ...}`: run one check. Exactly one of `argv` / `command_line`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubmitRequest {
    /// Client-chosen id; must not be in flight on the same connection.
    pub id: Option<ClientId>,
    /// Program and arguments (no shell).
    pub argv: Option<Vec<String>>,
    /// A Nagios-style command line (split like Nagios; shell only for metacharacters).
    pub command_line: Option<String>,
    /// Time before SIGTERM (default: the daemon's).
    pub timeout: Option<WireDuration>,
    /// Time between SIGTERM and SIGKILL (default: the daemon's).
    pub grace: Option<WireDuration>,
    /// Variables to set (added to the daemon's environment unless `env_clear`).
    pub env: Option<BTreeMap<String, String>>,
    /// Start from an empty environment.
    pub env_clear: bool,
    /// Working directory.
    pub cwd: Option<String>,
    /// Bytes kept per output stream (default: the daemon's).
    pub output_cap: Option<WireSize>,
    /// State reported on timeout (default UNKNOWN).
    pub timeout_state: Option<State>,
    /// Any JSON, echoed back in the result.
    pub tags: Option<serde_json::Value>,
}

/// `{"op":"cancel","id":...}`: kill a check of this connection that is still in flight.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// The id the check was submitted with.
    pub id: ClientId,
}

/// `{"op":"stats"}` / `{"op":"ping"}`: an optional id to echo back.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlainRequest {
    /// Echoed back in the answer.
    #[serde(default)]
    pub id: Option<ClientId>,
}

/// One parsed request line.
#[derive(Debug, Clone)]
pub enum Request {
    /// Run a check.
    Submit(Box<SubmitRequest>),
    /// Cancel a check.
    Cancel(CancelRequest),
    /// Metrics.
    Stats(PlainRequest),
    /// Liveness.
    Ping(PlainRequest),
}

/// Stable, machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, a missing or mistyped field, an unknown field, or an invalid check.
    BadRequest,
    /// `op` names no operation.
    UnknownOp,
    /// The line exceeded the daemon's line limit; the rest of the line was skipped.
    LineTooLong,
    /// The line is not valid UTF-8.
    InvalidUtf8,
    /// Every running slot and the whole waiting queue are taken; retry later.
    QueueFull,
    /// A check with this id is still in flight on this connection.
    DuplicateId,
    /// The daemon is stopping and accepts no new checks.
    ShuttingDown,
    /// `cancel` named no check in flight on this connection.
    NotFound,
    /// The daemon serves `max_clients` connections already; this one is closed.
    TooManyClients,
}

impl ErrorCode {
    /// Every code, for metrics.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownOp,
        ErrorCode::LineTooLong,
        ErrorCode::InvalidUtf8,
        ErrorCode::QueueFull,
        ErrorCode::DuplicateId,
        ErrorCode::ShuttingDown,
        ErrorCode::NotFound,
        ErrorCode::TooManyClients,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::LineTooLong => "line_too_long",
            ErrorCode::InvalidUtf8 => "invalid_utf8",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::DuplicateId => "duplicate_id",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooManyClients => "too_many_clients",
        }
    }
}

/// A request that could not be served: its code, message and whatever id was readable.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    /// The stable code.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
    /// The request's id, if it could be read.
    pub id: Option<ClientId>,
    /// The request's op, if it could be read.
    pub op: Option<String>,
}

impl RequestError {
    /// An error with no id or op.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> RequestError {
        RequestError {
            code,
            message: message.into(),
            id: None,
            op: None,
        }
    }

    /// The same error, naming the request it answers.
    pub fn about(mut self, id: Option<ClientId>, op: Option<&str>) -> RequestError {
        self.id = id;
        self.op = op.map(str::to_string);
        self
    }

    /// The response line for this error.
    pub fn into_response(self) -> Response {
        Response::Error {
            id: self.id,
            op: self.op,
            code: self.code,
            message: self.message,
        }
    }
}

/// Daemon-level counters, reported next to the engine's in `stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DaemonCounters {
    /// Connections accepted since start.
    pub connections_accepted: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// Request lines read (including bad ones).
    pub requests: u64,
    /// Submits accepted by the engine.
    pub submits_accepted: u64,
    /// Results written to clients.
    pub results_sent: u64,
    /// Results that had nowhere to go (client gone or dropped).
    pub results_dropped: u64,
    /// Error responses, all codes.
    pub errors: u64,
    /// Error responses by code (`bad_request`, `queue_full`, …).
    pub errors_by_code: BTreeMap<String, u64>,
    /// Clients dropped because they stopped reading their responses.
    pub clients_dropped_stuck: u64,
    /// Clients that hung up with checks in flight (those checks are cancelled).
    pub clients_gone_in_flight: u64,
    /// The Prometheus endpoint's bound address, if enabled.
    pub metrics_address: Option<String>,
    /// Whether shutdown has begun.
    pub shutting_down: bool,
}

/// One response line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// The one answer to an accepted submit.
    Result {
        /// The submit's id.
        id: ClientId,
        /// The submit's tags, echoed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tags: Option<serde_json::Value>,
        /// The full result.
        result: Box<CheckResult>,
    },
    /// A request that was not served.
    Error {
        /// The request's id, when it could be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ClientId>,
        /// The request's op, when it could be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        op: Option<String>,
        /// Stable machine-readable code.
        code: ErrorCode,
        /// For people.
        message: String,
    },
    /// The answer to `stats`.
    Stats {
        /// The request's id, if given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ClientId>,
        /// The engine's histograms percentiles and counters.
        engine: Box<MetricsSnapshot>,
        /// The daemon's own counters.
        daemon: DaemonCounters,
    },
    /// The answer to `ping`.
    Pong {
        /// The request's id, if given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ClientId>,
        /// The daemon's version.
        version: String,
    },
}

/// Parse one request line (already UTF-8, newline stripped).
pub fn parse_request(line: &str) -> Result<Request, RequestError> {
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| RequestError::new(ErrorCode::BadRequest, format!("not valid JSON: {e}")))?;
    let serde_json::Value::Object(mut map) = value else {
        return Err(RequestError::new(
            ErrorCode::BadRequest,
            "a request must be a JSON object with an \"op\" field",
        ));
    };
    // Read id and op first so every later error can name them.
    let id = map
        .get("id")
        .and_then(|v| serde_json::from_value::<ClientId>(v.clone()).ok());
    let err = |code, message: String, op: Option<&str>| {
        RequestError::new(code, message).about(id.clone(), op)
    };
    let op = match map.remove("op") {
        Some(serde_json::Value::String(op)) => op,
        Some(_) => {
            return Err(err(
                ErrorCode::BadRequest,
                "\"op\" must be a string".into(),
                None,
            ));
        }
        None => {
            return Err(err(
                ErrorCode::BadRequest,
                "missing \"op\" (one of submit, cancel, stats, ping)".into(),
                None,
            ));
        }
    };
    let rest = serde_json::Value::Object(map);
    let bad = |e: serde_json::Error| err(ErrorCode::BadRequest, format!("{op}: {e}"), Some(&op));
    match op.as_str() {
        "submit" => {
            let req: SubmitRequest = serde_json::from_value(rest).map_err(bad)?;
            if req.id.is_none() {
                return Err(err(
                    ErrorCode::BadRequest,
                    "submit: missing \"id\" (a string or number of your choice)".into(),
                    Some(&op),
                ));
            }
            Ok(Request::Submit(Box::new(req)))
        }
        "cancel" => Ok(Request::Cancel(serde_json::from_value(rest).map_err(bad)?)),
        "stats" => Ok(Request::Stats(serde_json::from_value(rest).map_err(bad)?)),
        "ping" => Ok(Request::Ping(serde_json::from_value(rest).map_err(bad)?)),
        other => Err(err(
            ErrorCode::UnknownOp,
            format!("unknown op {other:?} (expected submit, cancel, stats or ping)"),
            Some(other),
        )),
    }
}

/// Serialize a response as one line (with the trailing newline) onto `out`.
pub fn write_response(out: &mut Vec<u8>, response: &Response) {
    if serde_json::to_writer(&mut *out, response).is_err() {
        // Only a non-string map key could fail; none of our types has one.
        out.extend_from_slice(
            br#"{"type":"error","code":"bad_request","message":"internal: response not serializable"}"#,
        );
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_submit_with_every_field() {
        let r = parse_request(
            r#"{"op":"submit","id":7,"argv":["/bin/echo","x"],"timeout":"2s","grace":1.5,
                "env":{"A":"1"},"env_clear":true,"cwd":"/","output_cap":"4k",
                "timeout_state":"CRITICAL","tags":{"host":"a"}}"#,
        )
        .unwrap();
        let Request::Submit(s) = r else { panic!() };
        assert_eq!(s.id, Some(ClientId::Num(7.into())));
        assert_eq!(s.timeout, Some(WireDuration(Duration::from_secs(2))));
        assert_eq!(s.grace, Some(WireDuration(Duration::from_millis(1500))));
        assert_eq!(s.output_cap, Some(WireSize(4096)));
        assert_eq!(s.timeout_state, Some(State::Critical));
    }

    #[test]
    fn classifies_bad_requests() {
        let e = parse_request("{nope").unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = parse_request("[1]").unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = parse_request(r#"{"op":"frobnicate","id":"a"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownOp);
        assert_eq!(e.id, Some(ClientId::Str("a".into())));
        let e = parse_request(r#"{"op":"submit","id":1,"argv":["x"],"colour":"red"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("colour"), "{}", e.message);
        assert_eq!(e.id, Some(ClientId::Num(1.into())));
        let e = parse_request(r#"{"op":"submit","argv":["x"]}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = parse_request(r#"{"op":"cancel"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e =
            parse_request(r#"{"op":"submit","id":1,"argv":["x"],"timeout":1e300}"#).unwrap_err();
        assert!(
            e.message.contains("1e300 seconds is out of range"),
            "{}",
            e.message
        );
        for bad in ["-1", "1.5", "true", "[1]"] {
            let line = format!(r#"{{"op":"submit","id":1,"argv":["x"],"output_cap":{bad}}}"#);
            let e = parse_request(&line).unwrap_err();
            assert!(
                e.message.contains("a size is a whole number"),
                "{bad}: {}",
                e.message
            );
        }
        let e = parse_request(r#"{"op":"submit","id":1,"argv":["x"],"timeout":true}"#).unwrap_err();
        assert!(
            e.message.contains("a duration is a number"),
            "{}",
            e.message
        );
        assert!(e.message.len() < 200, "{}", e.message);
    }

    #[test]
    fn error_response_round_trips() {
        let mut out = Vec::new();
        write_response(
            &mut out,
            &RequestError::new(ErrorCode::QueueFull, "full").into_response(),
        );
        let line = String::from_utf8(out).unwrap();
        assert_eq!(
            line,
            "{\"type\":\"error\",\"code\":\"queue_full\",\"message\":\"full\"}\n"
        );
        let back: Response = serde_json::from_str(&line).unwrap();
        assert!(matches!(
            back,
            Response::Error {
                code: ErrorCode::QueueFull,
                ..
            }
        ));
    }
}
