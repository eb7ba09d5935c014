//! `bench --clients N`: many idle subscribed connections, what they cost the nodes, and
//! whether the nodes still deliver to all of them.
//!
//! Users (one per client) and rooms are created and joined first, and every room is
//! loaded on every node (one stream per node over all rooms); then each node's
//! resident memory is sampled until it settles; then N clients connect, each over its
//! own HTTP/2 connection (its own `Endpoint::connect`, so the server holds one
//! connection per client) to node `i % nodes`, and open one `Subscribe` stream for its
//! room (client `i` is in room `i % rooms`). Once all are open and memory has settled
//! again, memory per connection is the growth of the nodes' summed RSS over the clients
//! connected. Last, the liveness probe: a few stamped messages per room, and a check
//! that every subscribed client of the room received each (delivered / expected).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use futures::StreamExt;
use indicatif::ProgressBar;
use parley_proto::v1::SendMessageRequest;
use serde::Serialize;
use tokio::sync::watch;

use super::load::{self, Clock, Shared};
use super::payload::Stamp;
use super::setup::{self, authed, retry};
use super::stats::{check_deliveries, new_hist, record, DeliveryCheck, LatencySummary};
use super::{style, BenchArgs};
use crate::nodes;

/// How long memory may take to settle before a sample counts, and how often it is read.
const SETTLE_MAX: Duration = Duration::from_secs(10);
const SETTLE_EVERY: Duration = Duration::from_millis(500);
/// Summed RSS that moved less than this fraction between two samples counts as settled.
const SETTLED: f64 = 0.005;

#[derive(Debug, Clone, Serialize)]
pub struct ClientsConfig {
    pub targets: Vec<String>,
    pub started_node: bool,
    pub clients: usize,
    /// Rooms the clients are spread over (`min(--rooms, clients)`).
    pub rooms: usize,
    /// Probe messages sent into each room once every client is subscribed.
    pub probe_messages_per_room: usize,
    pub size: usize,
    /// Open-file limit of the testnet process (and of the nodes it started).
    pub nofile_limit: Option<u64>,
}

