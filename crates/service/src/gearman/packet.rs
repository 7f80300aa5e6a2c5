//! The gearman binary protocol: packets of a 12-byte header (`\0REQ` or
//! `\0RES`, a big-endian type and a big-endian length) and NUL-separated
//! arguments, the last of which may itself hold NULs.
//!
//! Only what a worker and a background client need is named here; see
//! gearmand's `PROTOCOL` file for the rest.

use crate::readbuf::ReadBuf;

/// Request magic (client or worker to server).
pub const REQ: [u8; 4] = *b"\0REQ";
/// Response magic (server to client or worker).
pub const RES: [u8; 4] = *b"\0RES";
/// Header length.
pub const HEADER: usize = 12;
/// Largest packet accepted from a server. mod_gearman jobs and results are
/// a few KiB; a bigger length is a broken or hostile peer.
pub const MAX_PACKET: usize = 16 << 20;

/// Packet types this crate sends or reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// Worker: I can run this function.
    CanDo = 1,
    /// Worker: I no longer run this function.
    CantDo = 2,
    /// Worker: wake me with NOOP when a job comes.
    PreSleep = 4,
    /// Server: there may be work (wakes a sleeping worker).
    Noop = 6,
    /// Client: run this job and tell me its result.
    SubmitJob = 7,
    /// Server: the job was queued, here is its handle.
    JobCreated = 8,
    /// Worker: give me a job.
    GrabJob = 9,
    /// Server: no job for you now.
    NoJob = 10,
    /// Server: a job (handle, function, data).
    JobAssign = 11,
    /// Worker: this job is done (handle, data).
    WorkComplete = 13,
    /// Worker: this job failed (handle).
    WorkFail = 14,
    /// Echo request.
    EchoReq = 16,
    /// Echo response.
    EchoRes = 17,
    /// Client: queue this job, don't tell me its result.
    SubmitJobBg = 18,
    /// Server: an error (code, text).
    Error = 19,
    /// Worker: the name shown in `gearadmin --workers`.
    SetClientId = 22,
}

impl Kind {
    /// The type for a number, if it is one of ours.
    pub fn from_u32(n: u32) -> Option<Kind> {
        Some(match n {
            1 => Kind::CanDo,
            2 => Kind::CantDo,
            4 => Kind::PreSleep,
            6 => Kind::Noop,
            7 => Kind::SubmitJob,
            8 => Kind::JobCreated,
            9 => Kind::GrabJob,
            10 => Kind::NoJob,
            11 => Kind::JobAssign,
            13 => Kind::WorkComplete,
            14 => Kind::WorkFail,
            16 => Kind::EchoReq,
            17 => Kind::EchoRes,
            18 => Kind::SubmitJobBg,
            19 => Kind::Error,
            22 => Kind::SetClientId,
            _ => return None,
        })
    }

    /// How many arguments a packet of this type carries.
    pub fn arity(self) -> usize {
        match self {
            Kind::PreSleep | Kind::Noop | Kind::GrabJob | Kind::NoJob => 0,
            Kind::CanDo
            | Kind::CantDo
            | Kind::JobCreated
            | Kind::WorkFail
            | Kind::EchoReq
            | Kind::EchoRes
            | Kind::SetClientId => 1,
            Kind::WorkComplete | Kind::Error => 2,
            Kind::SubmitJob | Kind::JobAssign | Kind::SubmitJobBg => 3,
        }
    }
}

/// One decoded packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Its type.
    pub kind: Kind,
    /// Its arguments (exactly `kind.arity()` of them).
    pub args: Vec<Vec<u8>>,
}

impl Packet {
    /// Argument `i` as text (lossy), for logs and handles.
    pub fn text(&self, i: usize) -> String {
        self.args
            .get(i)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .unwrap_or_default()
    }
}

/// Why a server's bytes could not be read as packets: the connection is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// The header did not start with `\0RES` (or `\0REQ`).
    #[error("bad packet magic {0:?}: not a gearman server")]
    Magic([u8; 4]),
    /// A packet type this worker does not know.
    #[error("unknown packet type {0}")]
    UnknownType(u32),
    /// A length past [`MAX_PACKET`].
    #[error("packet of {0} bytes is larger than the {MAX_PACKET}-byte bound")]
    TooLarge(usize),
    /// Fewer NUL separators than the type needs.
    #[error("packet type {0:?} has too few arguments")]
    Arguments(Kind),
}

/// Append one packet to `out`.
pub fn encode_into(magic: [u8; 4], kind: Kind, args: &[&[u8]], out: &mut Vec<u8>) {
    debug_assert_eq!(args.len(), kind.arity());
    let len: usize = args.iter().map(|a| a.len()).sum::<usize>() + args.len().saturating_sub(1);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&(kind as u32).to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(a);
    }
}

/// One request packet.
pub fn request(kind: Kind, args: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_into(REQ, kind, args, &mut v);
    v
}

/// A worker done with job `handle`: WORK_COMPLETE (no result data), then
/// GRAB_JOB for the next, appended to `out`.
pub fn complete_and_grab(handle: &[u8], out: &mut Vec<u8>) {
    encode_into(REQ, Kind::WorkComplete, &[handle, b""], out);
    encode_into(REQ, Kind::GrabJob, &[], out);
}

