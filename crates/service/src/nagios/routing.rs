//! Which gearmand queue a Nagios job goes to, as mod_gearman's NEB module
//! picks it (`set_target_queue`): the first configured servicegroup the
//! service is in (`servicegroup_NAME`), else the first configured hostgroup
//! its host is in (`hostgroup_NAME`), else `service` or `host`.
//!
//! A NEB module asks the core's memory for group members; the bridge is a
//! separate process, so it reads them from the core's object cache
//! (`object_cache_file=` in nagios.cfg), which the core rewrites at every
//! start and reload: read again whenever its modification time changes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// Debian's `object_cache_file` of `nagios4`.
pub const DEFAULT_OBJECTS_CACHE: &str = "/var/cache/nagios4/objects.cache";

/// How often, at most, the object cache's modification time is looked at.
const RECHECK: Duration = Duration::from_secs(1);

/// Group members as the object cache lists them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Members {
    /// Host name → the hostgroups that list it.
    pub of_host: HashMap<String, Vec<String>>,
    /// (host, service description) → the servicegroups that list it.
    pub of_service: HashMap<(String, String), Vec<String>>,
}

impl Members {
    /// Parse `define hostgroup` and `define servicegroup` blocks of an
    /// object cache (`KEY<whitespace>VALUE` lines); everything else is skipped.
    pub fn parse(text: &str) -> Members {
        let mut m = Members::default();
        let mut kind: Option<&str> = None;
        let (mut name, mut members) = (String::new(), String::new());
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("define ") {
                kind = Some(rest.trim_end_matches('{').trim());
                name.clear();
                members.clear();
                continue;
            }
            if line == "}" {
                match kind {
                    Some("hostgroup") => {
                        for h in members.split(',').map(str::trim).filter(|h| !h.is_empty()) {
                            m.of_host.entry(h.into()).or_default().push(name.clone());
                        }
                    }
                    Some("servicegroup") => {
                        let parts: Vec<&str> = members.split(',').map(str::trim).collect();
                        for pair in parts.chunks_exact(2) {
                            m.of_service
                                .entry((pair[0].into(), pair[1].into()))
                                .or_default()
                                .push(name.clone());
                        }
                    }
                    _ => {}
                }
                kind = None;
                continue;
            }
            let Some((key, value)) = line.split_once(char::is_whitespace) else {
                continue;
            };
            match (kind, key) {
                (Some("hostgroup"), "hostgroup_name")
                | (Some("servicegroup"), "servicegroup_name") => name = value.trim().into(),
                (Some("hostgroup" | "servicegroup"), "members") => members = value.trim().into(),
                _ => {}
            }
        }
        m
    }
}

/// The queue choice of one bridge.
#[derive(Debug)]
pub struct Routing {
    hostgroups: Vec<String>,
    servicegroups: Vec<String>,
    cache: PathBuf,
    state: Mutex<Loaded>,
}

#[derive(Debug, Default)]
struct Loaded {
    members: Members,
    /// The cache's modification time when `members` was read.
    mtime: Option<SystemTime>,
    looked: Option<Instant>,
    /// Said once that there is no cache to read.
    said_missing: bool,
}

impl Routing {
    /// Route to these hostgroup and servicegroup queues (in this order of
    /// preference), with members from the object cache at `cache`.
    pub fn new(hostgroups: Vec<String>, servicegroups: Vec<String>, cache: PathBuf) -> Routing {
        Routing {
            hostgroups,
            servicegroups,
            cache,
            state: Mutex::new(Loaded::default()),
        }
    }

    /// Only `service` and `host`: no groups configured.
    pub fn plain() -> Routing {
        Routing::new(Vec::new(), Vec::new(), PathBuf::new())
    }

    /// The queue for a check of `host` (and `service`, empty for a host check).
    pub fn queue(&self, host: &str, service: &str) -> String {
        if self.hostgroups.is_empty() && self.servicegroups.is_empty() {
            return if service.is_empty() {
                "host"
            } else {
                "service"
            }
            .into();
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh(&mut state);
        let m = &state.members;
        if !service.is_empty()
            && let Some(groups) = m.of_service.get(&(host.to_string(), service.to_string()))
            && let Some(g) = self.servicegroups.iter().find(|g| groups.contains(g))
        {
            return format!("servicegroup_{g}");
        }
        if let Some(groups) = m.of_host.get(host)
            && let Some(g) = self.hostgroups.iter().find(|g| groups.contains(g))
        {
            return format!("hostgroup_{g}");
        }
        if service.is_empty() {
            "host"
        } else {
            "service"
        }
        .into()
    }

    /// Read the object cache again if it changed (looked at once a second at most).
    fn refresh(&self, state: &mut Loaded) {
        if state.looked.is_some_and(|t| t.elapsed() < RECHECK) {
            return;
        }
        state.looked = Some(Instant::now());
        let Ok(mtime) = std::fs::metadata(&self.cache).and_then(|m| m.modified()) else {
            if !std::mem::replace(&mut state.said_missing, true) {
                tracing::warn!(cache = %self.cache.display(), "no object cache to read group members from: jobs go to service/host");
            }
            return;
        };
        if state.mtime == Some(mtime) {
            return;
        }
        match std::fs::read_to_string(&self.cache) {
            Ok(text) => {
                state.members = Members::parse(&text);
                state.mtime = Some(mtime);
                tracing::info!(
                    cache = %self.cache.display(),
                    hosts = state.members.of_host.len(),
                    services = state.members.of_service.len(),
                    "group members read from the object cache"
                );
            }
            Err(e) => {
                tracing::warn!(cache = %self.cache.display(), "cannot read the object cache: {e}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CACHE: &str = "define host {\n\thost_name\th1\n\t}\n\
        define hostgroup {\n\thostgroup_name\tweb\n\talias\tWeb\n\tmembers\th1,h2\n\t}\n\
        define hostgroup {\n\thostgroup_name\tdb\n\tmembers\th2\n\t}\n\
        define servicegroup {\n\tservicegroup_name\tdisk\n\tmembers\th1,root fs,h2,root fs\n\t}\n";

    #[test]
    fn the_cache_gives_each_host_and_service_its_groups() {
        let m = Members::parse(CACHE);
        assert_eq!(m.of_host["h1"], ["web"]);
        assert_eq!(m.of_host["h2"], ["web", "db"]);
        assert_eq!(m.of_service[&("h1".into(), "root fs".into())], ["disk"]);
    }

    #[test]
    fn servicegroups_come_first_then_hostgroups_in_configured_order() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("objects.cache");
        std::fs::write(&cache, CACHE).unwrap();
        let r = Routing::new(vec!["db".into(), "web".into()], vec!["disk".into()], cache);
        assert_eq!(r.queue("h1", "root fs"), "servicegroup_disk");
        assert_eq!(r.queue("h1", "load"), "hostgroup_web");
        assert_eq!(r.queue("h2", "load"), "hostgroup_db");
        assert_eq!(r.queue("h2", ""), "hostgroup_db");
        assert_eq!(r.queue("h3", "load"), "service");
        assert_eq!(r.queue("h3", ""), "host");
        assert_eq!(Routing::plain().queue("h1", "x"), "service");
    }
}
