//! Replication groups: multi-VM points taken at one cut across every member, by a barrier.
//!
//! The server asks each member's agent for a cut (`Barrier`); each reaches one and holds it
//! (scan mode: frozen; nbd mode: its new writes wait) and says so (`BarrierReached`). Once
//! every member has, the server releases them all (`BarrierRelease`, proceed), so that there
//! is a moment at which every member held its cut: the cuts are that moment. Each member's
//! cut then comes as a `MakePoint` answering the barrier; when all have come and their
//! records are durable, one point id is written for all of them in one catalog transaction.
//! A member that is away, refuses (no freeze hook in scan mode), fails or is too slow makes
//! the whole multi-VM point fail with its reason, and the cuts that did come are points of
//! their VM alone: there is never a partial multi-VM point.

use crate::{Ctx, lock};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tern_core::{GroupName, VmName};
use tern_proto::{Barrier, BarrierRelease, ServerMessage, server_message};
use tern_store::{NewPoint, Point};
use tokio::sync::{Notify, oneshot};
use tracing::{info, warn};

/// How long a member holds its cut for the release at most. The server releases only if
/// every member reached its cut within half of it, so no member can have given up by then.
pub const HOLD: Duration = Duration::from_secs(30);

/// How long the members' cuts may take to arrive (with their records) after the release.
const CUTS_WITHIN: Duration = Duration::from_secs(120);

type CutWaiter = oneshot::Sender<Result<Point, String>>;

#[derive(Debug)]
struct Slot {
    group: GroupName,
    members: Vec<VmName>,
    reached: HashSet<VmName>,
    released: bool,
    failed: Option<String>,
    cuts: HashMap<VmName, (NewPoint, CutWaiter)>,
    notify: Arc<Notify>,
}

/// How a group's multi-VM points have gone, for status.
#[derive(Debug, Clone, Default)]
pub struct GroupHealth {
    /// The last attempt's end (ms) and why it failed, if it did.
    pub last_attempt_ms: i64,
    pub last_error: Option<String>,
    /// How long the members held their cut at the last good point (ms).
    pub last_hold_ms: u64,
}

#[derive(Debug, Default)]
pub struct Barriers {
    open: std::sync::Mutex<HashMap<u64, Slot>>,
    health: std::sync::Mutex<HashMap<GroupName, GroupHealth>>,
    /// One multi-VM point at a time per group.
    running: tokio::sync::Mutex<HashSet<GroupName>>,
}

impl Barriers {
    /// A member's agent holds its cut.
    pub fn reached(&self, request_id: u64, vm: &VmName) {
        if let Some(s) = lock(&self.open).get_mut(&request_id)
            && s.members.contains(vm)
        {
            s.reached.insert(vm.clone());
            s.notify.notify_one();
        }
    }

    /// A member could not make its cut, or gave up holding it.
    pub fn failed(&self, request_id: u64, vm: &VmName, reason: &str) {
        if let Some(s) = lock(&self.open).get_mut(&request_id)
            && s.members.contains(vm)
        {
            s.failed.get_or_insert_with(|| reason.to_string());
            s.notify.notify_one();
        }
    }

    /// A member's cut has come and its records are durable. `None` when the request is
    /// no released barrier (the cut is then a point of its VM alone); else the receiver
    /// gets the member's row of the multi-VM point, or why there is none.
    pub fn arrive(
        &self,
        request_ids: &[u64],
        cut: NewPoint,
    ) -> Result<oneshot::Receiver<Result<Point, String>>, NewPoint> {
        let mut open = lock(&self.open);
        let Some(id) = request_ids.iter().find(|id| open.contains_key(id)) else { return Err(cut) };
        let Some(s) = open.get_mut(id) else { return Err(cut) };
        if !s.released || !s.members.contains(&cut.vm) || s.cuts.contains_key(&cut.vm) {
            return Err(cut);
        }
        let (tx, rx) = oneshot::channel();
        s.cuts.insert(cut.vm.clone(), (cut, tx));
        s.notify.notify_one();
        Ok(rx)
    }

