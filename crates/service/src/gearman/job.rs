//! mod_gearman's job and result texts: `key=value` lines, optionally
//! encrypted with AES-256-ECB (zero-padded key, no IV), always base64.
//!
//! Matches sni/mod_gearman (`common/gm_crypt.c`, `worker/worker_client.c`,
//! `neb_module_naemon/result_thread.c`) and ConSol's mod-gearman-worker-go
//! (`decrypt.go`, `encrypt.go`, `readAndExecute.go`).

use aes::Aes256;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit, generic_array::GenericArray};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::fmt::Write;

/// AES block size.
const BLOCK: usize = 16;
/// mod_gearman's key length: the secret truncated or NUL-padded to 32 bytes.
pub const KEY_BYTES: usize = 32;

/// How job and result bodies are sealed: AES-256-ECB with a key, or plain.
#[derive(Clone)]
pub struct Crypt {
    cipher: Option<Aes256>,
}

impl std::fmt::Debug for Crypt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = if self.cipher.is_some() {
            "aes-256-ecb"
        } else {
            "plain"
        };
        f.debug_struct("Crypt").field("mode", &mode).finish()
    }
}

impl Crypt {
    /// `encryption=no`: base64 only.
    pub fn plain() -> Crypt {
        Crypt { cipher: None }
    }

    /// `encryption=yes` with this secret (`key=` or the first line of `keyfile=`).
    /// Like mod_gearman, the secret ends at its first NUL, and is cut or
    /// NUL-padded to 32 bytes.
    pub fn with_secret(secret: &[u8]) -> Crypt {
        let mut key = [0u8; KEY_BYTES];
        for (k, &b) in key.iter_mut().zip(secret.iter().take_while(|&&b| b != 0)) {
            *k = b;
        }
        Crypt {
            cipher: Some(Aes256::new(GenericArray::from_slice(&key))),
        }
    }

    /// Whether bodies are encrypted.
    pub fn encrypts(&self) -> bool {
        self.cipher.is_some()
    }

    /// base64 → (decrypt) → text. The result has trailing NULs and blanks removed.
    pub fn open(&self, data: &[u8]) -> Result<Vec<u8>, JobError> {
        let trimmed = data.trim_ascii();
        let mut raw = BASE64
            .decode(trimmed)
            .map_err(|e| JobError::Base64(e.to_string()))?;
        if let Some(c) = &self.cipher {
            if raw.is_empty() || raw.len() % BLOCK != 0 {
                return Err(JobError::BlockSize(raw.len()));
            }
            for block in raw.chunks_exact_mut(BLOCK) {
                c.decrypt_block(GenericArray::from_mut_slice(block));
            }
        }
        while raw
            .last()
            .is_some_and(|&b| b == 0 || b.is_ascii_whitespace())
        {
            raw.pop();
        }
        Ok(raw)
    }

    /// text → (encrypt, padding with newlines as the Go worker does) → base64.
    pub fn seal(&self, text: &[u8]) -> Vec<u8> {
        let mut raw = text.to_vec();
        if let Some(c) = &self.cipher {
            let pad = (BLOCK - raw.len() % BLOCK) % BLOCK;
            raw.resize(raw.len() + pad, b'\n');
            for block in raw.chunks_exact_mut(BLOCK) {
                c.encrypt_block(GenericArray::from_mut_slice(block));
            }
        }
        BASE64.encode(raw).into_bytes()
    }
}

/// Why a job's data is not a job. It is logged and counted, never run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Not base64.
    #[error("not base64: {0}")]
    Base64(String),
    /// Encrypted data must be whole AES blocks.
    #[error("encrypted data of {0} bytes is not a whole number of 16-byte blocks")]
    BlockSize(usize),
    /// Did not start with `type=`: the wrong key, or not encrypted as configured.
    #[error(
        "does not decrypt to a mod_gearman job (no leading 'type='): check key/keyfile and encryption"
    )]
    NotAJob,
    /// A job of a kind this worker runs, without a command.
    #[error("the job has no command_line")]
    NoCommand,
}

