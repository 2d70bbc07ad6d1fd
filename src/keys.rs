//! API key generation and digests.