/// One node's resident memory before and after the clients connected.
#[derive(Debug, Clone, Serialize)]
pub struct NodeMemory {
    pub label: String,
    pub pid: u32,
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
    pub delta_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClientsReport {
    pub config: ClientsConfig,
    pub unix_time_s: u64,
    /// Users, rooms and joins.
    pub setup_s: f64,
    /// From the first connect to the last subscription open.
    pub connect_wall_s: f64,
    pub connected: u64,
    pub failed: u64,
    pub failure_sample: Option<String>,
    /// TCP + HTTP/2 handshake of one client.
    pub connect_latency: LatencySummary,
    /// Connect, then Subscribe until the response headers arrived.
    pub connect_subscribe_latency: LatencySummary,
    pub nodes: Vec<NodeMemory>,
    /// Summed node RSS growth over `connected`, in KiB (`None` without node PIDs).
    pub node_kib_per_connection: Option<f64>,
    /// The same for the testnet process itself (the client side).
    pub client_kib_per_connection: Option<f64>,
    pub probe_sent: u64,
    pub probe_acked: u64,
    pub probe_errors: u64,
    pub probe_errors_by_code: std::collections::BTreeMap<String, u64>,
    /// Send → ack of the probe messages.
    pub probe_ack_latency: LatencySummary,
    pub delivery_check: DeliveryCheck,
    pub probe_delivery_latency: LatencySummary,
    /// Subscribe streams that ended before the bench closed them.
    pub subscriber_stream_errors: u64,
    pub subscriber_error_sample: Option<String>,
}

/// The summed RSS (KiB) of `pids`, sampled until it moves less than [`SETTLED`] between
/// two samples or [`SETTLE_MAX`] passed. Per PID; `None` for a process that is gone.
async fn settled_rss(pids: &[u32]) -> Vec<Option<u64>> {
    let clk = nodes::clk_tck();
    let read = || -> Vec<Option<u64>> {
        pids.iter()
            .map(|p| nodes::sample(*p, clk).map(|s| s.rss_kib))
            .collect()
    };
    let total = |v: &[Option<u64>]| v.iter().flatten().sum::<u64>() as f64;
    let mut last = read();
    let until = Instant::now() + SETTLE_MAX;
    while Instant::now() < until {
        tokio::time::sleep(SETTLE_EVERY).await;
        let now = read();
        let (a, b) = (total(&last), total(&now));
        last = now;
        if (b - a).abs() <= SETTLED * a.max(1.0) {
            break;
        }
    }
    last
}

/// One client: its own connection, then a Subscribe stream for its rooms. Returns the
/// stream and the connect and connect+subscribe times in µs.
async fn open_client(
    addr: SocketAddr,
    user: &setup::User,
    rooms: &[String],
) -> Result<(tonic::Streaming<parley_proto::v1::Event>, u64, u64)> {
    let t0 = Instant::now();
    let client = setup::connect(addr, None).await?;
    let connect_us = t0.elapsed().as_micros() as u64;
    let stream = retry(&format!("{} subscribe", user.name), |_| {
        let mut c = client.clone();
        let req = authed(
            parley_proto::v1::SubscribeRequest {
                rooms: rooms.to_vec(),
                cursor: String::new(),
            },
            &user.auth,
        );
        async move {
            match tokio::time::timeout(Duration::from_secs(10), c.subscribe(req)).await {
                Ok(r) => r.map(|s| s.into_inner()),
                Err(_) => Err(tonic::Status::deadline_exceeded(
                    "no response headers within 10s",
                )),
            }
        }
    })
    .await
    .with_context(|| format!("client {} on {addr}", user.name))?;
    Ok((stream, connect_us, t0.elapsed().as_micros() as u64))
}

/// Reads a stream and drops what it gets until `stop` flips or the stream ends.
async fn discard(
    mut stream: tonic::Streaming<parley_proto::v1::Event>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            next = stream.message() => if !matches!(next, Ok(Some(_))) { return },
        }
    }
}

