//! Helpers for tests that need Ceph RGW users of their own (owned by the RGW tests).
