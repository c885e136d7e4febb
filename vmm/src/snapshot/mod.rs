//! Snapshot files: a checked frame ([`format`]) around state encoded by [`codec`].
pub mod codec;
pub mod format;