    pub fn health(&self, group: &GroupName) -> GroupHealth {
        lock(&self.health).get(group).cloned().unwrap_or_default()
    }

    /// The group's members changed (or it is gone), or one of them failed over: the last
    /// failure was of other members, or from before, and says nothing of the group now.
    pub fn members_changed(&self, group: &GroupName, gone: bool) {
        let mut health = lock(&self.health);
        if gone {
            health.remove(group);
        } else if let Some(h) = health.get_mut(group) {
            h.last_error = None;
        }
    }
}

async fn send(ctx: &Ctx, vm: &VmName, msg: server_message::Msg) -> bool {
    ctx.hub.send_command(vm, ServerMessage { msg: Some(msg) }).await
}

/// Longest an asked-for multi-VM point waits for one already being taken (a barrier gives
/// its members 15 s to reach their cuts).
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A multi-VM point made after it was asked for (a plan's `latest`, `drctl group
/// checkpoint`): one the scheduler is taking at that moment is waited for, then this one is
/// taken. (Taking the newest common point instead lost up to an interval of data.)
pub async fn take_fresh_group_point(
    ctx: &Arc<Ctx>,
    group: &GroupName,
    app: bool,
) -> Result<Vec<Point>, String> {
    let until = tokio::time::Instant::now() + BUSY_WAIT;
    // Waits while one is being taken; a barrier of its own that fails is not tried again.
    while ctx.barriers.running.lock().await.contains(group) && tokio::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    take_group_point(ctx, group, app).await
}

/// Takes one multi-VM point of `group`: the points written (one per member, one id), or
/// why there is none.
pub async fn take_group_point(ctx: &Arc<Ctx>, group: &GroupName, app: bool) -> Result<Vec<Point>, String> {
    if !ctx.barriers.running.lock().await.insert(group.clone()) {
        return Err(format!(
            "a multi-VM point of group {group} is being taken already; try again in a moment"
        ));
    }
    let started = tern_store::now_ms();
    let result = barrier(ctx, group, app).await;
    ctx.barriers.running.lock().await.remove(group);
    let mut health = lock(&ctx.barriers.health);
    let h = health.entry(group.clone()).or_default();
    h.last_attempt_ms = tern_store::now_ms();
    match &result {
        Ok((points, hold_ms)) => {
            h.last_error = None;
            h.last_hold_ms = *hold_ms;
            info!(group = %group, point = %points[0].id, members = points.len(), app,
                ms = h.last_attempt_ms - started, held_ms = hold_ms, "multi-VM point made");
        }
        Err(e) => {
            h.last_error = Some(e.clone());
            warn!(group = %group, error = %e, "no multi-VM point");
        }
    }
    result.map(|(points, _)| points)
}

async fn barrier(ctx: &Arc<Ctx>, group: &GroupName, app: bool) -> Result<(Vec<Point>, u64), String> {
    let store = ctx.store.clone();
    let g = group.clone();
    let row = crate::admin::blocking(move || store.group(&g))
        .await
        .map_err(|e| e.message().to_string())?
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no group is named {group}"))?;
    if row.members.is_empty() {
        return Err(format!(
            "group {group} has no members; add some with `drctl group add {group} --vm ...`"
        ));
    }
    if let Some(why) = paused(ctx, &row).await.map_err(|e| e.message().to_string())? {
        return Err(why);
    }
    for vm in &row.members {
        if !ctx.hub.connected(vm) {
            let since = ctx.hub.disconnected_for(vm).map_or(String::new(), |s| format!(" for {s} s"));
            return Err(format!(
                "VM {vm} is away: its agent is not connected{since}; a multi-VM point needs every member"
            ));
        }
    }
    let id = ctx.hub.next_id();
    let notify = Arc::new(Notify::new());
    lock(&ctx.barriers.open).insert(
        id,
        Slot {
            group: group.clone(),
            members: row.members.clone(),
            reached: HashSet::new(),
            released: false,
            failed: None,
            cuts: HashMap::new(),
            notify: notify.clone(),
        },
    );
    let result = run_barrier(ctx, id, &row.members, app, &notify).await;
    let slot = lock(&ctx.barriers.open).remove(&id);
    if result.is_err() {
        // Whoever reached or sent a cut learns there is no multi-VM point: their cut is
        // their VM's own point.
        for vm in &row.members {
            send(ctx, vm, server_message::Msg::Release(BarrierRelease { request_id: id, proceed: false }))
                .await;
        }
    }
    let mut slot = slot.ok_or_else(|| "the barrier vanished".to_string())?;
    match result {
        Ok(hold_ms) => {
            let mut cuts = Vec::new();
            let mut waiters = Vec::new();
            for vm in &row.members {
                if let Some((cut, tx)) = slot.cuts.remove(vm) {
                    cuts.push(cut);
                    waiters.push(tx);
                }
            }
            let store = ctx.store.clone();
            let g = slot.group.clone();
            let made = crate::admin::blocking(move || store.make_group_point(&g, cuts))
                .await
                .map_err(|e| e.message().to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            match made {
                Ok(points) => {
                    for (tx, p) in waiters.into_iter().zip(&points) {
                        let _ = tx.send(Ok(p.clone()));
                    }
                    Ok((points, hold_ms))
                }
                Err(e) => {
                    for tx in waiters {
                        let _ = tx.send(Err(e.clone()));
                    }
                    Err(format!("the multi-VM point could not be written: {e}"))
                }
            }
        }
        Err(e) => {
            for (_, (_, tx)) in slot.cuts.drain() {
                let _ = tx.send(Err(e.clone()));
            }
            Err(e)
        }
    }
}

/// Asks every member for its cut, releases them all once each holds one, and waits for
/// every member's cut to come. Returns how long the first member held its cut (ms).
async fn run_barrier(
    ctx: &Arc<Ctx>,
    id: u64,
    members: &[VmName],
    app: bool,
    notify: &Notify,
) -> Result<u64, String> {
    let hold_ms = u64::try_from(HOLD.as_millis()).unwrap_or(u64::MAX);
    for vm in members {
        let b = Barrier { request_id: id, app_consistent: app, hold_ms };
        if !send(ctx, vm, server_message::Msg::Barrier(b)).await {
            return Err(format!("VM {vm} is away: its agent went away as the barrier started"));
        }
    }
    let asked = tokio::time::Instant::now();
    let reach_by = asked + HOLD / 2;
    let mut first_reached = None;
    // Every member holds its cut.
    loop {
        let pending: Vec<VmName> = {
            let open = lock(&ctx.barriers.open);
            let s = open.get(&id).ok_or("the barrier vanished")?;
            if let Some(f) = &s.failed {
                return Err(f.clone());
            }
            if !s.reached.is_empty() && first_reached.is_none() {
                first_reached = Some(tokio::time::Instant::now());
            }
            members.iter().filter(|vm| !s.reached.contains(*vm)).cloned().collect()
        };
        if pending.is_empty() {
            break;
        }
        if let Some(vm) = pending.iter().find(|vm| !ctx.hub.connected(vm)) {
            return Err(format!("VM {vm} is away: its agent went away during the barrier"));
        }
        if !wait(notify, reach_by).await {
            let names: Vec<&str> = pending.iter().map(VmName::as_str).collect();
            return Err(format!(
                "{} did not reach a cut within {} s (a scan pass still running, a resync, or in --mode nbd a backlog of writes the link has not carried yet); no member is held longer",
                names.join(", "),
                (HOLD / 2).as_secs()
            ));
        }
    }
    {
        let mut open = lock(&ctx.barriers.open);
        if let Some(s) = open.get_mut(&id) {
            s.released = true;
        }
    }
    let released = tokio::time::Instant::now();
    for vm in members {
        send(ctx, vm, server_message::Msg::Release(BarrierRelease { request_id: id, proceed: true })).await;
    }
    let held = released.duration_since(first_reached.unwrap_or(released));
    // Every member's cut, with its records durable.
    let cuts_by = released + CUTS_WITHIN;
    loop {
        let missing: Vec<VmName> = {
            let open = lock(&ctx.barriers.open);
            let s = open.get(&id).ok_or("the barrier vanished")?;
            if let Some(f) = &s.failed {
                return Err(f.clone());
            }
            members.iter().filter(|vm| !s.cuts.contains_key(*vm)).cloned().collect()
        };
        if missing.is_empty() {
            return Ok(u64::try_from(held.as_millis()).unwrap_or(u64::MAX));
        }
        if let Some(vm) = missing.iter().find(|vm| !ctx.hub.connected(vm)) {
            return Err(format!("VM {vm} is away: its agent went away before its cut was durable"));
        }
        if !wait(notify, cuts_by).await {
            let names: Vec<&str> = missing.iter().map(VmName::as_str).collect();
            return Err(format!(
                "the cuts of {} did not arrive within {} s",
                names.join(", "),
                CUTS_WITHIN.as_secs()
            ));
        }
    }
}

/// Waits for news of the barrier, or a second (the members' links are checked again then);
/// false once `deadline` has passed.
async fn wait(notify: &Notify, deadline: tokio::time::Instant) -> bool {
    let tick = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
    let _ = tokio::time::timeout_at(tick, notify.notified()).await;
    tokio::time::Instant::now() < deadline
}

/// Why a group takes no multi-VM points now: a member that is not protected (failed over,
/// on its way back). `None` when every member is.
async fn paused(ctx: &Arc<Ctx>, row: &tern_store::GroupRow) -> Result<Option<String>, tonic::Status> {
    for vm in &row.members {
        let (store, v) = (ctx.store.clone(), vm.clone());
        let state = crate::admin::blocking(move || store.vm_state(&v)).await?.map_err(crate::store_status)?;
        if state != tern_core::VmState::Protected {
            return Ok(Some(format!(
                "VM {vm} is {state}: multi-VM points are taken only while every member is protected"
            )));
        }
    }
    Ok(None)
}

/// Takes each group's multi-VM points on its own intervals.
pub async fn group_worker(ctx: Arc<Ctx>) {
    let mut last: HashMap<(GroupName, bool), tokio::time::Instant> = HashMap::new();
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let store = ctx.store.clone();
        let groups = match crate::admin::blocking(move || store.groups()).await {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read the replication groups; no scheduled multi-VM points");
                continue;
            }
            Err(e) => {
                warn!(error = %e.message(), "cannot read the replication groups; no scheduled multi-VM points");
                continue;
            }
        };
        for g in groups {
            if g.crash_interval_ms == 0 && g.app_interval_ms == 0 {
                continue;
            }
            for (app, every) in [(true, g.app_interval_ms), (false, g.crash_interval_ms)] {
                let Ok(every) = u64::try_from(every) else { continue };
                if every == 0 {
                    continue;
                }
                let every = Duration::from_millis(every);
                let since = last.get(&(g.name.clone(), app)).copied().unwrap_or(start);
                if since.elapsed() < every {
                    continue;
                }
                last.insert((g.name.clone(), app), tokio::time::Instant::now());
                // An app point is a crash point too: the crash interval starts again.
                if app {
                    last.insert((g.name.clone(), false), tokio::time::Instant::now());
                }
                // Only when due are the members' states read: a paused group (a member failed
                // over) is looked at once an interval, not every second.
                match paused(&ctx, &g).await {
                    Ok(None) => {}
                    Ok(Some(_)) => {
                        // A failure from before a member failed over says nothing of the
                        // group once it is whole again.
                        ctx.barriers.members_changed(&g.name, false);
                        break;
                    }
                    Err(_) => break,
                }
                let (c, name) = (ctx.clone(), g.name.clone());
                ctx.tracker.spawn(async move {
                    let _ = take_group_point(&c, &name, app).await;
                });
                break;
            }
        }
    }
}

