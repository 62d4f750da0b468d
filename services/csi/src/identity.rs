//! The CSI Identity service: the plugin's name and version, what it offers
//! (controller service, topology constraints), and whether it is ready.
