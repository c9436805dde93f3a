//! One subscriber's stream, reading the shared broadcast only when the client reads.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{FutureExt, Stream};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

use super::{Filter, LiveEvent, SnapshotCoverage, SnapshotCursor, SnapshotPart};
use crate::domain::Scope;
use crate::error::Error;
use crate::proto::v1 as pb;
use crate::stream::ControlHandle;
use crate::telemetry;

/// Who reads a subscription, checked again while it is open.
pub struct Caller {
    /// Called every `every`: the caller's scope now, or why the stream must end (an expired or
    /// revoked credential). A narrowed scope applies from then on.
    pub recheck: Box<dyn FnMut() -> Result<Scope, Error> + Send>,
    pub every: Duration,
}

/// How a subscription starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Start {
    /// Send the last command of every matching heater first, and catch up from the heaters'
    /// state when falling behind.
    pub initial_state: bool,
    /// Say when a snapshot (or a catch-up) is complete ([`Update::SnapshotComplete`]).
    pub marks_snapshot_end: bool,
    /// Of the initial state, only the heaters whose last command was decided at or after this
    /// (a client resuming): the others have not changed since.
    pub decided_since: Option<DateTime<Utc>>,
}

/// What a subscription hands out.
// Handed straight on, one at a time: boxing the event would allocate once per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    Event(pb::HeaterCommandEvent),
    /// Every heater's state has been sent; live events follow.
    SnapshotComplete,
}

/// Why a subscription ended.
#[derive(Debug)]
pub enum FeedEnd {
    /// The server is stopping.
    Stopping,
    /// The subscriber read too slowly and did not ask for the initial state, so it cannot be
    /// caught up.
    FellBehind { missed: u64 },
    /// The caller's credentials no longer allow reading.
    Refused(Error),
}

/// One subscriber's stream. One that falls behind the buffer is caught up from the heaters'
/// last commands if it asked for the initial state (sent as a snapshot, then live again), else
/// ended with [`FeedEnd::FellBehind`].
pub struct Subscription {
    /// The part of the snapshot (or catch-up) not sent yet, and where the next part starts:
    /// parts are taken from the engine as the client reads.
    snapshot: std::vec::IntoIter<pb::HeaterCommandEvent>,
    more: Option<SnapshotCursor>,
    control: ControlHandle,
    live: broadcast::Receiver<LiveEvent>,
    /// Whether falling behind is caught up from the engine's state rather than the end.
    catches_up: bool,
    filter: Filter,
    caller: Caller,
    recheck: tokio::time::Interval,
    /// What the snapshot (or the last catch-up) sent: drops the live events it already
    /// reflects, and tells a catch-up what is newer.
    sent: SnapshotCoverage,
    shutdown: CancellationToken,
    ended: bool,
    /// Whether a snapshot or catch-up is being sent whose end is not marked yet.
    snapshot_open: bool,
    marks_snapshot_end: bool,
    /// Drops the initial state's heaters decided before it (nanoseconds since the epoch).
    decided_since: Option<i64>,
    /// Events handed to the stream (a handle, so that counting one is an atomic add).
    events_sent: metrics::Counter,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        metrics::gauge!(telemetry::SUBSCRIBERS).decrement(1.0);
    }
}

type Item = Result<Update, FeedEnd>;

/// Keeps the events of `part` decided at or after `since`, if given.
fn keep_decided_since(mut part: SnapshotPart, since: Option<i64>) -> SnapshotPart {
    if let Some(since) = since {
        part.events.retain(|e| {
            e.decided_at.as_ref().is_some_and(|t| {
                t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos) >= since
            })
        });
    }
    part
}

impl Subscription {
    /// Subscribes, then takes the snapshot's first part if `initial_state`: a loop that is
    /// stopping fails here (`None`) rather than in the stream.
    pub(in crate::stream) async fn open(
        control: ControlHandle,
        filter: Filter,
        start: Start,
        caller: Caller,
        shutdown: CancellationToken,
    ) -> Option<Self> {
        let Start {
            initial_state,
            marks_snapshot_end,
            decided_since: since,
        } = start;
        let since = since.map(|t| t.timestamp_nanos_opt().unwrap_or(i64::MIN));
        // Subscribe before taking the snapshot, so no command falls between the two; the
        // overlap is told by the live events' numbers (`SnapshotCoverage`).
        let live = control.subscribe();
        let mut sent = SnapshotCoverage::default();
        let snapshot = if initial_state {
            let part = control
                .snapshot(filter.clone(), SnapshotCursor::default())
                .await?;
            sent.add(&part);
            keep_decided_since(part, since)
        } else {
            SnapshotPart::default()
        };
        metrics::gauge!(telemetry::SUBSCRIBERS).increment(1.0);
        let every = caller.every;
        Some(Self {
            sent,
            snapshot: snapshot.events.into_iter(),
            more: snapshot.next,
            control,
            live,
            catches_up: initial_state,
            filter,
            caller,
            recheck: tokio::time::interval_at(tokio::time::Instant::now() + every, every),
            shutdown,
            ended: false,
            snapshot_open: initial_state,
            marks_snapshot_end,
            decided_since: since,
            events_sent: metrics::counter!(telemetry::SUBSCRIBER_EVENTS),
        })
    }

