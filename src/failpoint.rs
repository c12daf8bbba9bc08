//! Crash points for the lifecycle and fault tests: `S3GRANT_CRASH_AT=<name>` makes a
//! debug build abort (no cleanup, like SIGKILL) the first time it reaches that point,
//! e.g. between the Secret write and the status write of a rotation. Release builds
//! compile them out, so no environment variable can crash a production operator.

/// Aborts the process here when `S3GRANT_CRASH_AT` names this point (debug builds only).
#[inline]
pub fn crash_point(name: &str) {
    #[cfg(debug_assertions)]
    {
        static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let armed = ARMED.get_or_init(|| std::env::var("S3GRANT_CRASH_AT").ok());
        if armed.as_deref() == Some(name) {
            eprintln!("s3grant: crash point {name} reached (S3GRANT_CRASH_AT); aborting");
            std::process::abort();
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}
