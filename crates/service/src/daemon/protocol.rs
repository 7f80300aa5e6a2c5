//! The daemon's wire protocol: newline-delimited JSON over a Unix stream socket.
//!
//! Every wire type and all request parsing live here, so `PROTOCOL.md`, the
//! server and the client commands agree by construction. One request per
//! line, one JSON object per response line; answers to pipelined submits come
//! back in completion order, matched by the client-chosen `id`.

use pidring::metrics::MetricsSnapshot;
use pidring::nagios_state::State;
use pidring::result::CheckResult;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::time::Duration;

/// A client-chosen request id: a JSON string or number, echoed back verbatim.
///
/// A numeric id keeps the text the client wrote (`18446744073709551616`,
/// `1e2`, `-0`): it is echoed as written, and two numeric ids are the same
/// id only when their text is the same. [`parse_request`] reads ids with
/// [`ClientId::from_raw`]; deserialized from anything else (a response read
/// back, a `serde_json::Value`) a number has already lost its text, and is
/// kept as serde_json prints it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum ClientId {
    /// A string id.
    Str(String),
    /// A numeric id.
    Num(NumId),
}

impl ClientId {
    /// The id in `raw`, one JSON value as the client wrote it: `None` for
    /// `null`, an error (for people) for anything but a string or a number.
    pub fn from_raw(raw: &RawValue) -> Result<Option<ClientId>, String> {
        let text = raw.get();
        match text.as_bytes().first() {
            Some(b'"') => serde_json::from_str(text)
                .map(|s| Some(ClientId::Str(s)))
                .map_err(|e| format!("\"id\" is not a valid string: {e}")),
            // RawValue holds valid JSON: this is a number, exactly as written.
            Some(b'-' | b'0'..=b'9') => Ok(Some(ClientId::Num(NumId(raw.to_owned())))),
            Some(b'n') => Ok(None),
            _ => Err(format!(
                "\"id\" must be a string or a number, not {}",
                shorten(text)
            )),
        }
    }

    /// The id as plain text (a string without quotes), e.g. for the check's tag.
    pub fn as_text(&self) -> String {
        match self {
            ClientId::Str(s) => s.clone(),
            ClientId::Num(n) => n.as_str().to_string(),
        }
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientId::Str(s) => write!(f, "{s:?}"),
            ClientId::Num(n) => f.write_str(n.as_str()),
        }
    }
}

