//! The standing adversarial suite: every way found to talk portcullis into a wrong decision, one
//! module per class, each a table of hostile cases with the answer a user must see. New classes are
//! added here (see README.md beside this file). Cases that need a real proxy in the way live beside
//! this file as pytest suites (`test_adversarial_*.py`).

#[path = "../common/mod.rs"]
mod common;
#[path = "../introspection_common/mod.rs"]
mod fake;
/// Test keys and token minting, shared by the modules that sign tokens.
#[path = "../jwt_common/mod.rs"]
mod keys;
#[path = "../redis_common/mod.rs"]
mod redis_common;
mod support;

mod config;
mod connections;
mod dpop;
mod entra;
mod forward_auth;
mod introspection;
mod listeners;
mod metadata;
mod request_line;
mod shadow;
mod shared_store;
mod subscriptions;
mod xfcc;
