//! Who a check runs as: a user's uid, primary gid and supplementary groups
//! (`initgroups` semantics), looked up once, when a configuration is
//! loaded, so that the child (which may not allocate) only makes three raw
//! system calls: `setgroups`, `setresgid`, `setresuid`.

use crate::error::PolicyError;
use std::ffi::{CStr, CString};

/// The identity a check runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// The user's name (for messages).
    pub user: String,
    /// Real, effective and saved uid.
    pub uid: u32,
    /// Real, effective and saved gid.
    pub gid: u32,
    /// Supplementary groups (the user's, from the group database, with `gid`).
    pub groups: Vec<u32>,
}

impl RunAs {
    /// Look `user` (a name or a number) up in the user database, with its
    /// supplementary groups as `initgroups` would set them; `group` (a
    /// name or number) replaces the primary group.
    pub fn lookup(user: &str, group: Option<&str>) -> Result<RunAs, PolicyError> {
        let (name, uid, mut gid) = passwd_entry(user)?;
        if let Some(g) = group {
            gid = group_id(g)?;
        }
        let groups = group_list(&name, gid)?;
        Ok(RunAs {
            user: name,
            uid,
            gid,
            groups,
        })
    }

    /// Whether this process may take this identity: root may take any; any
    /// other may only "take" its own uid and gid, and then nothing changes.
    /// Err: why not, for the operator.
    pub fn usable(&self) -> Result<(), PolicyError> {
        let euid = rustix::process::geteuid().as_raw();
        if euid == 0 {
            return Ok(());
        }
        let egid = rustix::process::getegid().as_raw();
        if self.uid == euid && self.gid == egid {
            return Ok(());
        }
        Err(PolicyError::NotRoot {
            user: self.user.clone(),
            uid: self.uid,
            euid,
        })
    }

    /// Whether the child must change identity (false: it already is this one).
    pub(crate) fn changes_identity(&self) -> bool {
        rustix::process::geteuid().as_raw() == 0
    }
}

/// `getpwnam_r` (or `getpwuid_r` for a number): name, uid, gid.
fn passwd_entry(user: &str) -> Result<(String, u32, u32), PolicyError> {
    let not_found = || PolicyError::NoSuchUser(user.to_string());
    let c = CString::new(user).map_err(|_| not_found())?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain C data for which all-zero is valid.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let by_number = user.parse::<u32>().ok();
    // SAFETY: every pointer is valid for the call; `buf` outlives the use
    // of the strings `pw` points into (copied out below).
    let rc = unsafe {
        match by_number {
            Some(uid) => {
                libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out)
            }
            None => libc::getpwnam_r(
                c.as_ptr(),
                &mut pw,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut out,
            ),
        }
    };
    if rc != 0 {
        return Err(PolicyError::Lookup {
            what: format!("user {user:?}"),
            source: std::io::Error::from_raw_os_error(rc),
        });
    }
    if out.is_null() {
        return Err(not_found());
    }
    // SAFETY: on success `pw_name` is a NUL-terminated string inside `buf`.
    let name = unsafe { CStr::from_ptr(pw.pw_name) }
        .to_string_lossy()
        .into_owned();
    Ok((name, pw.pw_uid, pw.pw_gid))
}

/// A group name (from the group database) or number.
fn group_id(group: &str) -> Result<u32, PolicyError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let not_found = || PolicyError::NoSuchGroup(group.to_string());
    let c = CString::new(group).map_err(|_| not_found())?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: group is plain C data for which all-zero is valid.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut gr,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 {
        return Err(PolicyError::Lookup {
            what: format!("group {group:?}"),
            source: std::io::Error::from_raw_os_error(rc),
        });
    }
    if out.is_null() {
        return Err(not_found());
    }
    Ok(gr.gr_gid)
}

/// `getgrouplist(user, gid)`: `gid` and every group that lists `user`.
fn group_list(user: &str, gid: u32) -> Result<Vec<u32>, PolicyError> {
    let c = CString::new(user).map_err(|_| PolicyError::NoSuchUser(user.to_string()))?;
    let mut n: libc::c_int = 32;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let asked = n;
        // SAFETY: `groups` has room for `n` entries; `n` is updated with
        // the number found (or needed).
        let rc = unsafe { libc::getgrouplist(c.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n.max(0) as usize);
            return Ok(groups);
        }
        if n <= asked {
            n = asked.saturating_mul(2);
        }
        if n > 65536 {
            return Err(PolicyError::Lookup {
                what: format!("the groups of user {user:?}"),
                source: std::io::Error::other("more than 65536 groups"),
            });
        }
    }
}