impl<'de> Deserialize<'de> for ClientId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IdVisitor;
        impl serde::de::Visitor<'_> for IdVisitor {
            type Value = ClientId;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ClientId, E> {
                Ok(ClientId::Str(v.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<ClientId, E> {
                Ok(ClientId::Str(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ClientId, E> {
                Ok(ClientId::Num(v.into()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ClientId, E> {
                Ok(ClientId::Num(v.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ClientId, E> {
                serde_json::Number::from_f64(v)
                    .and_then(|n| RawValue::from_string(n.to_string()).ok())
                    .map(|raw| ClientId::Num(NumId(raw)))
                    .ok_or_else(|| E::custom("a numeric id must be finite"))
            }
        }
        d.deserialize_any(IdVisitor)
    }
}

/// A numeric [`ClientId`]: the number's JSON text, exactly as the client wrote it.
#[derive(Clone)]
pub struct NumId(Box<RawValue>);

impl NumId {
    /// The number's text (`42`, `18446744073709551616`, `1e2`).
    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for NumId {
    fn eq(&self, other: &NumId) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for NumId {}

impl std::hash::Hash for NumId {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.as_str().hash(h)
    }
}

impl std::fmt::Debug for NumId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for NumId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Written out as is by serde_json's serializers.
        self.0.serialize(s)
    }
}

macro_rules! num_id_from_integer {
    ($($t:ty),*) => {$(
        impl From<$t> for NumId {
            fn from(n: $t) -> NumId {
                NumId(
                    RawValue::from_string(n.to_string())
                        .expect("an integer's decimal text is a JSON number"),
                )
            }
        }
    )*};
}

num_id_from_integer!(u8, u16, u32, u64, usize, i8, i16, i32, i64, isize);

/// `text` for an error message, cut to a readable length.
fn shorten(text: &str) -> String {
    const MAX: usize = 40;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
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
            Raw::Text(t) => pidring::units::parse_duration(&t)
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
            Raw::Text(t) => pidring::units::parse_size(&t)
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
    /// ([`parse_request`] reads it apart, keeping a number's text.)
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
    #[serde(deserialize_with = "env_each_once")]
    pub env: Option<BTreeMap<String, String>>,
    /// Start from an empty environment.
    pub env_clear: bool,
    /// Working directory.
    pub cwd: Option<String>,
    /// Bytes kept per output stream (default: the daemon's).
    pub output_cap: Option<WireSize>,
    /// State reported on timeout (default UNKNOWN).
    pub timeout_state: Option<State>,
    /// After a normal exit, kill what the check left (its process group,
    /// and its cgroup leaf with containment): default true. `false` for a
    /// check that must leave a service running (an event handler).
    pub kill_group_on_exit: Option<bool>,
    /// Most memory the check's processes may use together (`memory.max`
    /// of its cgroup; default: the daemon's `memory_max`, else none).
    pub memory_max: Option<WireSize>,
    /// Most processes the check may have at once (`pids.max`; default:
    /// the daemon's `pids_max`, else none).
    pub pids_max: Option<u64>,
    /// CPUs the check's processes may use together, e.g. 0.5 (`cpu.max`
    /// over a 100 ms period; default: the daemon's `cpu_max`, else none).
    pub cpu_max: Option<f64>,
    /// Run as this user instead of the daemon's `user`: only one listed in
    /// the daemon's `allowed_users` (else `forbidden`).
    pub user: Option<String>,
    /// Any JSON, echoed back in the result exactly as written
    /// ([`parse_request`] keeps its text; `null` is no tags).
    #[serde(skip)]
    pub tags: Option<Box<RawValue>>,
}

/// `env`, refusing a variable given twice (which value was meant is unknown,
/// and a validator in front of the daemon may have read the other one).
fn env_each_once<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    Ok(Option::<EnvVars>::deserialize(d)?.map(|e| e.0))
}

/// `env`'s object, each name once.
struct EnvVars(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for EnvVars {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Reads `env`'s object, refusing a repeated name.
        struct Vars;
        impl<'de> serde::de::Visitor<'de> for Vars {
            type Value = EnvVars;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of variable names to string values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<EnvVars, A::Error> {
                let mut env = BTreeMap::new();
                while let Some((name, value)) = map.next_entry::<String, String>()? {
                    if env.contains_key(&name) {
                        return Err(serde::de::Error::custom(format!(
                            "variable {name:?} given twice"
                        )));
                    }
                    env.insert(name, value);
                }
                Ok(EnvVars(env))
            }
        }
        d.deserialize_map(Vars)
    }
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
    /// Echoed back in the answer. ([`parse_request`] reads it apart,
    /// keeping a number's text.)
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
    /// The daemon's policy refuses it: a program outside `allowed_commands`,
    /// or a `user` not in `allowed_users`. Nothing was started.
    Forbidden,
}

impl ErrorCode {
    /// Every code, for metrics.
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownOp,
        ErrorCode::LineTooLong,
        ErrorCode::InvalidUtf8,
        ErrorCode::QueueFull,
        ErrorCode::DuplicateId,
        ErrorCode::ShuttingDown,
        ErrorCode::NotFound,
        ErrorCode::TooManyClients,
        ErrorCode::Forbidden,
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
            ErrorCode::Forbidden => "forbidden",
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
        /// The submit's tags, echoed as written.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tags: Option<Box<RawValue>>,
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
        /// The `[gearman]` worker's counters, when it runs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gearman: Option<Box<crate::gearman::GearmanStatsSnapshot>>,
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

/// The fields of a `cancel` but its id (read apart, by [`ClientId::from_raw`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelFields {
    /// Only named so that an unknown field's message lists it.
    #[serde(default, rename = "id")]
    _id: Option<serde::de::IgnoredAny>,
}

/// A request's top-level fields, each kept as the JSON text the client
/// wrote, and the first name that appeared twice.
///
/// A map would keep the last of two `"argv"`s silently, while a proxy or
/// validator in front of the daemon may have checked the first: a request
/// that says one thing twice is refused instead.
struct RequestFields {
    /// Every field's text, by name.
    fields: BTreeMap<String, Box<RawValue>>,
    /// The first field name seen more than once.
    duplicate: Option<String>,
}

impl<'de> Deserialize<'de> for RequestFields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Reads a JSON object's fields, noting a repeated name.
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = RequestFields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RequestFields, A::Error> {
                let mut fields = BTreeMap::new();
                let mut duplicate = None;
                while let Some((name, raw)) = map.next_entry::<String, Box<RawValue>>()? {
                    if fields.contains_key(&name) {
                        duplicate.get_or_insert_with(|| name.clone());
                    }
                    fields.insert(name, raw);
                }
                Ok(RequestFields { fields, duplicate })
            }
        }
        d.deserialize_map(Fields)
    }
}

/// Parse one request line (already UTF-8, newline stripped).
pub fn parse_request(line: &str) -> Result<Request, RequestError> {
    // Every field is first kept as the JSON text the client wrote, so that a
    // numeric id is echoed verbatim (a `Value` would round it to an f64).
    let RequestFields { fields, duplicate } = read_fields(line)?;
    // Read id and op first so every later error can name them.
    let (id, bad_id) = match fields.get("id").map(|raw| ClientId::from_raw(raw)) {
        None => (None, None),
        Some(Ok(id)) => (id, None),
        Some(Err(message)) => (None, Some(message)),
    };
    let op = read_op(&fields, &id)?;
    // Echoed as written, like the id: kept as text, never parsed further.
    let tags = fields
        .get("tags")
        .filter(|raw| raw.get() != "null")
        .cloned();
    if let Some(name) = duplicate {
        return Err(given_twice(&name, id, &op));
    }
    let request = OpRequest {
        line,
        fields: &fields,
        id,
        bad_id,
        op: &op,
    };
    match op.as_str() {
        "submit" => request.submit(tags),
        "cancel" => request.cancel(),
        "stats" | "ping" => request.plain(),
        other => Err(request.error(
            ErrorCode::UnknownOp,
            format!("unknown op {other:?} (expected submit, cancel, stats or ping)"),
        )),
    }
}

/// The line's top-level fields, or why it is not a JSON object.
fn read_fields(line: &str) -> Result<RequestFields, RequestError> {
    let not_json = |e: serde_json::Error| {
        RequestError::new(ErrorCode::BadRequest, format!("not valid JSON: {e}"))
    };
    match serde_json::from_str(line) {
        Ok(fields) => Ok(fields),
        Err(e) if e.classify() != serde_json::error::Category::Data => Err(not_json(e)),
        // Of another type than an object, or not JSON at all?
        Err(_) => Err(match serde_json::from_str::<serde::de::IgnoredAny>(line) {
            Ok(_) => RequestError::new(
                ErrorCode::BadRequest,
                "a request must be a JSON object with an \"op\" field",
            ),
            Err(e) => not_json(e),
        }),
    }
}

/// The request's `op`, a string every request must have.
fn read_op(
    fields: &BTreeMap<String, Box<RawValue>>,
    id: &Option<ClientId>,
) -> Result<String, RequestError> {
    let err =
        |message: &str| RequestError::new(ErrorCode::BadRequest, message).about(id.clone(), None);
    match fields
        .get("op")
        .map(|raw| serde_json::from_str::<String>(raw.get()))
    {
        Some(Ok(op)) => Ok(op),
        Some(Err(_)) => Err(err("\"op\" must be a string")),
        None => Err(err("missing \"op\" (one of submit, cancel, stats, ping)")),
    }
}

/// The error for a field given twice. Which of the two was meant is
/// unknown: neither is echoed.
fn given_twice(name: &str, id: Option<ClientId>, op: &str) -> RequestError {
    let id = if name == "id" { None } else { id };
    let op = (name != "op").then_some(op);
    RequestError::new(
        ErrorCode::BadRequest,
        format!("field {name:?} given twice; give each field once"),
    )
    .about(id, op)
}

/// A request whose id and op are read, each field given once: what reading
/// its op's own fields needs.
struct OpRequest<'a> {
    line: &'a str,
    fields: &'a BTreeMap<String, Box<RawValue>>,
    id: Option<ClientId>,
    /// Why the id could not be read (neither a string nor a number).
    bad_id: Option<String>,
    op: &'a str,
}

impl OpRequest<'_> {
    /// `submit`: the check to run, with the id it must have and its tags.
    fn submit(self, tags: Option<Box<RawValue>>) -> Result<Request, RequestError> {
        let mut req: SubmitRequest = self.read("tags")?;
        req.tags = tags;
        if self.id.is_none() {
            return Err(self
                .bad_request("submit: missing \"id\" (a string or number of your choice)".into()));
        }
        req.id = self.id;
        Ok(Request::Submit(Box::new(req)))
    }

    /// `cancel`: only the id of the check to cancel.
    fn cancel(self) -> Result<Request, RequestError> {
        let CancelFields { .. } = self.read("")?;
        match self.id {
            Some(id) => Ok(Request::Cancel(CancelRequest { id })),
            None => {
                Err(self
                    .bad_request("cancel: missing \"id\" (the id of the check to cancel)".into()))
            }
        }
    }

    /// `stats` or `ping`: at most an id to echo.
    fn plain(self) -> Result<Request, RequestError> {
        let mut req: PlainRequest = self.read("")?;
        req.id = self.id;
        Ok(if self.op == "stats" {
            Request::Stats(req)
        } else {
            Request::Ping(req)
        })
    }

    /// The op's own fields (all but id, op and `skip`) read into its type,
    /// once the id is known to be a string or a number.
    fn read<T: serde::de::DeserializeOwned>(&self, skip: &str) -> Result<T, RequestError> {
        if let Some(message) = &self.bad_id {
            return Err(self.bad_request(format!("{}: {message}", self.op)));
        }
        let f = OpFields::gather(self.fields, self.line.len(), skip);
        serde_json::from_str(&f.text).map_err(|e| self.bad_request(f.message(self.op, &e)))
    }

    /// A `bad_request` about this request.
    fn bad_request(&self, message: String) -> RequestError {
        self.error(ErrorCode::BadRequest, message)
    }

    /// An error about this request, naming its id and op.
    fn error(&self, code: ErrorCode, message: String) -> RequestError {
        RequestError::new(code, message).about(self.id.clone(), Some(self.op))
    }
}

/// A request's fields for its op, as one JSON object's text, with where
/// each field's `"name":value` lies in it.
struct OpFields<'a> {
    text: String,
    spans: Vec<(&'a str, usize, usize)>,
}

impl<'a> OpFields<'a> {
    /// The fields but id, op and `skip`, as one object's text, to read into
    /// the op's type directly: no `serde_json::Value` tree (about 20 times a
    /// line's size for `[{},{},…]`) is ever built.
    fn gather(
        fields: &'a BTreeMap<String, Box<RawValue>>,
        line_len: usize,
        skip: &str,
    ) -> OpFields<'a> {
        let mut text = String::with_capacity(line_len + 2);
        let mut spans = Vec::with_capacity(fields.len());
        text.push('{');
        for (name, raw) in fields {
            if name == "id" || name == "op" || name == skip {
                continue;
            }
            if text.len() > 1 {
                text.push(',');
            }
            let start = text.len();
            text.push_str(&serde_json::to_string(name).unwrap_or_default());
            text.push(':');
            text.push_str(raw.get());
            spans.push((name.as_str(), start, text.len()));
        }
        text.push('}');
        OpFields { text, spans }
    }

    /// The message for `op`'s error reading this text, naming the field (the
    /// position serde_json gives is in the rebuilt text, which means nothing
    /// to the client).
    fn message(&self, op: &str, e: &serde_json::Error) -> String {
        let at = e.column().saturating_sub(1);
        match self
            .spans
            .iter()
            .find(|(_, start, end)| (*start..=*end).contains(&at))
        {
            Some((name, ..)) if e.line() == 1 => {
                format!("{op}: {name:?}: {}", without_position(e))
            }
            _ => format!("{op}: {}", without_position(e)),
        }
    }
}

/// A serde_json error's message without its "at line 1 column N", for an
/// error about one field's text (whose positions mean nothing to the client).
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    text.strip_suffix(&suffix).unwrap_or(&text).to_string()
}