fn group_arg(s: &str) -> Result<GroupName, tonic::Status> {
    GroupName::new(s).map_err(|e| tonic::Status::invalid_argument(e.to_string()))
}

fn interval_arg(ms: Option<u64>) -> Result<Option<i64>, tonic::Status> {
    ms.map(|v| {
        if v != 0 && v < 1000 {
            return Err(tonic::Status::invalid_argument("a multi-VM interval is at least 1s (or 0: none)"));
        }
        if v > u64::try_from(tern_store::MAX_RETENTION_MS).unwrap_or(u64::MAX) {
            return Err(tonic::Status::invalid_argument(
                "a multi-VM interval is at most 30d, as long as points are kept (M is months, m minutes)",
            ));
        }
        i64::try_from(v).map_err(|_| tonic::Status::invalid_argument("interval too long"))
    })
    .transpose()
}

/// What `drctl group` and status show of a group.
pub async fn group_info(
    ctx: &Arc<Ctx>,
    row: tern_store::GroupRow,
) -> Result<tern_proto::GroupInfo, tonic::Status> {
    let store = ctx.store.clone();
    let r = row.clone();
    let (crash, app) = crate::admin::blocking(move || {
        Ok::<_, tern_store::StoreError>((store.common_point(&r, false)?, store.common_point(&r, true)?))
    })
    .await?
    .map_err(crate::store_status)?;
    let away: Vec<String> =
        row.members.iter().filter(|vm| !ctx.hub.connected(vm)).map(ToString::to_string).collect();
    // Away longer than the member's RPO threshold: as a VM's own health counts it.
    let mut long_away = false;
    for vm in row.members.iter().filter(|vm| !ctx.hub.connected(vm)) {
        let (store, v) = (ctx.store.clone(), vm.clone());
        let threshold =
            crate::admin::blocking(move || store.policy(&v)).await?.map_or(0, |p| p.rpo_threshold_ms / 1000);
        let absent = ctx.hub.disconnected_for(vm).map_or(i64::MAX, |s| i64::try_from(s).unwrap_or(i64::MAX));
        long_away |= absent > threshold;
    }
    let paused = paused(ctx, &row).await?;
    if paused.is_some() {
        ctx.barriers.members_changed(&row.name, false);
    }
    let h = ctx.barriers.health(&row.name);
    let rpo = crash.as_ref().map_or(-1, |p| ((tern_store::now_ms() - p.time_ms) / 1000).max(0));
    // Not every member protected (a failover): the group is out of service, not failing.
    // Critical: a member away longer than its RPO threshold, or multi-VM points fail with
    // none to fall back on; warning: a member away, or the last point failed.
    let health = if paused.is_some() {
        tern_core::Health::Normal
    } else if long_away || (h.last_error.is_some() && crash.is_none()) {
        tern_core::Health::Critical
    } else if !away.is_empty() || h.last_error.is_some() {
        tern_core::Health::Warning
    } else {
        tern_core::Health::Normal
    };
    Ok(tern_proto::GroupInfo {
        name: row.name.to_string(),
        vms: row.members.iter().map(ToString::to_string).collect(),
        crash_interval_ms: u64::try_from(row.crash_interval_ms).unwrap_or(0),
        app_interval_ms: u64::try_from(row.app_interval_ms).unwrap_or(0),
        latest_point: crash.as_ref().map_or(0, |p| p.id.0),
        latest_point_time_ms: crash.as_ref().map_or(0, |p| p.time_ms),
        latest_app_point: app.as_ref().map_or(0, |p| p.id.0),
        rpo_seconds: rpo,
        health: tern_proto::Health::write(health),
        error: h.last_error.unwrap_or_default(),
        hold_ms: h.last_hold_ms,
        away,
        paused: paused.unwrap_or_default(),
    })
}

