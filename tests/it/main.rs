//! Integration suite (see harness).
