//! Rate limiting: per-plan token buckets.