/// Every group's info (or the one named).
pub async fn groups(ctx: &Arc<Ctx>, name: &str) -> Result<Vec<tern_proto::GroupInfo>, tonic::Status> {
    let store = ctx.store.clone();
    let rows = crate::admin::blocking(move || store.groups()).await?.map_err(crate::store_status)?;
    let mut out = Vec::new();
    for row in rows {
        if name.is_empty() || row.name.as_str() == name {
            out.push(group_info(ctx, row).await?);
        }
    }
    if !name.is_empty() && out.is_empty() {
        return Err(tonic::Status::not_found(format!("no group is named {name}; see `drctl group list`")));
    }
    Ok(out)
}

/// `drctl group create/add/remove/policy`.
pub async fn change_group(
    ctx: &Arc<Ctx>,
    r: tern_proto::GroupChange,
) -> Result<Option<tern_proto::GroupInfo>, tonic::Status> {
    let name = group_arg(&r.name)?;
    let vms = r.vms.iter().map(|v| crate::admin::vm_arg(v)).collect::<Result<Vec<_>, _>>()?;
    // A mistake in the command (exit 2), not the server's state.
    if let Some((_, vm)) = vms.iter().enumerate().find(|(i, v)| vms[..*i].contains(v)) {
        return Err(tonic::Status::invalid_argument(format!("VM {vm} is named twice; name each VM once")));
    }
    let (crash, app) = (interval_arg(r.crash_interval_ms)?, interval_arg(r.app_interval_ms)?);
    let op = tern_proto::GroupOp::try_from(r.op).unwrap_or(tern_proto::GroupOp::Unspecified);
    let store = ctx.store.clone();
    let n = name.clone();
    let deleted = crate::admin::blocking(move || match op {
        tern_proto::GroupOp::Create => {
            if vms.is_empty() {
                return Err(tern_store::StoreError::Group("a group needs at least one --vm".into()));
            }
            store.add_to_group(&n, &vms, Some((crash.unwrap_or(0), app.unwrap_or(0)))).map(|()| false)
        }
        tern_proto::GroupOp::Add => store.add_to_group(&n, &vms, None).map(|()| false),
        tern_proto::GroupOp::Remove => store.remove_from_group(&n, &vms).map(|()| vms.is_empty()),
        tern_proto::GroupOp::Policy => store.set_group_intervals(&n, crash, app).map(|()| false),
        tern_proto::GroupOp::Unspecified => {
            Err(tern_store::StoreError::Group("no group operation given".into()))
        }
    })
    .await?
    .map_err(crate::store_status)?;
    info!(group = %name, op = r.op, vms = ?r.vms, "group changed");
    if op != tern_proto::GroupOp::Policy {
        ctx.barriers.members_changed(&name, deleted);
    }
    if deleted {
        return Ok(None);
    }
    Ok(groups(ctx, name.as_str()).await?.pop())
}

