//! Who a check runs as, and what may run at all: the operator's policy,
//! applied to a [`Check`] before it is submitted.
//!
//! - [`RunAs`] (in `run_as`, re-exported here): a user's uid, primary gid
//!   and supplementary groups, looked up once.
//! - [`Allowlist`]: paths or globs the program, as resolved (PATH search,
//!   symlinks, `..`), must match; the check then executes that resolved
//!   file, so what was matched is what runs.

use crate::check::Check;
pub use crate::error::Forbidden;
pub use crate::run_as::RunAs;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, RwLock};

/// One `allowed_commands` entry: an absolute path, with `*` (any run of
/// characters within one path segment), `?` (one character but `/`) and
/// `**` (a whole segment matching any number of segments, none included).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    /// As written (for messages).
    text: String,
    /// Segments after the leading `/`, the directory part without any
    /// wildcard canonicalized (so `/bin/*` matches on a merged-/usr system
    /// where `/bin` is a link to `usr/bin`).
    segments: Vec<Vec<u8>>,
}

impl Pattern {
    fn new(text: &str) -> Result<Pattern, String> {
        if !text.starts_with('/') {
            return Err(format!(
                "{text:?} is not an absolute path (write the full path, or a glob such as /usr/lib/nagios/plugins/*)"
            ));
        }
        let raw: Vec<&str> = text.split('/').filter(|s| !s.is_empty()).collect();
        if raw.iter().any(|s| *s == "." || *s == "..") {
            return Err(format!("{text:?} holds . or .. segments"));
        }
        if raw.is_empty() {
            return Err(format!("{text:?} names no file"));
        }
        // The literal directories before the first wildcard, resolved; an
        // entry without any wildcard is resolved whole (`/bin/sh` allows
        // the file it leads to, as it is what runs).
        let exact = !raw.iter().any(|s| s.contains(['*', '?']));
        let literal = if exact {
            raw.len()
        } else {
            raw.iter().take_while(|s| !s.contains(['*', '?'])).count()
        };
        let mut segments: Vec<Vec<u8>> = Vec::new();
        let prefix: PathBuf = std::iter::once("/")
            .chain(raw[..literal].iter().copied())
            .collect();
        match std::fs::canonicalize(&prefix) {
            Ok(real) => segments.extend(real.components().filter_map(|c| match c {
                Component::Normal(s) => Some(s.as_bytes().to_vec()),
                _ => None,
            })),
            Err(_) => segments.extend(raw[..literal].iter().map(|s| s.as_bytes().to_vec())),
        }
        segments.extend(raw[literal..].iter().map(|s| s.as_bytes().to_vec()));
        Ok(Pattern {
            text: text.to_string(),
            segments,
        })
    }

    /// Whether the canonical absolute `path` matches.
    fn matches(&self, path: &Path) -> bool {
        let parts: Vec<&[u8]> = path
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s.as_bytes()),
                _ => None,
            })
            .collect();
        let pat: Vec<&[u8]> = self.segments.iter().map(Vec::as_slice).collect();
        match_segments(&pat, &parts)
    }
}

fn match_segments(pat: &[&[u8]], parts: &[&[u8]]) -> bool {
    match pat.split_first() {
        None => parts.is_empty(),
        Some((&b"**", rest)) => (0..=parts.len()).any(|i| match_segments(rest, &parts[i..])),
        Some((first, rest)) => match parts.split_first() {
            Some((p, tail)) => glob_segment(first, p) && match_segments(rest, tail),
            None => false,
        },
    }
}

/// `*` and `?` within one segment (no `/` in either).
fn glob_segment(pat: &[u8], s: &[u8]) -> bool {
    match pat.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob_segment(rest, &s[i..])),
        Some((b'?', rest)) => !s.is_empty() && glob_segment(rest, &s[1..]),
        Some((c, rest)) => s.first() == Some(c) && glob_segment(rest, &s[1..]),
    }
}

/// What may run: `allowed_commands`. Empty: everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    patterns: Vec<Pattern>,
}