/// One job as the core (mod_gearman's NEB module) sends it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Job {
    /// `type`: host, service, eventhandler, notification.
    pub kind: String,
    /// `result_queue`: where the result goes (empty: no result is sent).
    pub result_queue: String,
    /// `host_name`.
    pub host_name: String,
    /// `service_description` (empty for a host check).
    pub service_description: String,
    /// `core_time` (or `core_start_time`): when the core queued it, seconds since the epoch.
    pub core_time: f64,
    /// The same, as the core wrote it (echoed back verbatim as `core_start_time`).
    pub core_time_text: String,
    /// `next_check`, when given.
    pub next_check: f64,
    /// `timeout` in seconds (0: the worker's `job_timeout`).
    pub timeout: u64,
    /// `command_line`.
    pub command_line: String,
}

impl Job {
    /// Parse a decrypted job text.
    pub fn parse(text: &[u8]) -> Result<Job, JobError> {
        if !text.starts_with(b"type=") {
            return Err(JobError::NotAJob);
        }
        let text = String::from_utf8_lossy(text);
        let mut job = Job::default();
        for line in text.split('\n') {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let v = v.trim_matches(' ');
            match k.trim_matches(' ') {
                "type" => job.kind = v.to_string(),
                "result_queue" => job.result_queue = v.to_string(),
                "host_name" => job.host_name = v.to_string(),
                "service_description" => job.service_description = v.to_string(),
                "core_time" | "core_start_time" => {
                    job.core_time = v.parse().unwrap_or(0.0);
                    job.core_time_text = v.to_string();
                }
                "next_check" => job.next_check = v.parse().unwrap_or(0.0),
                // The Go worker takes "60.0" as 60 too.
                "timeout" => {
                    job.timeout = v
                        .parse::<u64>()
                        .ok()
                        .or_else(|| v.parse::<f64>().ok().filter(|t| *t > 0.0).map(|t| t as u64))
                        .unwrap_or(0)
                }
                "command_line" => job.command_line = v.to_string(),
                _ => {}
            }
        }
        Ok(job)
    }

    /// The job's text, as the NEB module writes it (for the Nagios bridge and tests).
    pub fn to_text(&self) -> String {
        let mut s = format!("type={}\n", self.kind);
        if !self.result_queue.is_empty() {
            let _ = writeln!(s, "result_queue={}", self.result_queue);
        }
        let _ = writeln!(s, "host_name={}", self.host_name);
        if !self.service_description.is_empty() {
            let _ = writeln!(s, "service_description={}", self.service_description);
        }
        if self.core_time_text.is_empty() {
            let _ = writeln!(s, "core_time={:.6}", self.core_time);
        } else {
            let _ = writeln!(s, "core_time={}", self.core_time_text);
        }
        let _ = writeln!(s, "timeout={}", self.timeout);
        let _ = writeln!(s, "command_line={}", self.command_line);
        s.push_str("\n\n");
        s
    }

    /// Whether the core expects a result for this job.
    pub fn wants_result(&self) -> bool {
        !self.result_queue.is_empty()
    }
}

/// One result, as the core's result thread reads it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answer {
    /// `type`: `active`, or `passive` for duplicated results (`dup_results_are_passive`).
    pub kind: &'static str,
    /// `host_name`.
    pub host_name: String,
    /// `service_description` (omitted when empty).
    pub service_description: String,
    /// `core_start_time`, the job's `core_time` as the core wrote it (omitted when empty).
    pub core_start_time: String,
    /// `start_time`, seconds since the epoch.
    pub start_time: f64,
    /// `finish_time`.
    pub finish_time: f64,
    /// `return_code` (0..=3).
    pub return_code: i32,
    /// `source`: `Mod-Gearman Worker @ <identifier>`.
    pub source: String,
    /// `output`: the plugin's text, newlines written as `\n`.
    pub output: String,
}

