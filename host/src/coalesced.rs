//! Writes coalesced into one job of the database's writer thread: concurrent callers
//! add their items, and one job writes every item added before it runs, instead of a
//! job each (a job costs the writer its own statements, and, unless it is the first of
//! its group, a savepoint, which copies every page the job touches). The trust store's
//! revocations and the queue's publishes go through one.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::FutureExt;
use futures_util::future::Shared;
use rusqlite::Connection;

use crate::store::{Database, StoreError};

/// The outcome of one job, awaited by every caller whose items it wrote.
pub type Written = Shared<Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>>;

/// What writes a job's items, in the writer's transaction: an error undoes them all.
type WriteItems<T> = dyn Fn(&Connection, Vec<T>) -> Result<(), StoreError> + Send + Sync;

/// Items of type `T` written to a [`Database`] by coalesced jobs.
pub struct Coalesced<T> {
    db: Database,
    /// Whether the jobs are synced writes (see [`Database::write_synced`]).
    synced: bool,
    write: Arc<WriteItems<T>>,
    unwritten: Arc<Mutex<Unwritten<T>>>,
}

/// Items added and not yet taken by a job.
struct Unwritten<T> {
    items: Vec<T>,
    /// The job queued for them, until it runs.
    job: Option<Written>,
}

impl<T: Send + 'static> Coalesced<T> {
    /// Items written to `db` by `write`, in jobs that wait for the disk (under
    /// `durability = "full"`) when `synced`.
    pub fn new(
        db: &Database,
        synced: bool,
        write: impl Fn(&Connection, Vec<T>) -> Result<(), StoreError> + Send + Sync + 'static,
    ) -> Self {
        Coalesced {
            db: db.clone(),
            synced,
            write: Arc::new(write),
            unwritten: Arc::new(Mutex::new(Unwritten {
                items: Vec::new(),
                job: None,
            })),
        }
    }

    /// Adds `items` to the job queued for the items not yet written, if one is queued
    /// and has not run yet, else queues one; returns that job's outcome. The items of one
    /// call are written by one job, in one transaction; a write queued after this call
    /// is queued after that job, and commits no earlier.
    pub fn add(&self, items: impl IntoIterator<Item = T>) -> Written {
        let mut unwritten = lock(&self.unwritten);
        if unwritten
            .job
            .clone()
            .is_some_and(|job| job.now_or_never().is_some())
        {
            // That job ended without running (its transaction could not begin): the
            // items it was to write have failed with it.
            unwritten.items.clear();
            unwritten.job = None;
        }
        unwritten.items.extend(items);
        unwritten
            .job
            .get_or_insert_with(|| self.queue_job())
            .clone()
    }

    /// Queues the job that, once it runs, takes every item added by then and writes them.
    fn queue_job(&self) -> Written {
        let (unwritten, write) = (self.unwritten.clone(), self.write.clone());
        let work = move |conn: &Connection| {
            let items = {
                let mut unwritten = lock(&unwritten);
                unwritten.job = None;
                std::mem::take(&mut unwritten.items)
            };
            write(conn, items)
        };
        self.db.queue_write(self.synced, work).shared()
    }
}

/// The items not yet written, even if a thread panicked holding them.
fn lock<T>(unwritten: &Mutex<Unwritten<T>>) -> MutexGuard<'_, Unwritten<T>> {
    unwritten.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_rows;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Integers written to table `t` by a coalescer that counts its jobs, and refuses
    /// (writing nothing that stays) a job holding a negative one.
    fn integers(db: &Database) -> (Coalesced<i64>, Arc<AtomicUsize>) {
        let jobs = Arc::new(AtomicUsize::new(0));
        let counted = jobs.clone();
        let coalesced = Coalesced::new(db, true, move |conn, items: Vec<i64>| {
            counted.fetch_add(1, Ordering::SeqCst);
            for item in items {
                conn.execute("INSERT INTO t VALUES (?1)", [item])?;
                if item < 0 {
                    return Err(StoreError::Sqlite(format!("{item} refused")));
                }
            }
            Ok(())
        });
        (coalesced, jobs)
    }

    #[tokio::test]
    async fn items_added_before_the_job_runs_share_it_and_its_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::test_db(dir.path());
        db.write(|c| {
            c.execute_batch("CREATE TABLE t (v INTEGER)")
                .map_err(StoreError::from)
        })
        .await
        .unwrap();
        let (coalesced, jobs) = integers(&db);
        // Held by a write queued first, the writer runs the job only once all three
        // calls added their items.
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let holding = db.write_later(move |_| -> Result<(), StoreError> {
            held.recv().ok();
            Ok(())
        });
        let calls = [
            coalesced.add([1, 2]),
            coalesced.add([3]),
            coalesced.add([4]),
        ];
        hold.send(()).unwrap();
        holding.await.unwrap();
        for call in calls {
            call.await.unwrap();
        }
        assert_eq!(
            jobs.load(Ordering::SeqCst),
            1,
            "one job for the three calls"
        );
        assert_eq!(test_rows(&db).await, vec![1, 2, 3, 4], "in the order added");

        // A failing job fails every call it holds, and undoes all of their items; the
        // next call gets a job of its own.
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let holding = db.write_later(move |_| -> Result<(), StoreError> {
            held.recv().ok();
            Ok(())
        });
        let calls = [coalesced.add([5]), coalesced.add([-1])];
        hold.send(()).unwrap();
        holding.await.unwrap();
        for call in calls {
            let err = call.await.unwrap_err().to_string();
            assert_eq!(err, "-1 refused");
        }
        coalesced.add([6]).await.unwrap();
        assert_eq!(jobs.load(Ordering::SeqCst), 3);
        assert_eq!(test_rows(&db).await, vec![1, 2, 3, 4, 6]);
    }
}
