//! The PATH a bare program name is looked up in, split once on the
//! submitting thread so that the child's search (see `spawn`) costs the
//! loop nothing and touches no file system.

/// The PATH a bare program name is looked up in when the check's
/// environment has none (glibc's default).
pub(crate) const DEFAULT_PATH: &[u8] =
    b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Most different directories of a PATH that are searched. A real PATH
/// has a few dozen; each costs the child one failed `execve` (a few µs).
pub(crate) const MAX_SEARCH_DIRS: usize = 1024;

/// A PATH, split once into the directories a bare program name is looked
/// for in, on the submitting thread (`Check::prepare_with`). Each
/// directory once, in order of first appearance: an empty entry (the
/// current directory) or a directory named again adds nothing, so a PATH
/// of a million `:` is one directory, not a million. The child builds one
/// candidate at a time (see `child_main`): nothing here grows with the
/// program name.
#[derive(Debug)]
pub(crate) struct SearchPath {
    pub(crate) value: Box<[u8]>,
    /// `(start, len)` of each directory in `value`; `Err` when it names
    /// more than `MAX_SEARCH_DIRS` (not searched at all: a partial search
    /// could run a different program than the full one would).
    pub(crate) dirs: Result<Box<[(usize, usize)]>, TooManyDirs>,
}

/// A PATH with more than `MAX_SEARCH_DIRS` different directories.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TooManyDirs;

impl SearchPath {
    pub(crate) fn new(value: &[u8]) -> SearchPath {
        let mut seen = std::collections::HashSet::new();
        let mut dirs = Vec::new();
        let mut start = 0;
        for dir in value.split(|&b| b == b':') {
            if seen.insert(dir) {
                if dirs.len() == MAX_SEARCH_DIRS {
                    return SearchPath {
                        value: value.into(),
                        dirs: Err(TooManyDirs),
                    };
                }
                dirs.push((start, dir.len()));
            }
            start += dir.len() + 1;
        }
        SearchPath {
            value: value.into(),
            dirs: Ok(dirs.into()),
        }
    }

    /// `DEFAULT_PATH`, split once.
    pub(crate) fn default_path() -> std::sync::Arc<SearchPath> {
        static DEFAULT: std::sync::OnceLock<std::sync::Arc<SearchPath>> =
            std::sync::OnceLock::new();
        DEFAULT
            .get_or_init(|| std::sync::Arc::new(SearchPath::new(DEFAULT_PATH)))
            .clone()
    }

    /// The PATH as given.
    #[cfg(test)]
    pub(crate) fn value(&self) -> &[u8] {
        &self.value
    }

    /// The directories searched, in order (`None`: too many).
    #[cfg(test)]
    pub(crate) fn dirs(&self) -> Option<Vec<&[u8]>> {
        let dirs = self.dirs.as_ref().ok()?;
        Some(dirs.iter().map(|&(s, n)| &self.value[s..s + n]).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_names_each_directory_once_in_order() {
        let p = SearchPath::new(b"/a::/b:/a:::/c:");
        assert_eq!(p.dirs().unwrap(), [&b"/a"[..], b"", b"/b", b"/c"]);
        // A million empty entries are the current directory, once.
        let p = SearchPath::new(":".repeat(1_000_000).as_bytes());
        assert_eq!(p.dirs().unwrap(), [&b""[..]]);
        assert_eq!(SearchPath::new(b"").dirs().unwrap(), [&b""[..]]);
        assert_eq!(SearchPath::new(b"/bin").dirs().unwrap(), [&b"/bin"[..]]);
        assert_eq!(SearchPath::default_path().dirs().unwrap().len(), 6);
    }

    #[test]
    fn a_path_with_more_directories_than_searched_is_refused() {
        let path = |n: usize| {
            (0..n)
                .map(|i| format!("/d{i}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        let p = SearchPath::new(path(MAX_SEARCH_DIRS).as_bytes());
        assert_eq!(p.dirs().unwrap().len(), MAX_SEARCH_DIRS);
        // Repeats do not count.
        let twice = format!("{}:{}", path(MAX_SEARCH_DIRS), path(MAX_SEARCH_DIRS));
        assert_eq!(
            SearchPath::new(twice.as_bytes()).dirs().unwrap().len(),
            MAX_SEARCH_DIRS
        );
        assert!(
            SearchPath::new(path(MAX_SEARCH_DIRS + 1).as_bytes())
                .dirs()
                .is_none()
        );
    }
}
