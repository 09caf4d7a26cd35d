//! The tests' certificates: `backchannel_testkit::pki`.

#[allow(unused_imports)]
pub use backchannel_testkit::pki::{in_memory as pki, MemoryPki as Pki};
