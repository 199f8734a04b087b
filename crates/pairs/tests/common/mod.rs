//! The workspace's test helpers (tests/common) that need no libtorch.
#![allow(dead_code, unused_imports)] // each test binary uses a different subset

#[path = "../../../../tests/common/fixtures.rs"]
mod fixtures;
#[path = "../../../../tests/common/oracle.rs"]
mod oracle;

pub use fixtures::{jpeg, png, record};
pub use oracle::oracle;