/// Serialize a response as one line (with the trailing newline) onto `out`.
pub fn write_response(out: &mut Vec<u8>, response: &Response) {
    // Writing into a Vec cannot fail.
    let _ = stream_response(out, response);
}

/// Serialize a response as one line (with the trailing newline) into
/// `out` as it goes, never holding the whole line: a result with 1 MiB of
/// control bytes on each stream is ~18 MiB of JSON (`\u0001` is 6 bytes).
/// Only `out`'s own errors are returned.
pub fn stream_response(out: &mut impl std::io::Write, response: &Response) -> std::io::Result<()> {
    if let Err(e) = serde_json::to_writer(&mut *out, response) {
        if e.is_io() {
            return Err(e.into());
        }
        // Only a non-string map key could fail; none of our types has one.
        out.write_all(
            br#"{"type":"error","code":"bad_request","message":"internal: response not serializable"}"#,
        )?;
    }
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_submit_with_every_field() {
        let r = parse_request(
            r#"{"op":"submit","id":7,"argv":["/bin/echo","x"],"timeout":"2s","grace":1.5,
                "env":{"A":"1"},"env_clear":true,"cwd":"/","output_cap":"4k",
                "timeout_state":"CRITICAL","kill_group_on_exit":false,"memory_max":"64MiB",
                "pids_max":32,"cpu_max":0.5,"tags":{"host":"a"}}"#,
        )
        .unwrap();
        let Request::Submit(s) = r else { panic!() };
        assert_eq!(s.id, Some(ClientId::Num(7.into())));
        assert_eq!(s.kill_group_on_exit, Some(false));
        assert_eq!(s.memory_max, Some(WireSize(64 << 20)));
        assert_eq!((s.pids_max, s.cpu_max), (Some(32), Some(0.5)));
        assert_eq!(s.timeout, Some(WireDuration(Duration::from_secs(2))));
        assert_eq!(s.grace, Some(WireDuration(Duration::from_millis(1500))));
        assert_eq!(s.output_cap, Some(WireSize(4096)));
        assert_eq!(s.timeout_state, Some(State::Critical));
        assert_eq!(s.tags.as_ref().map(|t| t.get()), Some(r#"{"host":"a"}"#));
        let r = parse_request(r#"{"op":"submit","id":7,"argv":["x"],"tags":null}"#).unwrap();
        let Request::Submit(s) = r else { panic!() };
        assert!(s.tags.is_none());
        let e = parse_request(r#"{"op":"cancel","id":7,"tags":{}}"#).unwrap_err();
        assert!(e.message.contains("tags"), "{}", e.message);
        // Any valid JSON, kept as text: even numbers no f64 can hold.
        let big = r#"{"n":1e400,"m":123456789012345678901234567890}"#;
        let r = parse_request(&format!(
            r#"{{"op":"submit","id":7,"argv":["x"],"tags":{big}}}"#
        ))
        .unwrap();
        let Request::Submit(s) = r else { panic!() };
        assert_eq!(s.tags.as_ref().map(|t| t.get()), Some(big));
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
    fn a_field_given_twice_is_refused() {
        let e =
            parse_request(r#"{"op":"submit","id":1,"argv":["/bin/true"],"argv":["/bin/false"]}"#)
                .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert_eq!(
            e.message,
            r#"field "argv" given twice; give each field once"#
        );
        assert_eq!(e.id, Some(ClientId::Num(1.into())));
        // Two ids: neither is echoed (which one the client meant is unknown).
        let e = parse_request(r#"{"op":"ping","id":1,"id":2}"#).unwrap_err();
        assert_eq!(e.id, None);
        assert!(e.message.contains(r#""id" given twice"#), "{}", e.message);
        let e = parse_request(r#"{"op":"ping","op":"stats"}"#).unwrap_err();
        assert!(e.message.contains(r#""op" given twice"#), "{}", e.message);
        let e =
            parse_request(r#"{"op":"submit","id":1,"argv":["x"],"env":{"PATH":"/a","PATH":"/b"}}"#)
                .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(
            e.message
                .starts_with(r#"submit: "env": variable "PATH" given twice"#),
            "{}",
            e.message
        );
        for env in [r#"null"#, r#"{"A":"1","B":"2"}"#] {
            let line = format!(r#"{{"op":"submit","id":1,"argv":["x"],"env":{env}}}"#);
            assert!(parse_request(&line).is_ok(), "{env}");
        }
        let e = parse_request(r#"{"op":"submit","id":1,"argv":["x"],"env":["A"]}"#).unwrap_err();
        assert!(e.message.contains("variable names"), "{}", e.message);
        // The same name nested inside a field is not a duplicate.
        let ok = parse_request(
            r#"{"op":"submit","id":1,"argv":["x"],"tags":{"a":1,"b":{"a":2},"id":3}}"#,
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    /// The answer `parse_request(line)` gets (its id echoed), as written on the wire.
    fn echo(line: &str) -> String {
        let response = match parse_request(line) {
            Ok(Request::Ping(p)) => Response::Pong {
                id: p.id,
                version: "v".into(),
            },
            Ok(other) => panic!("not a ping: {other:?}"),
            Err(e) => e.into_response(),
        };
        let mut out = Vec::new();
        write_response(&mut out, &response);
        String::from_utf8(out).unwrap()
    }

    fn submit_id(line: &str) -> ClientId {
        match parse_request(line) {
            Ok(Request::Submit(s)) => s.id.unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn numeric_ids_are_echoed_as_written() {
        for id in [
            "7",
            "18446744073709551616",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "1e2",
            "1E+2",
            "-0",
            "1.50",
            "0.1",
            "1e400",
        ] {
            let line = echo(&format!(r#"{{"op":"ping", "id" : {id} }}"#));
            assert_eq!(
                line,
                format!("{{\"type\":\"pong\",\"id\":{id},\"version\":\"v\"}}\n")
            );
            // Errors echo it too.
            let line = echo(&format!(r#"{{"op":"ping","id":{id},"colour":1}}"#));
            assert!(
                line.starts_with(&format!("{{\"type\":\"error\",\"id\":{id},")),
                "{line}"
            );
        }
        let id = submit_id(r#"{"op":"submit","id":18446744073709551616,"argv":["x"]}"#);
        assert_eq!(id.as_text(), "18446744073709551616");
        assert_eq!(id.to_string(), "18446744073709551616");
    }

    #[test]
    fn numeric_ids_are_the_same_only_when_written_the_same() {
        let id = |text: &str| submit_id(&format!(r#"{{"op":"submit","id":{text},"argv":["x"]}}"#));
        assert_ne!(id("18446744073709551616"), id("18446744073709551617"));
        assert_ne!(id("1e2"), id("100"));
        assert_ne!(id("0"), id("-0"));
        assert_ne!(
            id("7"),
            submit_id(r#"{"op":"submit","id":"7","argv":["x"]}"#)
        );
        assert_eq!(id("18446744073709551616"), id("18446744073709551616"));
        assert_eq!(id("7"), ClientId::Num(7.into()));
        let set: std::collections::HashSet<ClientId> =
            [id("18446744073709551616"), id("18446744073709551617")].into();
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn ids_that_are_not_strings_or_numbers_are_refused_by_name() {
        for (bad, shown) in [("true", "true"), ("[1]", "[1]"), ("{\"a\":1}", "{\"a\":1}")] {
            for op in ["submit", "cancel", "stats", "ping"] {
                let e = parse_request(&format!(r#"{{"op":"{op}","id":{bad},"argv":["x"]}}"#))
                    .unwrap_err();
                assert_eq!(e.code, ErrorCode::BadRequest);
                assert_eq!(e.op.as_deref(), Some(op));
                assert_eq!(
                    e.message,
                    format!("{op}: \"id\" must be a string or a number, not {shown}")
                );
            }
        }
        let long = format!("[{}]", "1,".repeat(100) + "1");
        let e = parse_request(&format!(r#"{{"op":"ping","id":{long}}}"#)).unwrap_err();
        assert!(e.message.len() < 100, "{}", e.message);
        // null is no id: fine for ping, missing for submit and cancel.
        assert!(matches!(
            parse_request(r#"{"op":"ping","id":null}"#),
            Ok(Request::Ping(PlainRequest { id: None }))
        ));
        let e = parse_request(r#"{"op":"cancel","id":null}"#).unwrap_err();
        assert!(e.message.contains("missing \"id\""), "{}", e.message);
        // A number out of f64's range elsewhere: refused, naming the field.
        let e =
            parse_request(r#"{"op":"submit","id":1,"argv":["x"],"timeout":1e400}"#).unwrap_err();
        assert_eq!(e.message, "submit: \"timeout\": number out of range");
        assert_eq!(e.id, Some(ClientId::Num(1.into())));
    }

    #[test]
    fn responses_read_back_keep_integer_ids() {
        let r: Response =
            serde_json::from_str(r#"{"type":"pong","id":18446744073709551615,"version":"v"}"#)
                .unwrap();
        let Response::Pong { id, .. } = r else {
            panic!()
        };
        assert_eq!(id, Some(ClientId::Num(u64::MAX.into())));
        let r: Response = serde_json::from_str(r#"{"type":"pong","id":-3,"version":"v"}"#).unwrap();
        let Response::Pong { id, .. } = r else {
            panic!()
        };
        assert_eq!(id.unwrap().to_string(), "-3");
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
