//! Settings of the Nagios worker, shared by `pidring nagios-worker` and the
//! daemon's `[nagios]` config section.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Debian's compiled-in query-handler socket of `nagios4`.
pub const DEFAULT_QH_SOCKET: &str = "/var/lib/nagios4/rw/nagios.qh";

/// How to attach to a Nagios 4 core as an external worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NagiosWorkerConfig {
    /// The core's query-handler socket (`query_socket=` in nagios.cfg).
    pub qh_socket: PathBuf,
    /// Plugins to take over completely: one connection each (basename or full path,
    /// as the command's first word appears in the core's command definitions).
    pub plugins: Vec<String>,
    /// General connections that join the core's round-robin. `None`: 1 when
    /// `plugins` is empty, else 0.
    pub connections: Option<usize>,
    /// Worker name the core shows in its log and as the check source.
    pub name: String,
    /// Most jobs the core may hand one connection at once.
    pub max_jobs: usize,
    /// Run nothing here: put every job into this gearmand (`host:port`) as
    /// a mod_gearman job, for `pidring gearman-worker`s to run.
    pub gearman: Option<String>,
    /// With `gearman`: the mod_gearman secret (jobs and results encrypted).
    pub gearman_key: Option<String>,
    /// With `gearman`: a file whose first line is the secret.
    pub gearman_keyfile: Option<PathBuf>,
    /// With `gearman`: hostgroups whose hosts' checks go to `hostgroup_NAME`
    /// (mod_gearman's `hostgroups=`), in order of preference.
    pub gearman_hostgroups: Vec<String>,
    /// With `gearman`: servicegroups whose services go to `servicegroup_NAME`
    /// (mod_gearman's `servicegroups=`), before any hostgroup.
    pub gearman_servicegroups: Vec<String>,
    /// Where the core writes its object cache (`object_cache_file=`), read
    /// for group members.
    pub objects_cache: PathBuf,
}

impl Default for NagiosWorkerConfig {
    fn default() -> Self {
        NagiosWorkerConfig {
            qh_socket: PathBuf::from(DEFAULT_QH_SOCKET),
            plugins: Vec::new(),
            connections: None,
            name: "pidring".to_string(),
            max_jobs: 4096,
            gearman: None,
            gearman_key: None,
            gearman_keyfile: None,
            gearman_hostgroups: Vec::new(),
            gearman_servicegroups: Vec::new(),
            objects_cache: PathBuf::from(super::routing::DEFAULT_OBJECTS_CACHE),
        }
    }
}

impl NagiosWorkerConfig {
    /// How jobs for gearmand are sealed: encrypted when a key or keyfile is given, else plain.
    pub fn gearman_crypt(&self) -> Result<crate::gearman::Crypt, String> {
        let g = crate::gearman::GearmanConfig {
            encryption: self.gearman_key.is_some() || self.gearman_keyfile.is_some(),
            key: self.gearman_key.clone(),
            keyfile: self.gearman_keyfile.clone(),
            ..crate::gearman::GearmanConfig::default()
        };
        g.crypt()
    }

    /// The general connections this config asks for.
    pub fn general_connections(&self) -> usize {
        self.connections
            .unwrap_or(if self.plugins.is_empty() { 1 } else { 0 })
    }

    /// Check the settings; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.plugins.is_empty() && self.general_connections() == 0 {
            return Err(
                "nothing to serve: give at least one plugin or one general connection".into(),
            );
        }
        if self.max_jobs == 0 {
            return Err("max_jobs must be at least 1".into());
        }
        for p in &self.plugins {
            if p.is_empty() || p.contains(|c: char| c == ';' || c == '\0' || c.is_whitespace()) {
                return Err(format!(
                    "plugin {p:?}: give the command's first word (a name or path without spaces or ';')"
                ));
            }
        }
        if self.gearman.is_some() {
            self.gearman_crypt()?;
        }
        if self.name.contains([';', '\0', '\n']) {
            return Err(format!("name {:?} must not contain ';' or NUL", self.name));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_partial_sections_deserialize() {
        let c: NagiosWorkerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, NagiosWorkerConfig::default());
        assert_eq!(c.general_connections(), 1);
        let c: NagiosWorkerConfig = serde_json::from_str(
            r#"{"qh_socket": "/run/nagios.qh", "plugins": ["check_dummy", "/usr/lib/nagios/plugins/check_ping"]}"#,
        )
        .unwrap();
        assert_eq!(c.qh_socket, PathBuf::from("/run/nagios.qh"));
        assert_eq!(c.general_connections(), 0);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn embeds_as_a_toml_section() {
        #[derive(Deserialize)]
        struct Outer {
            nagios: Option<NagiosWorkerConfig>,
        }
        let o: Outer = toml::from_str(
            "[nagios]\nqh_socket = \"/var/lib/nagios4/rw/nagios.qh\"\nplugins = [\"check_dummy\"]\nconnections = 2\n",
        )
        .unwrap();
        let c = o.nagios.unwrap();
        assert_eq!(c.plugins, ["check_dummy"]);
        assert_eq!(c.general_connections(), 2);
        assert_eq!(c.max_jobs, 4096);
        let o: Outer = toml::from_str("").unwrap();
        assert!(o.nagios.is_none());
        assert!(toml::from_str::<Outer>("[nagios]\nplugin = \"x\"\n").is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(serde_json::from_str::<NagiosWorkerConfig>(r#"{"socket": "x"}"#).is_err());
        let c = NagiosWorkerConfig {
            connections: Some(0),
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let c = NagiosWorkerConfig {
            plugins: vec!["check_x;pid=1".into()],
            ..Default::default()
        };
        assert!(c.validate().is_err());
    }
}
