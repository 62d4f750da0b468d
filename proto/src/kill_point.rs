//! A test hook shared by both servers: with `COWSNAP_TEST_KILL_AT=POINT` in
//! its environment, a process kills itself with SIGKILL when it reaches the
//! named point, so a test gets a real `kill -9` exactly there (between two
//! durable writes) instead of wherever a timer lands. Points are named by
//! the code that offers them, e.g. `delete_volume:after_worker` (control)
//! or `worker:delete_volume:device` (worker). Unset, it does nothing.

/// The environment variable naming the point.
pub const ENV: &str = "COWSNAP_TEST_KILL_AT";

/// SIGKILLs this process if `COWSNAP_TEST_KILL_AT` names `point`.
pub fn reached(point: &str) {
    if std::env::var_os(ENV).is_some_and(|p| p == point) {
        tracing::warn!(point, "test hook {ENV}: killing this process with SIGKILL");
        // SAFETY: kill(2) on our own pid; SIGKILL does not return.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