impl Answer {
    /// The result text in mod-gearman-worker-go's layout.
    pub fn to_text(&self) -> String {
        let mut s = String::with_capacity(256 + self.output.len());
        let _ = writeln!(s, "type={}", self.kind);
        let _ = writeln!(s, "host_name={}", one_line(&self.host_name));
        if !self.service_description.is_empty() {
            let _ = writeln!(
                s,
                "service_description={}",
                one_line(&self.service_description)
            );
        }
        if !self.core_start_time.is_empty() {
            let _ = writeln!(s, "core_start_time={}", one_line(&self.core_start_time));
        }
        let _ = writeln!(s, "start_time={:.6}", self.start_time);
        let _ = writeln!(s, "finish_time={:.6}", self.finish_time);
        let _ = writeln!(s, "return_code={}", self.return_code);
        s.push_str("exited_ok=1\n");
        let _ = writeln!(s, "source={}", one_line(&self.source));
        let _ = writeln!(s, "output={}", escape_output(&self.output));
        s
    }

    /// Parse a result text (the Nagios bridge reads results with it).
    pub fn parse(text: &[u8]) -> Option<Answer> {
        let text = String::from_utf8_lossy(text);
        let mut a = Answer {
            kind: "active",
            ..Answer::default()
        };
        let mut has_output = false;
        for line in text.split('\n') {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            match k {
                "type" if v == "passive" => a.kind = "passive",
                "host_name" => a.host_name = v.to_string(),
                "service_description" => a.service_description = v.to_string(),
                "core_start_time" => a.core_start_time = v.to_string(),
                "start_time" => a.start_time = v.parse().unwrap_or(0.0),
                "finish_time" => a.finish_time = v.parse().unwrap_or(0.0),
                "return_code" => a.return_code = v.trim().parse().unwrap_or(3),
                "source" => a.source = v.to_string(),
                "output" => {
                    a.output = v.replace("\\n", "\n");
                    has_output = true;
                }
                _ => {}
            }
        }
        (has_output && !a.host_name.is_empty()).then_some(a)
    }
}

/// A field value the core splits on newlines: no newline, no NUL.
fn one_line(s: &str) -> String {
    s.chars()
        .filter(|&c| c != '\0')
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect()
}

