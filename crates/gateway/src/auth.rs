//! Authentication at the edge is `tenantry_core::auth::Caller`; re-exported here.

pub use tenantry_core::auth::{Caller, JwtKey};
