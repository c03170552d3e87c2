//! Unit tests of the credential manager.
