//! The CSI Node service (stage, publish, stats, expansion on the node that
//! uses a volume) lives here.
