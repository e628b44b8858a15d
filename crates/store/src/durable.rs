//! Pipelined durability for SQLite: the writer commits without syncing and
//! starts its next batch at once; this thread syncs the WAL and only then
//! answers the batch's callers. One fdatasync covers every batch committed
//! before it began, and the writer does not wait for the disk (except when
//! the WAL reaches its bound; see `sqlite::WalGauge`).
//!
//! Committed but not yet synced data is visible to SQLite readers, so reads
//! go through a barrier: the writer announces a batch's number before its
//! COMMIT, and a read, once done, waits until that number is durable before
//! anyone sees its result. No caller ever observes work a power cut could
//! take back.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use tokio::sync::watch;

use crate::StoreError;
use crate::writer::Job;

/// Batch numbers announced for commit and made durable.
pub(crate) struct Watermarks {
    /// The last batch whose COMMIT has started: readers may see it.
    announced: AtomicU64,
    durable: watch::Sender<u64>,
}

impl Watermarks {
    pub(crate) fn new() -> Arc<Watermarks> {
        Arc::new(Watermarks {
            announced: AtomicU64::new(0),
            durable: watch::Sender::new(0),
        })
    }

    /// Before a COMMIT: from now on readers may see batch `seq`.
    pub(crate) fn announce(&self, seq: u64) {
        self.announced.store(seq, Ordering::SeqCst);
    }

    /// After a read: waits until everything it may have seen is durable.
    pub(crate) async fn settle_read(&self) {
        let seen = self.announced.load(Ordering::SeqCst);
        let mut rx = self.durable.subscribe();
        let _ = rx.wait_for(|d| *d >= seen).await;
    }
}

/// A committed batch waiting for its sync; `jobs` empty for a batch whose
/// COMMIT failed (it still moves the watermark past its number, in order).
pub(crate) struct Synced {
    pub seq: u64,
    /// When its COMMIT returned: the wait from there to the fsync that
    /// covers it is part of every caller's latency, and is measured.
    pub committed: std::time::Instant,
    pub jobs: Vec<(Box<dyn Job>, Option<StoreError>)>,
}

pub(crate) struct Syncer {
    tx: flume::Sender<Synced>,
}

impl Syncer {
    /// Starts the sync thread for the WAL at `wal`.
    pub(crate) fn start(
        wal: PathBuf,
        marks: Arc<Watermarks>,
    ) -> std::io::Result<(Syncer, JoinHandle<()>)> {
        let (tx, rx) = flume::unbounded::<Synced>();
        let handle = std::thread::Builder::new()
            .name("payrail-fsync".into())
            .spawn(move || {
                raise_priority();
                run(&wal, &rx, &marks)
            })?;
        Ok((Syncer { tx }, handle))
    }

    pub(crate) fn submit(&self, s: Synced) {
        if let Err(flume::SendError(s)) = self.tx.send(s) {
            // The sync thread is gone only if it aborted the process.
            for (job, _) in s.jobs {
                job.finish(Err(StoreError::Closed));
            }
        }
    }
}

/// Every answer waits on this thread twice: for its `fdatasync`, and then
/// for the scheduler to run it again so that it can hand the answers out.
/// On two cores shared with the HTTP workers (and, in a benchmark, the load
/// generator) that second wait is long enough to matter: five steps of
/// `nice` above the thread that opened the store gave about 5% more debits
/// a second (README, *Performance*). Raising the writer as well lost (it
/// then takes the CPU from the workers that feed it); lowering the
/// checkpointer instead raised p99. Relative, so an operator's own `nice`
/// still holds. Raising a priority needs `CAP_SYS_NICE` or an
/// `RLIMIT_NICE`; without either this thread keeps its priority and says so
/// at debug level.
#[cfg(target_os = "linux")]
fn raise_priority() {
    use rustix::process::{getpriority_process, setpriority_process};
    let me = Some(rustix::thread::gettid());
    let raised = getpriority_process(me).and_then(|nice| setpriority_process(me, nice - 5));
    if let Err(e) = raised {
        tracing::debug!(error = %e, "the fsync thread keeps the process's priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn raise_priority() {}

fn run(wal: &std::path::Path, rx: &flume::Receiver<Synced>, marks: &Watermarks) {
    let mut file: Option<File> = None;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let started = std::time::Instant::now();
        // Rolled-back batches (no jobs) only move the watermark: not counted.
        for s in batch.iter().filter(|s| !s.jobs.is_empty()) {
            metrics::histogram!("payrail_sqlite_sync_wait_seconds")
                .record(started.duration_since(s.committed).as_secs_f64());
        }
        let synced = sync(wal, &mut file);
        metrics::histogram!("payrail_sqlite_fsync_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("payrail_sqlite_batches_per_fsync").record(batch.len() as f64);
        if let Err(e) = synced {
            // After a failed fsync the kernel may have dropped the dirty pages:
            // what SQLite believes committed may not be on disk. The only safe
            // course is PostgreSQL's: stop, and recover from the WAL on restart.
            tracing::error!(error = %e, wal = %wal.display(), "fsync of the WAL failed; aborting to recover from disk");
            std::process::abort();
        }
        let top = batch.iter().map(|s| s.seq).max().unwrap_or(0);
        marks.durable.send_if_modified(|d| {
            let moved = top > *d;
            *d = (*d).max(top);
            moved
        });
        for s in batch {
            for (job, err) in s.jobs {
                job.finish(err.map_or(Ok(()), Err));
            }
        }
    }
}

/// fdatasync of the WAL, reopening it if SQLite has replaced the file.
fn sync(wal: &std::path::Path, file: &mut Option<File>) -> std::io::Result<()> {
    let current = match std::fs::metadata(wal) {
        Ok(m) => m.ino(),
        // SQLite deletes the WAL only when its last connection closes, after
        // copying all of it into the database file and syncing that: what it
        // held is durable. (Aborting here would crash a clean shutdown.)
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let stale = file
        .as_ref()
        .is_none_or(|f| f.metadata().is_ok_and(|m| m.ino() != current));
    if stale {
        *file = Some(File::open(wal)?);
    }
    file.as_ref().expect("opened above").sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wal_removed_by_a_clean_close_needs_no_sync() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("db-wal");
        let mut file = None;
        sync(&wal, &mut file).expect("no WAL: nothing left to sync");
        std::fs::write(&wal, b"frames").unwrap();
        sync(&wal, &mut file).expect("synced");
        assert!(file.is_some());
        std::fs::remove_file(&wal).unwrap();
        sync(&wal, &mut file).expect("removed after a full checkpoint");
    }

    #[tokio::test]
    async fn a_read_waits_until_what_it_may_have_seen_is_durable() {
        let marks = Watermarks::new();
        marks.announce(3);
        let waiting = tokio::spawn({
            let marks = Arc::clone(&marks);
            async move { marks.settle_read().await }
        });
        tokio::task::yield_now().await;
        marks.durable.send_replace(2);
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "released before batch 3 was durable"
        );
        marks.durable.send_replace(3);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("released once durable")
            .unwrap();
        // Nothing announced beyond what is durable: no wait at all.
        tokio::time::timeout(std::time::Duration::from_millis(100), marks.settle_read())
            .await
            .expect("no wait");
    }
}