pub async fn run(
    args: &BenchArgs,
    n: usize,
    targets: &[SocketAddr],
    started_node: bool,
    watched: &[(String, u32)],
) -> Result<ClientsReport> {
    let setup_t0 = Instant::now();
    let conc = args.setup_concurrency.max(1);
    let rooms = args.rooms.clamp(1, n.max(1));
    let run_id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let nofile = nodes::raise_nofile_limit().ok();
    if let Some(limit) = nofile {
        // The testnet process holds one descriptor per client, plus a few per node.
        if (n as u64).saturating_add(256) > limit {
            anyhow::bail!(
                "--clients {n} needs about {} open files but the limit is {limit}; raise the \
                 hard limit (ulimit -Hn) and run again",
                n + 256
            );
        }
    }

    let mut unary = Vec::new();
    for &t in targets {
        unary.push(setup::connect(t, Some(args.rpc_timeout)).await?);
    }
    let pb = ProgressBar::new((1 + n) as u64)
        .with_style(style("{msg:>24} [{bar:30}] {pos}/{len} {elapsed}"));
    pb.set_message("creating users");
    let admin = setup::create_users(&unary, &format!("c{run_id}-admin"), 1, |_| 0, 1, &pb).await?;
    let admin = admin.into_iter().next().context("admin user")?;
    let users = setup::create_users(&unary, &format!("c{run_id}-u"), n, |i| i, conc, &pb).await?;
    pb.set_length(rooms as u64);
    pb.set_position(0);
    pb.set_message("creating rooms");
    let names: Vec<String> = (0..rooms).map(|r| format!("c{run_id}-r{r}")).collect();
    let write_quorum = args.write_quorum.unwrap_or(0);
    let room_ids = setup::create_rooms(&unary[0], &admin, &names, write_quorum, conc, &pb).await?;
    let pairs: Vec<(setup::User, String)> = users
        .iter()
        .enumerate()
        .map(|(i, u)| (u.clone(), room_ids[i % rooms].clone()))
        .collect();
    pb.set_length(pairs.len() as u64);
    pb.set_position(0);
    pb.set_message("joining rooms");
    setup::join_all(&unary, pairs, conc, &pb).await?;
    let setup_s = setup_t0.elapsed().as_secs_f64();

    // Every room loaded on every node before the baseline, so the growth measured
    // below is the connections' and not the rooms' (the admin, a member of every room,
    // holds one stream per node on all of them, read and dropped until the end).
    pb.set_message("loading rooms");
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut warm = Vec::with_capacity(targets.len());
    for &t in targets {
        let (stream, _, _) = open_client(t, &admin, &room_ids).await?;
        warm.push(tokio::spawn(discard(stream, stop_rx.clone())));
    }
    pb.set_message("memory before");
    let pids: Vec<u32> = watched.iter().map(|(_, p)| *p).collect();
    let before = settled_rss(&pids).await;
    let clk = nodes::clk_tck();
    let self_before = nodes::sample(std::process::id(), clk).map(|s| s.rss_kib);

    // ---- connect ----
    pb.set_length(n as u64);
    pb.set_position(0);
    pb.set_message("connecting clients");
    let shared = Arc::new(Shared::new(Clock::new()));
    let mut connect_h = new_hist();
    let mut total_h = new_hist();
    let mut sub_tasks = Vec::with_capacity(n);
    let mut per_room = vec![0u64; rooms];
    let mut failed = 0u64;
    let mut failure_sample = None;
    let connect_t0 = Instant::now();
    {
        let jobs = users.iter().enumerate().map(|(i, u)| {
            let room = i % rooms;
            let addr = targets[i % targets.len()];
            let room_id = room_ids[room].clone();
            let pb = &pb;
            async move {
                let r = open_client(addr, u, std::slice::from_ref(&room_id)).await;
                pb.inc(1);
                (room, r)
            }
        });
        let mut opened = futures::stream::iter(jobs).buffer_unordered(conc);
        while let Some((room, r)) = opened.next().await {
            match r {
                Ok((stream, connect_us, total_us)) => {
                    record(&mut connect_h, connect_us);
                    record(&mut total_h, total_us);
                    per_room[room] += 1;
                    sub_tasks.push(tokio::spawn(load::subscriber(
                        room,
                        stream,
                        shared.clone(),
                        stop_rx.clone(),
                    )));
                }
                Err(e) => {
                    failed += 1;
                    failure_sample.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
    }
    let connect_wall_s = connect_t0.elapsed().as_secs_f64();
    let connected = sub_tasks.len() as u64;
    pb.set_message("memory after");
    let after = settled_rss(&pids).await;
    let self_after = nodes::sample(std::process::id(), clk).map(|s| s.rss_kib);

    let mut node_mem = Vec::new();
    let mut delta_kib = 0i64;
    let mut complete = !pids.is_empty();
    for ((label, pid), (b, a)) in watched.iter().zip(before.iter().zip(after.iter())) {
        match (b, a) {
            (Some(b), Some(a)) => {
                let d = *a as i64 - *b as i64;
                delta_kib += d;
                node_mem.push(NodeMemory {
                    label: label.clone(),
                    pid: *pid,
                    rss_before_mib: *b as f64 / 1024.0,
                    rss_after_mib: *a as f64 / 1024.0,
                    delta_mib: d as f64 / 1024.0,
                });
            }
            _ => complete = false,
        }
    }
    let per_conn = |d: i64| (connected > 0).then(|| d as f64 / connected as f64);
    let node_kib_per_connection = if complete { per_conn(delta_kib) } else { None };
    let client_kib_per_connection = match (self_before, self_after) {
        (Some(b), Some(a)) => per_conn(a as i64 - b as i64),
        _ => None,
    };

    // ---- liveness probe ----
    pb.set_length((rooms * args.probe_messages) as u64);
    pb.set_position(0);
    pb.set_message("probing rooms");
    let clock = shared.clock;
    shared
        .load_start_us
        .store(clock.now_us(), Ordering::Relaxed);
    let probes = (0..args.probe_messages).flat_map(|k| (0..rooms).map(move |r| (k, r)));
    let sender = unary[0].clone();
    let mut sent = 0u64;
    let mut acked: Vec<(u64, u32)> = Vec::new();
    let mut probe_errors = 0u64;
    let mut errors_by_code = std::collections::BTreeMap::new();
    let mut ack_h = new_hist();
    {
        let jobs = probes.map(|(k, r)| {
            let mut c = sender.clone();
            let stamp = Stamp {
                sent_us: clock.now_us(),
                sender: 0,
                seq: (k * rooms + r) as u32,
            };
            let req = authed(
                SendMessageRequest {
                    room: room_ids[r].clone(),
                    text: stamp.encode(args.size).into_bytes(),
                    client_msg_id: format!("{run_id}-probe-{k}-{r}"),
                    after: String::new(),
                },
                &admin.auth,
            );
            let limit = args.rpc_timeout + Duration::from_secs(1);
            let pb = &pb;
            async move {
                let res = match tokio::time::timeout(limit, c.send_message(req)).await {
                    Ok(Ok(_)) => Ok(clock.now_us().saturating_sub(stamp.sent_us)),
                    Ok(Err(s)) => Err(format!("{:?}", s.code())),
                    Err(_) => Err("ClientTimeout".to_string()),
                };
                pb.inc(1);
                (stamp.key(), r as u32, res)
            }
        });
        let mut done = futures::stream::iter(jobs).buffer_unordered(conc);
        while let Some((key, room, res)) = done.next().await {
            sent += 1;
            match res {
                Ok(us) => {
                    record(&mut ack_h, us);
                    acked.push((key, room));
                }
                Err(code) => {
                    probe_errors += 1;
                    *errors_by_code.entry(code).or_default() += 1;
                }
            }
        }
    }
    let expected: u64 = acked.iter().map(|(_, r)| per_room[*r as usize]).sum();
    super::drain(
        &shared.live.delivered,
        expected,
        probe_errors > 0,
        args.drain,
    )
    .await;
    let _ = stop_tx.send(true);
    pb.finish_and_clear();
    for t in warm {
        let _ = t.await;
    }
    let mut logs = Vec::with_capacity(sub_tasks.len());
    for t in sub_tasks {
        logs.push(t.await.context("client task failed")?);
    }
    let check = check_deliveries(&acked, &logs);
    let probe_latency = match shared.collector.lock() {
        Ok(c) => LatencySummary::of(&c.delivery),
        Err(_) => LatencySummary::default(),
    };
    let sub_errors: Vec<&String> = logs.iter().filter_map(|l| l.error.as_ref()).collect();
    Ok(ClientsReport {
        config: ClientsConfig {
            targets: targets.iter().map(ToString::to_string).collect(),
            started_node,
            clients: n,
            rooms,
            probe_messages_per_room: args.probe_messages,
            size: args.size,
            nofile_limit: nofile,
        },
        unix_time_s: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        setup_s,
        connect_wall_s,
        connected,
        failed,
        failure_sample,
        connect_latency: LatencySummary::of(&connect_h),
        connect_subscribe_latency: LatencySummary::of(&total_h),
        nodes: node_mem,
        node_kib_per_connection,
        client_kib_per_connection,
        probe_sent: sent,
        probe_acked: acked.len() as u64,
        probe_errors,
        probe_errors_by_code: errors_by_code,
        probe_ack_latency: LatencySummary::of(&ack_h),
        delivery_check: check,
        probe_delivery_latency: probe_latency,
        subscriber_stream_errors: sub_errors.len() as u64,
        subscriber_error_sample: sub_errors.first().map(|s| s.to_string()),
    })
}

impl ClientsReport {
    /// The human summary, ending with one `RESULT` line for scripts.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let c = &self.config;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "parley bench --clients {}  (targets {}{}, {} rooms, open-file limit {})",
            c.clients,
            c.targets.join(","),
            if c.started_node {
                " (started here)"
            } else {
                ""
            },
            c.rooms,
            c.nofile_limit
                .map_or_else(|| "?".to_string(), |l| l.to_string())
        );
        let _ = writeln!(
            s,
            "  setup {:.1}s, connect {:.1}s",
            self.setup_s, self.connect_wall_s
        );
        let _ = writeln!(
            s,
            "  connected {} of {}   failed {}{}",
            self.connected,
            c.clients,
            self.failed,
            self.failure_sample
                .as_deref()
                .map(|e| format!("  (e.g. {e})"))
                .unwrap_or_default()
        );
        let lat = |name: &str, l: &LatencySummary| {
            format!(
                "  {name:<20} p50 {:>9.2}  p99 {:>9.2}  max {:>9.2}  ms\n",
                l.p50_ms, l.p99_ms, l.max_ms
            )
        };
        s.push_str(&lat("connect", &self.connect_latency));
        s.push_str(&lat("connect+subscribe", &self.connect_subscribe_latency));
        if !self.nodes.is_empty() {
            let _ = writeln!(
                s,
                "  {:<12} {:>8} {:>12} {:>12} {:>10}",
                "process", "pid", "RSS before", "RSS after", "Δ MiB"
            );
            for m in &self.nodes {
                let _ = writeln!(
                    s,
                    "  {:<12} {:>8} {:>12.1} {:>12.1} {:>10.1}",
                    m.label, m.pid, m.rss_before_mib, m.rss_after_mib, m.delta_mib
                );
            }
        }
        let kib = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |k| format!("{k:.1}"));
        let _ = writeln!(
            s,
            "  memory per connection: nodes {} KiB (ΔRSS summed over nodes / connected), client {} KiB",
            kib(self.node_kib_per_connection),
            kib(self.client_kib_per_connection)
        );
        let dc = &self.delivery_check;
        let _ = writeln!(
            s,
            "  probe: sent {} acked {} errors {}   delivered / expected {}/{}   lost {}   duplicates {}",
            self.probe_sent,
            self.probe_acked,
            self.probe_errors,
            dc.delivered,
            dc.expected,
            dc.lost,
            dc.duplicates
        );
        if !self.probe_errors_by_code.is_empty() {
            let codes: Vec<String> = self
                .probe_errors_by_code
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(s, "  probe errors: {}", codes.join(" "));
        }
        s.push_str(&lat("probe ack", &self.probe_ack_latency));
        s.push_str(&lat("probe delivery", &self.probe_delivery_latency));
        if self.subscriber_stream_errors > 0 {
            let _ = writeln!(
                s,
                "  client streams lost {}  (e.g. {})",
                self.subscriber_stream_errors,
                self.subscriber_error_sample.as_deref().unwrap_or("?")
            );
        }
        let _ = writeln!(
            s,
            "RESULT clients={} connected={} failed={} node_kib_per_conn={} client_kib_per_conn={} connect_p50_ms={:.3} connect_p99_ms={:.3} subscribe_p50_ms={:.3} subscribe_p99_ms={:.3} delivered={} expected={} lost={} streams_lost={}",
            c.clients,
            self.connected,
            self.failed,
            kib(self.node_kib_per_connection),
            kib(self.client_kib_per_connection),
            self.connect_latency.p50_ms,
            self.connect_latency.p99_ms,
            self.connect_subscribe_latency.p50_ms,
            self.connect_subscribe_latency.p99_ms,
            dc.delivered,
            dc.expected,
            dc.lost,
            self.subscriber_stream_errors
        );
        s
    }

    /// Every client connected and every probe reached every client of its room.
    pub fn passed(&self) -> bool {
        let dc = &self.delivery_check;
        self.failed == 0
            && self.probe_errors == 0
            && dc.lost == 0
            && dc.delivered == dc.expected
            && self.subscriber_stream_errors == 0
    }
}
