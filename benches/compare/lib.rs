//! Empty: the comparison harness is the `compare` bench (`main.rs`).