impl Allowlist {
    /// From the configured entries (absolute paths or globs).
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Result<Allowlist, String> {
        let patterns = entries
            .iter()
            .map(|e| Pattern::new(e.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(Allowlist { patterns })
    }

    /// `restrict_path`-style: everything under these directories.
    pub fn directories<S: AsRef<str>>(dirs: &[S]) -> Result<Allowlist, String> {
        let globs: Vec<String> = dirs
            .iter()
            .map(|d| format!("{}/**", d.as_ref().trim_end_matches('/')))
            .collect();
        Allowlist::new(&globs)
    }

    /// No entries: everything may run.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether the resolved program `path` may run.
    pub fn permits(&self, path: &Path) -> bool {
        self.is_empty() || self.patterns.iter().any(|p| p.matches(path))
    }

    /// The entries as written.
    pub fn entries(&self) -> Vec<&str> {
        self.patterns.iter().map(|p| p.text.as_str()).collect()
    }
}

/// The file `execvp` would run for `program`, with every symlink and `..`
/// resolved: looked up in `path_var` (a PATH value) when it has no `/`,
/// relative names taken from `cwd` (the check's working directory, or
/// this process's).
pub fn resolve(program: &OsStr, path_var: Option<&OsStr>, cwd: Option<&Path>) -> Option<PathBuf> {
    if program.is_empty() {
        return None;
    }
    let in_cwd = |p: &Path| match cwd {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p.to_path_buf(),
    };
    let is_file = |p: &PathBuf| std::fs::metadata(p).is_ok_and(|m| m.is_file());
    if program.as_bytes().contains(&b'/') {
        return std::fs::canonicalize(in_cwd(Path::new(program)))
            .ok()
            .filter(is_file);
    }
    let default = OsStr::from_bytes(crate::search_path::DEFAULT_PATH);
    std::env::split_paths(path_var.unwrap_or(default)).find_map(|d| {
        let d = if d.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            d
        };
        // As `execvp`: a file that may not be executed does not end the search.
        std::fs::canonicalize(in_cwd(&d.join(program)))
            .ok()
            .filter(|p| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    })
}

/// The PATH a check's bare program name is looked up in (its own, or the
/// executor's, or the default), as the child will search it.
fn check_path(check: &Check) -> Option<OsString> {
    if let Some((_, v)) = check.env.iter().rev().find(|(k, _)| k == "PATH") {
        return Some(v.clone());
    }
    match check.env_policy {
        crate::check::EnvPolicy::Clear => None,
        crate::check::EnvPolicy::Inherit => std::env::var_os("PATH"),
    }
}

/// The operator's policy for submitted checks.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// What may run (empty: everything).
    pub allowed_commands: Allowlist,
    /// Who checks run as when the submit names nobody (None: as this process).
    pub run_as: Option<Arc<RunAs>>,
    /// Who a submit may ask to run as, by name.
    pub allowed_users: Vec<Arc<RunAs>>,
}

impl Policy {
    /// Apply to `check` (submitted asking for `user`, if any): its identity,
    /// and, with an allowlist, the resolved program it will execute.
    pub fn apply(&self, check: Check, user: Option<&str>) -> Result<Check, Forbidden> {
        let run_as = match user {
            None => self.run_as.clone(),
            Some(u) => Some(
                self.allowed_users
                    .iter()
                    .find(|r| r.user == u || r.uid.to_string() == u)
                    .cloned()
                    .ok_or_else(|| {
                        Forbidden(format!(
                            "user {u:?} is not in this daemon's allowed_users; checks may not ask to run as it"
                        ))
                    })?,
            ),
        };
        let mut check = match run_as {
            Some(r) => check.run_as(r),
            None => check,
        };
        if self.allowed_commands.is_empty() {
            return Ok(check);
        }
        let program = check.argv.first().cloned().unwrap_or_default();
        let shown = program.to_string_lossy().into_owned();
        let path = check_path(&check);
        let resolved =
            resolve(&program, path.as_deref(), check.cwd.as_deref()).ok_or_else(|| {
                Forbidden(format!(
                    "{shown} was not found, so it cannot be matched against allowed_commands"
                ))
            })?;
        if !self.allowed_commands.permits(&resolved) {
            let via = if Path::new(&program) == resolved {
                String::new()
            } else {
                format!(" (resolved to {})", resolved.display())
            };
            return Err(Forbidden(format!(
                "{shown}{via} is not in allowed_commands [{}]",
                self.allowed_commands.entries().join(", ")
            )));
        }
        check.exec_path = Some(resolved);
        Ok(check)
    }
}

/// A [`Policy`] that can be replaced while checks are submitted (a reload).
#[derive(Debug, Default)]
pub struct SharedPolicy(RwLock<Arc<Policy>>);

impl SharedPolicy {
    /// Holding `policy`.
    pub fn new(policy: Policy) -> SharedPolicy {
        SharedPolicy(RwLock::new(Arc::new(policy)))
    }

