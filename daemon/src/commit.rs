//! The last steps of ingest, the same on both daemons: verified batches are written in
//! order by a [`Sink`], and a group commit runs beside the writer — while one fsync runs,
//! the next batches are received and verified (an append to the same disk waits for the
//! journal the fsync holds), and the next commit takes all that was written meanwhile, so
//! the commit rate adapts to the disk's flush time. What a commit made durable is acked,
//! cumulatively.

use crate::{Site, store_status};
use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::sync::Arc;
use tern_core::{DiskName, Seq};
use tern_store::{DiskHandle, Store};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Status;

/// A disk and the position a commit made durable on it.
pub type Durable = (Arc<DiskHandle>, Seq);

/// What was written to a disk and not yet made durable.
#[derive(Debug)]
pub enum Written {
    /// Appended to the disk's journal.
    Journal(Arc<DiskHandle>),
    /// Written through onto the disk's file, through record `last`.
    Through { disk: Arc<DiskHandle>, file: Arc<File>, last: Seq },
}

impl Written {
    fn disk(&self) -> &Arc<DiskHandle> {
        match self {
            Written::Journal(d) | Written::Through { disk: d, .. } => d,
        }
    }
}

/// The group commit of one stream: at most one commit runs at a time.
#[derive(Debug)]
pub struct GroupCommit {
    store: Arc<Store>,
    site: Site,
    unsynced: HashMap<DiskName, Written>,
    running: Option<JoinHandle<Result<Vec<Durable>, Status>>>,
}

impl GroupCommit {
    pub fn new(store: Arc<Store>, site: Site) -> Self {
        Self { store, site, unsynced: HashMap::new(), running: None }
    }

    /// Notes a write; the next commit makes it durable.
    pub fn written(&mut self, w: Written) {
        self.unsynced.insert(w.disk().name.clone(), w);
    }

    /// Starts a commit of everything written so far, unless one runs or nothing waits.
    fn start(&mut self) {
        if self.running.is_some() || self.unsynced.is_empty() {
            return;
        }
        let work: Vec<Written> = self.unsynced.drain().map(|(_, w)| w).collect();
        let (store, site) = (self.store.clone(), self.site);
        self.running = Some(tokio::task::spawn_blocking(move || {
            work.into_iter()
                .map(|w| match w {
                    Written::Journal(d) => d.sync().map(|s| (d, s)),
                    Written::Through { disk, file, last } => {
                        store.commit_through(&disk, &file, last).map(|()| (disk.clone(), disk.durable()))
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| store_status(e, site))
        }));
    }

    /// Waits for the running commit (pending forever when none runs).
    async fn finished(&mut self) -> Result<Vec<Durable>, Status> {
        let Some(running) = self.running.as_mut() else { return std::future::pending().await };
        let done = running.await.map_err(|e| Status::internal(e.to_string())).and_then(|r| r);
        self.running = None;
        done
    }

    /// Makes everything written so far durable: waits for the running commit, then
    /// commits the rest. Returns what both made durable.
    pub async fn flush(&mut self) -> Result<Vec<Durable>, Status> {
        let mut acks = Vec::new();
        if self.running.is_some() {
            acks.extend(self.finished().await?);
        }
        self.start();
        if self.running.is_some() {
            acks.extend(self.finished().await?);
        }
        Ok(acks)
    }
}

/// Where one stream's verified items go, in order.
pub trait Sink: Send {
    type Item: Send;
    /// Writes one item (noting what it wrote with `gc.written`); may flush `gc` first when
    /// the item needs everything before it durable (a recovery point).
    fn take(
        &mut self,
        item: Self::Item,
        gc: &mut GroupCommit,
    ) -> impl Future<Output = Result<(), Status>> + Send;
    /// Told what a commit made durable: ack it.
    fn durable(&mut self, done: Vec<Durable>);
}

/// Takes items from `rx` in order into `sink`, committing beside it. When the stream ends,
/// or an item is refused, what was written is still made durable and acked; the refusal
/// is returned.
pub async fn write_loop<S: Sink>(
    mut rx: mpsc::Receiver<S::Item>,
    mut sink: S,
    mut gc: GroupCommit,
) -> Result<(), Status> {
    let result = loop {
        tokio::select! {
            biased;
            done = gc.finished(), if gc.running.is_some() => match done {
                Ok(done) => sink.durable(done),
                Err(s) => break Err(s),
            },
            item = rx.recv() => match item {
                None => break Ok(()),
                Some(item) => {
                    if let Err(s) = sink.take(item, &mut gc).await {
                        break Err(s);
                    }
                }
            },
        }
        gc.start();
    };
    match gc.flush().await {
        Ok(done) => sink.durable(done),
        Err(s) if result.is_ok() => return Err(s),
        Err(_) => {}
    }
    result
}
