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
type Parse<T> = Box<dyn Fn(&[Vec<u8>]) -> Result<Parsed<T>, String> + Send + Sync>;

/// What a parse made of the files: the value, and the entries it had to leave out, each
/// described with why (never with a secret).
pub struct Parsed<T> {
    pub value: T,
    pub skipped: Vec<String>,
}

/// A value built from one or more files, rebuilt when any of them changes.
pub struct Reloadable<T> {
    what: &'static str,
    paths: Vec<PathBuf>,
    parse: Parse<T>,
    /// What replaces the value when changed files cannot be read or parsed at all; `None`
    /// keeps the value in use.
    fallback: Option<fn() -> T>,
    current: RwLock<Arc<T>>,
    /// The contents last read, parsed or not: a change is a difference from these. Taken at
    /// load, so a change made before the watch task first runs is not missed.
    seen: std::sync::Mutex<Vec<Vec<u8>>>,
    /// Whether the files differ from what is in use (unreadable, invalid, or with entries left
    /// out): logged, and visible here and in `thermostat_credentials_stale`.
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
    /// running without the configured credentials is never what the operator wanted. A change
    /// that does not parse keeps the loaded value: a half-written certificate must not take
    /// the port down.
    pub fn load(
        what: &'static str,
        paths: Vec<PathBuf>,
        parse: impl Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, LoadError> {
        let parse = move |files: &[Vec<u8>]| {
            parse(files).map(|value| Parsed {
                value,
                skipped: Vec::new(),
            })
        };
        Self::start(what, paths, Box::new(parse), None)
    }

    /// As [`Self::load`], for files that grant access: a reload applies the entries that
    /// load and leaves out the others, and files that cannot be read or parsed at all grant
    /// nothing (`T::default()`), so an edit that revokes something always revokes it. At
    /// start, a skipped entry is an error like any other.
    pub fn load_grants(
        what: &'static str,
        paths: Vec<PathBuf>,
        parse: impl Fn(&[Vec<u8>]) -> Result<Parsed<T>, String> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, LoadError>
    where
        T: Default,
    {
        Self::start(what, paths, Box::new(parse), Some(T::default))
    }

    fn start(
        what: &'static str,
        paths: Vec<PathBuf>,
        parse: Parse<T>,
        fallback: Option<fn() -> T>,
    ) -> Result<Arc<Self>, LoadError> {
        let contents = read_all(&paths)?;
        let invalid = |message| LoadError::Invalid {
            what,
            paths: describe(&paths),
            message,
        };
        let parsed = parse(&contents).map_err(invalid)?;
        if !parsed.skipped.is_empty() {
            return Err(invalid(parsed.skipped.join("; ")));
        }
        Ok(Arc::new(Self {
            what,
            paths,
            parse,
            fallback,
            current: RwLock::new(Arc::new(parsed.value)),
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

    fn replace(&self, value: T) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
    }

    /// Re-reads the files every `interval` until `stop`.
    pub fn watch(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                self.reload();
            }
        });
    }

    /// Reads the files and, if they changed, applies them.
    fn reload(&self) {
        let contents = match read_all(&self.paths) {
            Ok(contents) => contents,
            Err(e) => {
                // Whatever can be read next is parsed, even the same contents as in use.
                let seen =
                    std::mem::take(&mut *self.seen.lock().unwrap_or_else(|e| e.into_inner()));
                // Logged once, not at every tick while the file stays unreadable.
                self.unloadable(&e.to_string(), !seen.is_empty());
                return;
            }
        };
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == contents {
                return;
            }
            seen.clone_from(&contents);
        }
        let files = describe(&self.paths);
        match (self.parse)(&contents) {
            Ok(Parsed { value, skipped }) => {
                self.replace(value);
                self.set_stale(!skipped.is_empty());
                for entry in &skipped {
                    tracing::error!(what = self.what, %files, %entry, "entry skipped: it grants nothing until it is mended");
                }
                tracing::info!(what = self.what, %files, skipped = skipped.len(), "reloaded");
            }
            Err(message) => self.unloadable(&message, true),
        }
    }

    /// The files changed but cannot be used at all.
    fn unloadable(&self, error: &str, log: bool) {
        let files = describe(&self.paths);
        match self.fallback {
            Some(nothing) => {
                self.replace(nothing());
                if log {
                    tracing::error!(what = self.what, %files, %error, "cannot load: nothing in it is granted until it loads");
                }
            }
            None if log => {
                tracing::warn!(what = self.what, %files, %error, "cannot load; keeping the loaded version");
            }
            None => {}
        }
        self.set_stale(true);
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

    /// Comma-separated numbers; the ones that are not are left out.
    fn numbers(files: &[Vec<u8>]) -> Result<Parsed<Vec<u32>>, String> {
        let text = String::from_utf8(files[0].clone()).map_err(|e| e.to_string())?;
        let (mut value, mut skipped) = (Vec::new(), Vec::new());
        for entry in text.trim().split(',') {
            match entry.parse() {
                Ok(n) => value.push(n),
                Err(e) => skipped.push(format!("{entry:?}: {e}")),
            }
        }
        Ok(Parsed { value, skipped })
    }

    #[tokio::test]
    async fn a_grant_file_that_changes_grants_what_it_lists_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("n");
        std::fs::write(&path, "1,2").expect("write");
        let value = Reloadable::load_grants("numbers", vec![path.clone()], numbers).expect("loads");
        let stop = CancellationToken::new();
        Arc::clone(&value).watch(Duration::from_millis(10), stop.clone());

        // An entry that does not load is left out, the others apply, and the file is stale.
        std::fs::write(&path, "2,x,3").expect("write");
        wait_for(|| *value.current() == [2, 3]).await;
        assert!(value.is_stale());
        // Not readable as text at all: nothing.
        std::fs::write(&path, [0xff, 0xfe]).expect("write");
        wait_for(|| value.current().is_empty()).await;
        assert!(value.is_stale());
        std::fs::write(&path, "4").expect("write");
        wait_for(|| *value.current() == [4]).await;
        assert!(!value.is_stale());
        // Gone: nothing either.
        std::fs::remove_file(&path).expect("remove");
        wait_for(|| value.current().is_empty()).await;
        assert!(value.is_stale());
        stop.cancel();
        // At start, an entry that does not load stops the service.
        std::fs::write(&path, "1,x").expect("write");
        let err = Reloadable::load_grants("numbers", vec![path], numbers)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("\"x\""), "{err}");
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
