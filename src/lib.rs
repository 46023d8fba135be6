//! Workspace root.
#![forbid(unsafe_code)]
