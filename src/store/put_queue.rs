//! Coalescing of concurrent Puts into one statement each.
//!
//! A Put costs the database far more in statement overhead (protocol round trip, transaction,
//! executor start, commit, a task switch each way) than in the rows it writes: pgbench running
//! the Put statement with 8 rows a transaction writes 2.8 times the rows per second of one row a
//! transaction (BENCHMARKS.md, benchmark 3). So Puts go through a queue served by a few writer
//! tasks. A writer takes whatever is queued (up to [`MAX_BATCH`]) and writes it in one
//! statement; while it waits on the database, new Puts queue up for the next free writer. A lone
//! Put is written at once, so coalescing adds no latency: batches only form under load.
//!
//! Each Put keeps its own outcome: the statement checks every row's revision and scope on its
//! own, and returns the rows it wrote. A Put whose caller has gone by its turn is not written.
//! Two Puts to one sensor never share a statement (a statement cannot update a row twice); the
//! later one waits for the next round, so a writer writes Puts to one sensor in the order they
//! were queued (with several writers, two of them taken by different writers may land in
//! either order).

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgDatabaseError, PgPool, PgSeverity};
use sqlx::{Connection, Postgres};
use tokio::sync::{mpsc, oneshot, Mutex};

use super::requests::WriteRequest;
use super::setpoints::{PutRow, SetpointRow, PUT_SQL};
use super::PING_IF_IDLE_FOR;
use crate::domain::Setpoint;
use crate::error::{Error, Result};
use crate::telemetry;

/// Most Puts in one statement. Beyond a few dozen rows a statement saves little more per row,
/// and holds its row locks longer.
const MAX_BATCH: usize = 64;

/// Puts waiting for a writer; a Put beyond this waits to be queued (backpressure).
const QUEUE_CAPACITY: usize = 1024;

struct Job {
    row: PutRow,
    /// The written row, or `None` when the statement wrote nothing for this Put.
    reply: oneshot::Sender<Result<Option<SetpointRow>>>,
}

/// The sending side of the queue; cheap to clone. The writers stop when every clone is dropped.
#[derive(Clone, Debug)]
pub(super) struct PutQueue {
    jobs: mpsc::Sender<Job>,
}

impl PutQueue {
    /// Starts `writers` writer tasks on `pool`, each giving the database `answer_within` to
    /// answer a statement (see [`WriterConnection`]). Must be called within a Tokio runtime.
    pub(super) fn start(pool: PgPool, writers: usize, answer_within: Duration) -> Self {
        let (jobs, queue) = mpsc::channel(QUEUE_CAPACITY);
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..writers.max(1) {
            tokio::spawn(write_loop(pool.clone(), Arc::clone(&queue), answer_within));
        }
        Self { jobs }
    }