/// Split a stream of bytes into packets.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: ReadBuf,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Add bytes read from the socket.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend(data);
    }

    /// The next whole packet, `None` until one is complete.
    pub fn next_packet(&mut self) -> Result<Option<Packet>, PacketError> {
        let rest = self.buf.unread();
        if rest.len() < HEADER {
            return Ok(None);
        }
        let magic: [u8; 4] = rest[0..4].try_into().expect("4 bytes");
        if magic != RES && magic != REQ {
            return Err(PacketError::Magic(magic));
        }
        let n = u32::from_be_bytes(rest[4..8].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(rest[8..12].try_into().expect("4 bytes")) as usize;
        if len > MAX_PACKET {
            return Err(PacketError::TooLarge(len));
        }
        let kind = Kind::from_u32(n).ok_or(PacketError::UnknownType(n))?;
        if rest.len() < HEADER + len {
            return Ok(None);
        }
        let body = &rest[HEADER..HEADER + len];
        let args = split_args(kind, body)?;
        self.buf.consume(HEADER + len);
        Ok(Some(Packet { kind, args }))
    }
}

/// The arguments of a body: `arity - 1` NUL-terminated ones, then the rest.
fn split_args(kind: Kind, body: &[u8]) -> Result<Vec<Vec<u8>>, PacketError> {
    let arity = kind.arity();
    if arity == 0 {
        return Ok(Vec::new());
    }
    let mut args = Vec::with_capacity(arity);
    let mut rest = body;
    for _ in 0..arity - 1 {
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(PacketError::Arguments(kind))?;
        args.push(rest[..nul].to_vec());
        rest = &rest[nul + 1..];
    }
    args.push(rest.to_vec());
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(kind: Kind, args: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_into(RES, kind, args, &mut v);
        v
    }

    #[test]
    fn a_job_assign_splits_into_handle_function_and_data_with_nuls() {
        let bytes = response(Kind::JobAssign, &[b"H:x:1", b"service", b"a\0b"]);
        let mut d = Decoder::new();
        // Byte by byte: no packet until the last byte.
        for (i, b) in bytes.iter().enumerate() {
            d.feed(&[*b]);
            let got = d.next_packet().unwrap();
            if i + 1 < bytes.len() {
                assert_eq!(got, None);
            } else {
                let p = got.unwrap();
                assert_eq!(p.kind, Kind::JobAssign);
                assert_eq!(
                    p.args,
                    vec![b"H:x:1".to_vec(), b"service".to_vec(), b"a\0b".to_vec()]
                );
            }
        }
    }

    #[test]
    fn the_header_is_gearmands_layout() {
        assert_eq!(
            request(Kind::CanDo, &[b"host"]),
            b"\0REQ\0\0\0\x01\0\0\0\x04host".to_vec()
        );
        assert_eq!(
            request(Kind::GrabJob, &[]),
            b"\0REQ\0\0\0\x09\0\0\0\0".to_vec()
        );
    }

    #[test]
    fn complete_and_grab_is_work_complete_then_grab_job() {
        let mut out = b"x".to_vec();
        complete_and_grab(b"H:x:1", &mut out);
        let mut want = b"x".to_vec();
        want.extend(request(Kind::WorkComplete, &[b"H:x:1", b""]));
        want.extend(request(Kind::GrabJob, &[]));
        assert_eq!(out, want);
    }

    #[test]
    fn garbage_is_an_error_not_a_hang() {
        let mut d = Decoder::new();
        d.feed(b"HTTP/1.1 200 OK\r\n");
        assert!(matches!(d.next_packet(), Err(PacketError::Magic(_))));
        let mut d = Decoder::new();
        d.feed(b"\0RES\0\0\0\x0b\xff\xff\xff\xff");
        assert!(matches!(d.next_packet(), Err(PacketError::TooLarge(_))));
        let mut d = Decoder::new();
        d.feed(&response(Kind::Noop, &[]));
        d.feed(b"\0RES\0\0\0\x0b\0\0\0\x03abc");
        assert_eq!(d.next_packet().unwrap().unwrap().kind, Kind::Noop);
        assert_eq!(
            d.next_packet(),
            Err(PacketError::Arguments(Kind::JobAssign))
        );
    }

    /// Random and mutated byte streams never panic the decoder, and every
    /// packet it yields has its type's number of arguments.
    #[test]
    fn random_bytes_are_packets_or_errors_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let valid = response(Kind::JobAssign, &[b"H:1", b"service", b"data"]);
        for round in 0..20_000 {
            let mut bytes = if round % 2 == 0 {
                valid.clone()
            } else {
                (0..(next() % 64)).map(|_| next() as u8).collect()
            };
            for _ in 0..(next() % 4) {
                if !bytes.is_empty() {
                    let i = (next() as usize) % bytes.len();
                    bytes[i] = next() as u8;
                }
            }
            let mut d = Decoder::new();
            let cut = (next() as usize) % (bytes.len() + 1);
            d.feed(&bytes[..cut]);
            d.feed(&bytes[cut..]);
            while let Ok(Some(p)) = d.next_packet() {
                assert_eq!(p.args.len(), p.kind.arity());
            }
        }
    }
}