    /// The policy in force now.
    pub fn get(&self) -> Arc<Policy> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replace it (checks already submitted keep the one they got).
    pub fn set(&self, policy: Policy) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::PolicyError;

    fn allow(entries: &[&str]) -> Allowlist {
        Allowlist::new(entries).unwrap()
    }

    #[test]
    fn globs_match_within_segments_and_across_with_double_star() {
        let a = allow(&["/nonexistent-x/plugins/check_*", "/nonexistent-x/lib/**/c?"]);
        assert!(a.permits(Path::new("/nonexistent-x/plugins/check_ping")));
        assert!(!a.permits(Path::new("/nonexistent-x/plugins/sub/check_ping")));
        assert!(!a.permits(Path::new("/nonexistent-x/plugins/xcheck_ping")));
        assert!(a.permits(Path::new("/nonexistent-x/lib/c1")));
        assert!(a.permits(Path::new("/nonexistent-x/lib/a/b/c2")));
        assert!(!a.permits(Path::new("/nonexistent-x/lib/a/c22")));
        assert!(allow(&[]).permits(Path::new("/anything")));
        let exact = allow(&["/nonexistent-x/bin/true"]);
        assert!(exact.permits(Path::new("/nonexistent-x/bin/true")));
        assert!(!exact.permits(Path::new("/nonexistent-x/bin/truex")));
    }

    #[test]
    fn an_exact_entry_allows_what_it_leads_to() {
        let real = std::fs::canonicalize("/bin/sh").unwrap();
        assert!(allow(&["/bin/sh"]).permits(&real));
        let dir = std::fs::canonicalize("/bin").unwrap();
        assert!(allow(&["/bin/*"]).permits(&dir.join("true")));
    }

    #[test]
    fn bad_entries_are_refused() {
        assert!(Allowlist::new(&["usr/bin/*"]).is_err());
        assert!(Allowlist::new(&["/usr/../bin/*"]).is_err());
        assert!(Allowlist::new(&["/"]).is_err());
    }

    #[test]
    fn a_bare_name_resolves_through_path_and_symlinks() {
        let p = resolve(
            OsStr::new("sh"),
            Some(OsStr::new("/nonexistent:/bin")),
            None,
        )
        .unwrap();
        assert!(p.is_absolute());
        assert_eq!(p, std::fs::canonicalize("/bin/sh").unwrap());
        assert!(resolve(OsStr::new("no-such-prog-x"), Some(OsStr::new("/bin")), None).is_none());
        let dotdot = resolve(OsStr::new("/bin/../bin/sh"), None, None).unwrap();
        assert_eq!(dotdot, p);
    }

    #[test]
    fn root_is_found_with_its_groups() {
        let r = RunAs::lookup("root", None).unwrap();
        assert_eq!((r.uid, r.gid), (0, 0));
        assert!(r.groups.contains(&0));
        assert!(matches!(
            RunAs::lookup("no-such-user-pidring", None),
            Err(PolicyError::NoSuchUser(_))
        ));
    }
}