    /// Writes `row` with whatever other Puts are queued with it. `Ok(None)`: nothing was written
    /// (revision, scope or unchanged values; the caller finds out which).
    pub(super) async fn put(&self, row: PutRow) -> Result<Option<SetpointRow>> {
        let (reply, answer) = oneshot::channel();
        let stopped = || Error::Internal("setpoint writers stopped".into());
        self.jobs
            .send(Job { row, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Puts queued and not yet taken by a writer.
    pub(super) fn waiting(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }
}

async fn write_loop(pool: PgPool, queue: Arc<Mutex<mpsc::Receiver<Job>>>, answer_within: Duration) {
    let mut connection = WriterConnection {
        pool,
        held: None,
        answer_within,
    };
    loop {
        // One writer at a time waits on the queue; it takes what is there and lets the next
        // writer wait while it writes.
        let batch = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            batch
        };
        write_batch(&mut connection, batch).await;
    }
}

/// A writer's connection, kept between statements: handed back to the pool it would be pinged
/// on every return (a second round trip per statement). Its statements get `answer_within`, so
/// a peer gone without a reset fails the Puts behind it as UNAVAILABLE, not after TCP gives up.
struct WriterConnection {
    pool: PgPool,
    held: Option<(PoolConnection<Postgres>, Instant)>,
    answer_within: Duration,
}

impl WriterConnection {
    async fn get(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        if let Some((connection, last_used)) = &mut self.held {
            if last_used.elapsed() >= PING_IF_IDLE_FOR
                && !matches!(
                    tokio::time::timeout(self.answer_within, connection.ping()).await,
                    Ok(Ok(()))
                )
            {
                self.discard();
            }
        }
        let connection = match self.held.take() {
            Some((connection, _)) => connection,
            None => self.pool.acquire().await?,
        };
        Ok(&mut self.held.insert((connection, Instant::now())).0)
    }

    /// Closes the connection; the next [`Self::get`] acquires a new one.
    fn discard(&mut self) {
        if let Some((mut connection, _)) = self.held.take() {
            connection.close_on_drop();
        }
    }
}

/// Whether `error` may have left the connection unusable: anything but an error the server
/// reported for the statement alone (a FATAL one ends the session, e.g. when the backend is
/// terminated).
fn breaks_connection(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<PgDatabaseError>()
            .is_none_or(|pg| matches!(pg.severity(), PgSeverity::Fatal | PgSeverity::Panic)),
        _ => true,
    }
}

/// Writes `batch` in as few statements as its sensors allow and answers every job.
async fn write_batch(connection: &mut WriterConnection, batch: Vec<Job>) {
    for mut round in rounds(batch) {
        // A Put whose caller is gone (its deadline passed, it disconnected) while it waited is
        // not written: it could only land after whatever that caller did next, such as the
        // same Put again with other values. Its caller learnt nothing either way.
        round.retain(|job| !job.reply.is_closed());
        if round.is_empty() {
            continue;
        }
        let answer_within = connection.answer_within;
        match connection.get().await {
            Ok(c) => {
                if !write_round(c, round, answer_within).await {
                    connection.discard();
                }
            }
            Err(e) => fail_all(round, Error::from(e)),
        }
    }
}

/// Answers every job of `jobs` with `error`: one gets the error itself (a lone Put, its own
/// status), the others a copy (`sqlx::Error` cannot be cloned).
fn fail_all(jobs: Vec<Job>, error: Error) {
    let mut jobs = jobs.into_iter();
    let first = jobs.next();
    for job in jobs {
        let _ = job.reply.send(Err(error.for_another_caller()));
    }
    if let Some(job) = first {
        let _ = job.reply.send(Err(error));
    }
}

/// Splits `batch` into rounds without a repeated sensor, keeping each sensor's Puts in order.
fn rounds(batch: Vec<Job>) -> Vec<Vec<Job>> {
    let mut rounds: Vec<Vec<Job>> = Vec::new();
    for job in batch {
        // The first round after the last one that has this sensor.
        let first_free = rounds
            .iter()
            .rposition(|round| {
                round
                    .iter()
                    .any(|j| j.row.sensor_id() == job.row.sensor_id())
            })
            .map_or(0, |last| last + 1);
        match rounds.get_mut(first_free) {
            Some(round) => round.push(job),
            None => rounds.push(vec![job]),
        }
    }
    rounds
}

/// Writes one round and answers its jobs. False when the connection may be broken.
async fn write_round(
    connection: &mut PgConnection,
    mut round: Vec<Job>,
    answer_within: Duration,
) -> bool {
    // Rows in key order, so that two statements lock shared sensors in the same order.
    round.sort_by(|a, b| a.row.sensor_id().cmp(b.row.sensor_id()));
    let rows: Vec<&PutRow> = round.iter().map(|job| &job.row).collect();
    metrics::counter!(telemetry::SETPOINT_WRITE_STATEMENTS).increment(1);
    metrics::counter!(telemetry::SETPOINT_WRITES).increment(rows.len() as u64);
    match execute(connection, &rows, answer_within).await {
        Ok(mut written) => {
            for job in round {
                let row = written
                    .iter()
                    .position(|w| w.version.sensor_id == job.row.sensor_id())
                    .map(|i| written.swap_remove(i));
                let _ = job.reply.send(Ok(row));
            }
            true
        }
        // A statement error (a deadlock with another replica's statement, a constraint) belongs
        // to one of the rows or to the combination: write each on its own, so that every Put
        // gets its own outcome.
        Err(e) if round.len() > 1 && !breaks_connection(&e) => {
            let mut usable = true;
            for job in round {
                let result = execute(connection, &[&job.row], answer_within).await;
                metrics::counter!(telemetry::SETPOINT_WRITE_STATEMENTS).increment(1);
                usable &= result.as_ref().err().is_none_or(|e| !breaks_connection(e));
                let _ = job
                    .reply
                    .send(result.map(|mut w| w.pop()).map_err(Error::from));
            }
            usable
        }
        Err(e) => {
            let usable = !breaks_connection(&e);
            fail_all(round, Error::from(e));
            usable
        }
    }
}

/// A column of the rows' request ids (NULL for a row without one).
fn request<'a>(rows: &[&'a PutRow], f: fn(&WriteRequest) -> &String) -> Vec<Option<&'a str>> {
    rows.iter()
        .map(|r| r.request.as_ref().map(|q| f(q).as_str()))
        .collect()
}

