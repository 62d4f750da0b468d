//! The CSI Controller service: volumes and snapshots through the control
//! service's domain code, so that every CSI call is recorded, idempotent and
//! repaired after a crash like a `cowsnap.v1` call.
