//! Credentials read from files and re-read when the files change, so that a rotated
//! certificate, key set or token file takes effect without a restart. Kubernetes updates a
//! mounted Secret by swapping a symlink, which no inotify watch on the file sees; comparing the
//! contents on an interval works for every way a file can be replaced.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Turns the files' contents (in the order of their paths) into the value.
type Parse<T> = Box<dyn Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync>;

/// A value built from one or more files, rebuilt when any of them changes.
pub struct Reloadable<T> {
    what: &'static str,
    paths: Vec<PathBuf>,
    parse: Parse<T>,
    current: RwLock<Arc<T>>,
    /// The contents last read, parsed or not: a change is a difference from these. Taken at
    /// load, so a change made before the watch task first runs is not missed.
    seen: std::sync::Mutex<Vec<Vec<u8>>>,
    /// Whether the files differ from what is in use (unreadable, or changed but invalid):
    /// logged once, then only visible here and in `thermostat_credentials_stale`. For a token
    /// file that matters: a revocation written with a typo leaves the revoked token working.
    stale: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} in {paths}: {message}")]
    Invalid {
        what: &'static str,
        paths: String,
        message: String,
    },
}

impl<T: Send + Sync + 'static> Reloadable<T> {
    /// Reads and parses the files now; an error here stops the start of the service, since
    /// running without the configured credentials is never what the operator wanted.
    pub fn load(
        what: &'static str,
        paths: Vec<PathBuf>,
        parse: impl Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, LoadError> {
        let contents = read_all(&paths)?;
        let value = parse(&contents).map_err(|message| LoadError::Invalid {
            what,
            paths: describe(&paths),
            message,
        })?;
        Ok(Arc::new(Self {
            what,
            paths,
            parse: Box::new(parse),
            current: RwLock::new(Arc::new(value)),
            seen: std::sync::Mutex::new(contents),
            stale: AtomicBool::new(false),
        }))
        .inspect(|loaded| loaded.set_stale(false))
    }

    /// Whether the files on disk are not what is in use (see [`Self::watch`]).
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    fn set_stale(&self, stale: bool) {
        self.stale.store(stale, Ordering::Relaxed);
        metrics::gauge!(crate::telemetry::CREDENTIALS_STALE, "what" => self.what)
            .set(f64::from(u8::from(stale)));
    }

    pub fn current(&self) -> Arc<T> {
        // A poisoned lock only means a reader panicked; the value itself is always whole.
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Re-reads the files every `interval` until `stop`. A change that does not parse is
    /// logged and the previous value kept: a half-written rotation must not lock everyone out.
    pub fn watch(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let contents = match read_all(&self.paths) {
                    Ok(contents) => contents,
                    Err(e) => {
                        if !self.is_stale() {
                            tracing::warn!(what = self.what, error = %e, "cannot re-read; keeping the loaded version");
                        }
                        self.set_stale(true);
                        // Whatever can be read next is parsed, even the same contents as in use.
                        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clear();
                        continue;
                    }
                };
                {
                    let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
                    if *seen == contents {
                        continue;
                    }
                    seen.clone_from(&contents);
                }
                match (self.parse)(&contents) {
                    Ok(value) => {
                        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
                        self.set_stale(false);
                        tracing::info!(what = self.what, files = %describe(&self.paths), "reloaded");
                    }
                    Err(message) => {
                        self.set_stale(true);
                        tracing::warn!(what = self.what, files = %describe(&self.paths), error = %message, "changed but invalid; keeping the loaded version");
                    }
                }
            }
        });
    }
}

fn read_all(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, LoadError> {
    paths
        .iter()
        .map(|path| {
            std::fs::read(path).map_err(|source| LoadError::Read {
                path: path.clone(),
                source,
            })
        })
        .collect()
}

fn describe(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reloads_a_changed_file_and_keeps_the_old_value_when_the_new_one_is_bad() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("n");
        std::fs::write(&path, "1").expect("write");
        let parse = |files: &[Vec<u8>]| {
            String::from_utf8_lossy(&files[0])
                .trim()
                .parse::<u32>()
                .map_err(|e| e.to_string())
        };
        let value = Reloadable::load("number", vec![path.clone()], parse).expect("loads");
        assert_eq!(*value.current(), 1);
        let stop = CancellationToken::new();
        Arc::clone(&value).watch(Duration::from_millis(10), stop.clone());

        std::fs::write(&path, "2").expect("write");
        wait_for(|| *value.current() == 2).await;
        assert!(!value.is_stale());
        std::fs::write(&path, "not a number").expect("write");
        wait_for(|| value.is_stale()).await;
        assert_eq!(
            *value.current(),
            2,
            "a bad file must not replace a good value"
        );
        std::fs::write(&path, "3").expect("write");
        wait_for(|| *value.current() == 3).await;
        assert!(!value.is_stale());
        // A file that cannot be read any more is stale too.
        std::fs::remove_file(&path).expect("remove");
        wait_for(|| value.is_stale()).await;
        assert_eq!(*value.current(), 3);
        // Back as it was: in use again, not stale.
        std::fs::write(&path, "3").expect("write");
        wait_for(|| !value.is_stale()).await;
        stop.cancel();
    }

    #[test]
    fn a_missing_or_invalid_file_fails_the_first_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing");
        assert!(Reloadable::load("x", vec![missing], |_| Ok(())).is_err());
        let path = dir.path().join("bad");
        std::fs::write(&path, "x").expect("write");
        let err = Reloadable::<()>::load("x", vec![path], |_| Err("nope".into()))
            .err()
            .expect("fails");
        assert!(err.to_string().contains("nope"));
    }

    async fn wait_for(condition: impl Fn() -> bool) {
        for _ in 0..500 {
            if condition() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached");
    }
}