    /// The events, ending with the reason when the feed ends them.
    pub fn into_stream(self) -> impl Stream<Item = Item> + Send {
        futures::stream::unfold(self, Self::next)
    }

    /// Checks the caller's credentials again; the new scope replaces the old one.
    fn reauthenticate(&mut self) -> Result<(), FeedEnd> {
        self.filter.scope = (self.caller.recheck)().map_err(FeedEnd::Refused)?;
        Ok(())
    }

    /// The stream's last item: `end`; the next call ends the stream.
    fn end(mut self, end: FeedEnd) -> Option<(Item, Self)> {
        self.ended = true;
        Some((Err(end), self))
    }

    fn send(self, event: pb::HeaterCommandEvent) -> Option<(Item, Self)> {
        self.events_sent.increment(1);
        Some((Ok(Update::Event(event)), self))
    }

    // The subscriber's state machine in one place (snapshot, catch-up, live, recheck, end):
    // each step hands out one item, so the states share the loop.
    async fn next(mut self) -> Option<(Item, Self)> {
        if self.ended {
            return None;
        }
        loop {
            if let Some(event) = self.snapshot.next() {
                // A part fetched before a revocation must not outlive it.
                if self.recheck.tick().now_or_never().is_some() {
                    if let Err(end) = self.reauthenticate() {
                        return self.end(end);
                    }
                }
                if !self.filter.scope.contains_str(&event.building_id) {
                    continue;
                }
                return self.send(pb::HeaterCommandEvent {
                    snapshot: true,
                    ..event
                });
            }
            if let Some(from) = self.more.take() {
                // The recheck is otherwise only awaited with the live feed: a snapshot of a
                // million heaters to a slow client must not outlast a revoked credential.
                if self.recheck.tick().now_or_never().is_some() {
                    if let Err(end) = self.reauthenticate() {
                        return self.end(end);
                    }
                }
                let Some(part) = self.control.snapshot(self.filter.clone(), from).await else {
                    return self.end(FeedEnd::Stopping);
                };
                self.sent.add(&part);
                let part = keep_decided_since(part, self.decided_since);
                self.snapshot = part.events.into_iter();
                self.more = part.next;
                continue;
            }
            if std::mem::take(&mut self.snapshot_open) {
                // Resuming filters the initial state only; a catch-up sends what is newer.
                self.decided_since = None;
                if self.marks_snapshot_end {
                    return Some((Ok(Update::SnapshotComplete), self));
                }
            }
            let received = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return self.end(FeedEnd::Stopping),
                _ = self.recheck.tick() => {
                    if let Err(end) = self.reauthenticate() {
                        return self.end(end);
                    }
                    continue;
                }
                received = self.live.recv() => received,
            };
            match received {
                Ok(live) => {
                    let event = &live.event;
                    if !self.filter.matches(event) || self.sent.covers(&live) {
                        continue;
                    }
                    let event = (**event).clone();
                    return self.send(event);
                }
                Err(RecvError::Lagged(missed)) if self.catches_up => {
                    metrics::counter!(telemetry::SUBSCRIBERS_BEHIND, "outcome" => "caught_up")
                        .increment(1);
                    tracing::debug!(missed, "subscriber fell behind; catching up");
                    // A fresh place in the feed before the catch-up's first part is taken, as
                    // for the snapshot: what the parts reflect is told by the numbers again.
                    self.live = self.control.subscribe();
                    let sent = std::mem::take(&mut self.sent);
                    self.more = Some(SnapshotCursor::catch_up(sent));
                    self.snapshot_open = true;
                }
                Err(RecvError::Lagged(missed)) => {
                    metrics::counter!(telemetry::SUBSCRIBERS_BEHIND, "outcome" => "ended")
                        .increment(1);
                    return self.end(FeedEnd::FellBehind { missed });
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}