/// Output as the core reads it back: trimmed of surrounding newlines, each
/// inner newline as the two characters `\n`, no NUL (the core's C parser
/// would end the output there), no carriage return before a newline.
pub fn escape_output(s: &str) -> String {
    let s = s.trim_matches(|c| c == '\r' || c == '\n');
    let mut out = String::with_capacity(s.len() + 16);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\0' => {}
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of mod-gearman-worker-go's decrypt_test.go (TestDecrypt2):
    /// a job encrypted by the real C module with this key.
    const GO_VECTOR: &str = "5dp7w0Fk5oJBsrnWb31CgT5LHnbgtMi7KTcXz8OWVHDVsxDK2cfcWetQfYFin97e7i3J0ORAMTqSxQ7y/rENH1nVaWb6AzewELmj+TdYX85SDUWixWStx4PjYQ9kOSMLR4vpTx568fLtFUPd/9g5iQaAtdHZkNwp4/eeASqDAKOW2CqvrJyP1rvMLX/zsXGqSWO6FQMRf19yVFBiVexAJLDDFOEiU+APBAwc8Ds1OVcXpUCIefsPgFbLbAp/i72X+9/bmCjFfueV31ikSJX/w91XW08719z413UIBFF9I7toN9neHYZhUXjIUlm7RysK";

    #[test]
    fn decrypts_a_job_sealed_by_mod_gearman_itself() {
        let c = Crypt::with_secret(b"OtiuaSDFgpgEUrR6T0998egCAhCksIKh");
        let text = c.open(GO_VECTOR.as_bytes()).unwrap();
        let job = Job::parse(&text).unwrap();
        assert_eq!(job.kind, "service");
        assert_eq!(job.service_description, "perl test");
        assert!(!job.command_line.is_empty(), "{job:?}");
    }

    #[test]
    fn the_wrong_key_is_an_error_not_a_job() {
        let c = Crypt::with_secret(b"not the key");
        let text = c.open(GO_VECTOR.as_bytes()).unwrap();
        assert_eq!(Job::parse(&text), Err(JobError::NotAJob));
        assert!(matches!(
            Crypt::plain().open(b"%%%not base64"),
            Err(JobError::Base64(_))
        ));
        assert_eq!(
            Crypt::with_secret(b"k").open(b"YWJj"),
            Err(JobError::BlockSize(3))
        );
    }

    #[test]
    fn seal_then_open_round_trips_both_modes() {
        let job = Job {
            kind: "host".into(),
            result_queue: "check_results".into(),
            host_name: "web1".into(),
            core_time_text: "1700000000.123456".into(),
            timeout: 30,
            command_line: "/bin/echo hi".into(),
            ..Job::default()
        };
        for c in [Crypt::plain(), Crypt::with_secret(b"secret")] {
            let sealed = c.seal(job.to_text().as_bytes());
            let back = Job::parse(&c.open(&sealed).unwrap()).unwrap();
            assert_eq!(back.host_name, "web1");
            assert_eq!(back.timeout, 30);
            assert_eq!(back.core_time, 1_700_000_000.123456);
            assert_eq!(back.command_line, "/bin/echo hi");
        }
    }

    #[test]
    fn a_key_longer_than_32_bytes_is_cut_and_a_nul_ends_it() {
        let long = Crypt::with_secret(&[b'a'; 40]).seal(b"type=x");
        assert_eq!(Crypt::with_secret(&[b'a'; 32]).seal(b"type=x"), long);
        let nul = Crypt::with_secret(b"abc\0def").seal(b"type=x");
        assert_eq!(Crypt::with_secret(b"abc").seal(b"type=x"), nul);
    }

    #[test]
    fn the_answer_has_every_field_and_output_on_one_line() {
        let a = Answer {
            kind: "active",
            host_name: "web1".into(),
            service_description: "load".into(),
            core_start_time: "1700000000.5".into(),
            start_time: 1.5,
            finish_time: 2.25,
            return_code: 1,
            source: "Mod-Gearman Worker @ w1".into(),
            output: "WARNING - load|l=5\nline two\r\nline three|x=1\n".into(),
        };
        let text = a.to_text();
        assert_eq!(
            text,
            "type=active\nhost_name=web1\nservice_description=load\ncore_start_time=1700000000.5\n\
             start_time=1.500000\nfinish_time=2.250000\nreturn_code=1\nexited_ok=1\n\
             source=Mod-Gearman Worker @ w1\noutput=WARNING - load|l=5\\nline two\\nline three|x=1\n"
        );
        let back = Answer::parse(text.as_bytes()).unwrap();
        assert_eq!(back.output, "WARNING - load|l=5\nline two\nline three|x=1");
        assert_eq!(back.return_code, 1);
    }

    /// Mutated sealed jobs, with and without the key, open to an error or to
    /// some job: never a panic.
    #[test]
    fn mutated_jobs_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let job = Job {
            kind: "service".into(),
            host_name: "h".into(),
            command_line: "/bin/true".into(),
            ..Job::default()
        };
        for c in [Crypt::plain(), Crypt::with_secret(b"k")] {
            let sealed = c.seal(job.to_text().as_bytes());
            for _ in 0..5_000 {
                let mut b = sealed.clone();
                for _ in 0..(1 + next() % 3) {
                    let i = (next() as usize) % b.len();
                    b[i] = next() as u8;
                }
                b.truncate((next() as usize) % (b.len() + 1));
                if let Ok(text) = c.open(&b) {
                    let _ = Job::parse(&text);
                    let _ = Answer::parse(&text);
                }
            }
        }
    }
}