/// Runs the Put statement for `rows`; a database that has not answered within `answer_within`
/// is an I/O error (UNAVAILABLE to the callers, and the connection is dropped).
async fn execute(
    connection: &mut PgConnection,
    rows: &[&PutRow],
    answer_within: Duration,
) -> Result<Vec<SetpointRow>, sqlx::Error> {
    let column = |f: fn(&PutRow) -> &str| rows.iter().map(|r| f(r)).collect::<Vec<_>>();
    let number = |f: fn(&Setpoint) -> f64| rows.iter().map(|r| f(&r.setpoint)).collect::<Vec<_>>();
    let statement = sqlx::query_as(PUT_SQL)
        .bind(column(PutRow::sensor_id))
        .bind(column(|r| r.setpoint.building_id.as_str()))
        .bind(number(|s| s.desired().value()))
        .bind(number(|s| s.up_delta().value()))
        .bind(number(|s| s.down_delta().value()))
        .bind(column(|r| &r.actor))
        .bind(column(|r| &r.reason))
        .bind(rows.iter().map(|r| r.expected_revision).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.scope.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.may_bind).collect::<Vec<_>>())
        .bind(request(rows, |r| &r.caller))
        .bind(request(rows, |r| &r.id))
        .bind(request(rows, |r| &r.request))
        .fetch_all(connection);
    tokio::time::timeout(answer_within, statement)
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the database did not answer the Put statement in time",
            )))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{BuildingId, Reason, Scope, SensorId};

    fn job(sensor: &str, desired: f64) -> Job {
        let setpoint = Setpoint::new(
            SensorId::parse(sensor).unwrap(),
            BuildingId::parse("b").unwrap(),
            desired,
            0.5,
            0.5,
        )
        .unwrap();
        let reason = Reason::parse("").unwrap();
        Job {
            row: PutRow::new(&setpoint, None, "t", &reason, &Scope::All, None),
            reply: oneshot::channel().0,
        }
    }

    fn shape(rounds: &[Vec<Job>]) -> Vec<Vec<(String, f64)>> {
        rounds
            .iter()
            .map(|round| {
                round
                    .iter()
                    .map(|j| {
                        (
                            j.row.sensor_id().to_owned(),
                            j.row.setpoint.desired().value(),
                        )
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn distinct_sensors_share_one_round() {
        let batch = vec![job("a", 1.0), job("b", 2.0), job("c", 3.0)];
        assert_eq!(
            shape(&rounds(batch)),
            vec![vec![
                ("a".into(), 1.0),
                ("b".into(), 2.0),
                ("c".into(), 3.0)
            ]]
        );
    }

    #[test]
    fn a_repeated_sensor_waits_for_a_later_round_in_queue_order() {
        let batch = vec![
            job("a", 1.0),
            job("a", 2.0),
            job("b", 3.0),
            job("a", 4.0),
            job("b", 5.0),
            job("c", 6.0),
        ];
        assert_eq!(
            shape(&rounds(batch)),
            vec![
                vec![("a".into(), 1.0), ("b".into(), 3.0), ("c".into(), 6.0)],
                vec![("a".into(), 2.0), ("b".into(), 5.0)],
                vec![("a".into(), 4.0)],
            ]
        );
    }

    #[test]
    fn scope_is_joined_for_the_statement() {
        let buildings = ["north", "south"].map(|b| BuildingId::parse(b).unwrap());
        let scope = Scope::Buildings(buildings.into_iter().collect());
        let setpoint = job("a", 1.0).row.setpoint;
        let row = PutRow::new(
            &setpoint,
            Some(3),
            "t",
            &Reason::parse("").unwrap(),
            &scope,
            None,
        );
        assert_eq!(row.scope.as_deref(), Some("north,south"));
        assert_eq!(row.expected_revision, Some(3));
        // No building at all is an empty list (`string_to_array('', ',')` is `{}`), not "all".
        let none = Scope::Buildings(Default::default());
        let row = PutRow::new(
            &setpoint,
            None,
            "t",
            &Reason::parse("").unwrap(),
            &none,
            None,
        );
        assert_eq!(row.scope.as_deref(), Some(""));
    }
}