/// `drctl group checkpoint`: one multi-VM point now.
pub async fn checkpoint(
    ctx: &Arc<Ctx>,
    r: tern_proto::GroupCheckpointRequest,
) -> Result<tern_proto::GroupCheckpointReply, tonic::Status> {
    let name = group_arg(&r.name)?;
    let store = ctx.store.clone();
    let n = name.clone();
    if crate::admin::blocking(move || store.group(&n)).await?.map_err(crate::store_status)?.is_none() {
        return Err(tonic::Status::not_found(format!("no group is named {name}; see `drctl group list`")));
    }
    // Its own task: a caller that goes away (Ctrl-C) does not cut a barrier short.
    let (c, n, app) = (ctx.clone(), name.clone(), r.app_consistent);
    let points = ctx
        .tracker
        .spawn(async move { take_fresh_group_point(&c, &n, app).await })
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .map_err(|e| tonic::Status::failed_precondition(format!("no multi-VM point was made: {e}")))?;
    Ok(tern_proto::GroupCheckpointReply {
        point: points.first().map_or(0, |p| p.id.0),
        members: points
            .iter()
            .map(|p| tern_proto::VmPoint { vm: p.vm.to_string(), point: Some(crate::admin::point_info(p)) })
            .collect(),
        hold_ms: ctx.barriers.health(&name).last_hold_ms,
    })
}
