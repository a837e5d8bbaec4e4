//! Statistics in three forms: JSON (the control socket and `stats --json`),
//! text for people (`stats`), and the Prometheus exposition format
//! (`serve --metrics`).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use pmcache_engine::check::Dump;
use pmcache_engine::versions::Role;
use pmcache_engine::{Engine, StatsSnapshot};
use pmcache_nbd::tls::{TlsServer, TlsStats};
use pmcache_nbd::{ConnectionInfo, Connections};
use serde_json::{json, Map, Value};

use crate::size::human;

/// What a running server says about itself besides the engine's counters.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub cache: PathBuf,
    pub origin: String,
    pub origin_size: u64,
    pub endpoint: String,
    pub export: String,
    pub read_only: bool,
    pub started: Instant,
    /// The NBD server's TLS settings and counters (`None`: `--tls off`).
    pub tls: Option<Arc<TlsServer>>,
    /// The NBD server's open connections (shared with the server).
    pub connections: Connections,
}

impl ServerInfo {
    fn tls_mode(&self) -> String {
        self.tls
            .as_ref()
            .map_or_else(|| "off".to_string(), |t| t.mode.to_string())
    }

    fn tls_stats(&self) -> TlsStats {
        self.tls.as_ref().map(|t| t.stats()).unwrap_or_default()
    }
}

/// TLS counters: name, value, help.
fn tls_fields(t: &TlsStats) -> [(&'static str, u64, &'static str); 3] {
    [
        ("tls_handshakes", t.handshakes, "TLS sessions established"),
        (
            "tls_failed_handshakes",
            t.failed_handshakes,
            "TLS handshakes refused or failed (bad credentials, not TLS)",
        ),
        (
            "tls_refused_plain",
            t.refused_plain,
            "options refused because TLS is required and was not started",
        ),
    ]
}

/// One open connection in the stats JSON: who, how long, and its TLS
/// session (names only: no key is known here).
fn connection_json(c: &ConnectionInfo) -> Value {
    let tls = c.tls.as_ref();
    json!({
        "id": c.id,
        "peer": c.peer,
        "phase": c.phase.as_str(),
        "open_seconds": c.open_for.as_secs(),
        "tls": tls.is_some(),
        "tls_version": tls.map(|t| t.version.as_str()),
        "tls_cipher": tls.map(|t| t.cipher.as_str()),
        "tls_identity": tls.and_then(|t| t.peer_name.as_deref()),
    })
}

/// Counters that only grow (Prometheus `counter`); the rest are gauges.
fn is_counter(name: &str) -> bool {
    !matches!(
        name,
        "block_size"
            | "slots"
            | "occupied"
            | "dirty"
            | "clean"
            | "free"
            | "watermark"
            | "retained"
            | "epoch"
            | "written_epoch"
            | "epochs_pending"
            | "oldest_pending_epoch_ms"
    )
}

/// The JSON a running server answers `stats` with.
pub fn live_json(snap: &StatsSnapshot, info: &ServerInfo) -> Value {
    let mut m = Map::new();
    m.insert("source".into(), json!("server"));
    m.insert("pid".into(), json!(std::process::id()));
    m.insert("cache".into(), json!(info.cache.display().to_string()));
    m.insert("origin".into(), json!(info.origin));
    m.insert("origin_size".into(), json!(info.origin_size));
    m.insert("endpoint".into(), json!(info.endpoint));
    m.insert("export".into(), json!(info.export));
    m.insert("read_only".into(), json!(info.read_only));
    m.insert(
        "uptime_seconds".into(),
        json!(info.started.elapsed().as_secs()),
    );
    m.insert("mode".into(), json!(snap.mode));
    m.insert("pmem_mode".into(), json!(snap.pmem_mode));
    m.insert("writeback_order".into(), json!(snap.writeback_order));
    for (name, value, _) in snap.fields() {
        m.insert(name.into(), json!(value));
    }
    m.insert("tls".into(), json!(info.tls_mode()));
    for (name, value, _) in tls_fields(&info.tls_stats()) {
        m.insert(name.into(), json!(value));
    }
    let conns: Vec<Value> = info
        .connections
        .snapshot()
        .iter()
        .map(connection_json)
        .collect();
    m.insert("connections".into(), Value::Array(conns));
    Value::Object(m)
}

/// The JSON for a cache file no server has open, from its metadata.
/// `retained` counts what recovery keeps for ordered writeback, with writes
/// in flight at a crash taken as whole (as `dump` shows roles).
pub fn offline_json(cache: &std::path::Path, dump: &Dump) -> Value {
    let sb = &dump.superblock;
    // Recovery keeps the newest committed version of each block.
    let mut newest: std::collections::HashMap<u64, (u64, bool)> = Default::default();
    let mut pending = 0u64;
    for m in &dump.mappings {
        if m.pending {
            pending += 1;
            continue;
        }
        let e = newest.entry(m.block).or_insert((m.seq, m.dirty));
        if m.seq > e.0 {
            *e = (m.seq, m.dirty);
        }
    }
    let retained = (dump.mappings.iter())
        .filter(|m| m.role == Role::Retained)
        .count();
    let occupied = newest.len() as u64;
    let dirty = newest.values().filter(|(_, d)| *d).count() as u64;
    let slots = sb.layout.slot_count;
    json!({
        "source": "offline",
        // Absolute, as a running server reports it.
        "cache": std::fs::canonicalize(cache).unwrap_or_else(|_| cache.to_path_buf()).display().to_string(),
        "origin": sb.origin_fingerprint,
        "origin_size": sb.origin_size,
        "mode": sb.mode.to_string(),
        "clean_shutdown": sb.clean_shutdown,
        "block_size": sb.layout.block_size,
        "slots": slots,
        "occupied": occupied,
        "dirty": dirty,
        "clean": occupied - dirty,
        // Retained versions keep their slots after recovery, and so do
        // pending entries that verify (the rest are freed): not free.
        "free": slots.saturating_sub(occupied + retained as u64 + pending),
        "pending": pending,
        "retained": retained,
        "watermark": dump.watermark,
        "written_epoch": dump.written_epoch,
    })
}

fn get(v: &Value, k: &str) -> Option<u64> {
    v.get(k).and_then(Value::as_u64)
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

/// Text for people, in the spirit of `casadm -P`.
pub fn render_text(v: &Value) -> String {
    let f = Fields(v);
    let live = f.s("source") == "server";
    let mut o = String::new();
    render_identity(&mut o, &f, live);
    render_usage(&mut o, &f);
    if !live {
        if f.n("pending") > 0 {
            let _ = writeln!(
                o,
                "  in flight      {} blocks of writes in flight at the last crash (verified at the next open)",
                f.n("pending")
            );
        }
        let _ = writeln!(o, "Writeback");
        let _ = writeln!(
            o,
            "  written epoch  {} (every epoch up to it is on the origin)",
            f.n("written_epoch")
        );
        render_retained(&mut o, &f);
        let _ = writeln!(
            o,
            "Request counters live in a running server; start `pmcache serve` and run `pmcache stats` again."
        );
        return o;
    }
    render_requests(&mut o, &f);
    render_writeback_and_errors(&mut o, &f);
    render_tls(&mut o, &f);
    render_connections(&mut o, v);
    let _ = writeln!(o, "Persistence");
    let _ = writeln!(
        o,
        "  fences         {} ({} by writes)",
        f.n("fences"),
        f.n("write_fences")
    );
    let _ = writeln!(o, "  watermark      {}", f.n("watermark"));
    o
}

/// Typed access to the stats JSON: a missing field reads as "-" or 0.
struct Fields<'a>(&'a Value);

impl Fields<'_> {
    fn s(&self, k: &str) -> String {
        self.0
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("-")
            .to_string()
    }

    fn n(&self, k: &str) -> u64 {
        get(self.0, k).unwrap_or(0)
    }

    fn flag(&self, k: &str) -> bool {
        self.0.get(k).and_then(Value::as_bool) == Some(true)
    }
}

/// What is being looked at: the server (or the file alone) and the cache.
fn render_identity(o: &mut String, f: &Fields<'_>, live: bool) {
    if live {
        let _ = writeln!(
            o,
            "pmcache server (pid {}, up {} s) serving {} export '{}'{}",
            f.n("pid"),
            f.n("uptime_seconds"),
            f.s("endpoint"),
            f.s("export"),
            if f.flag("read_only") {
                " read-only"
            } else {
                ""
            }
        );
    } else {
        let _ = writeln!(o, "cache file (no server running)");
    }
    let _ = writeln!(o, "  cache          {}", f.s("cache"));
    let _ = writeln!(
        o,
        "  origin         {} ({})",
        f.s("origin"),
        human(f.n("origin_size"))
    );
    let _ = writeln!(o, "  cache mode     {}", f.s("mode"));
    if live {
        let _ = writeln!(o, "  pmem mode      {}", f.s("pmem_mode"));
    } else {
        let _ = writeln!(
            o,
            "  last shutdown  {}",
            if f.flag("clean_shutdown") {
                "clean"
            } else {
                "not clean (recovery runs at the next open)"
            }
        );
    }
    let _ = writeln!(o, "  block size     {} bytes", f.n("block_size"));
}

fn render_usage(o: &mut String, f: &Fields<'_>) {
    let bs = f.n("block_size");
    let (slots, occ, dirty, clean) = (f.n("slots"), f.n("occupied"), f.n("dirty"), f.n("clean"));
    let _ = writeln!(o, "Usage");
    let _ = writeln!(
        o,
        "  occupancy      {occ} / {slots} blocks ({}), {} of {}",
        pct(occ, slots),
        human(occ * bs),
        human(slots * bs)
    );
    let _ = writeln!(
        o,
        "  dirty          {dirty} blocks ({} of the cache), {}",
        pct(dirty, slots),
        human(dirty * bs)
    );
    let _ = writeln!(o, "  clean          {clean} blocks ({})", pct(clean, slots));
    let free = f.n("free");
    let _ = writeln!(o, "  free           {free} blocks");
    // Neither current nor free: what keeps a cache with room from taking
    // writes, so that the lines add up to the slots.
    let _ = writeln!(
        o,
        "  held           {} blocks (versions retained for ordered writeback, slots being freed)",
        slots.saturating_sub(occ + free)
    );
}

fn render_requests(o: &mut String, f: &Fields<'_>) {
    let (rh, rm) = (f.n("read_hits"), f.n("read_misses"));
    let (wh, wm) = (f.n("write_hits"), f.n("write_misses"));
    let _ = writeln!(o, "Requests (blocks)");
    let _ = writeln!(o, "  read hits      {rh} ({} of reads)", pct(rh, rh + rm));
    let _ = writeln!(o, "  read misses    {rm}");
    let _ = writeln!(o, "  write hits     {wh} ({} of writes)", pct(wh, wh + wm));
    let _ = writeln!(o, "  write misses   {wm}");
    let _ = writeln!(o, "  promotions     {}", f.n("promotions"));
    let _ = writeln!(o, "  evictions      {}", f.n("evictions"));
    let _ = writeln!(
        o,
        "  client I/O     {} write requests, {} written, {} read",
        f.n("writes"),
        human(f.n("write_bytes")),
        human(f.n("read_bytes"))
    );
    let _ = writeln!(
        o,
        "  bypassed       {} read and {} write requests of sequential streams, {}; {} spliced client <-> origin",
        f.n("bypass_reads"),
        f.n("bypass_writes"),
        human(f.n("bypass_bytes")),
        human(f.n("relayed_bytes"))
    );
}

/// How long `ms` milliseconds is, for people.
fn age(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{} min {} s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{} h {} min", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// Older versions kept for ordered writeback, when there are any.
fn render_retained(o: &mut String, f: &Fields<'_>) {
    let n = f.n("retained");
    if n > 0 {
        let _ = writeln!(
            o,
            "  retained       {n} older version{}, kept until their epoch is on the origin",
            if n == 1 { "" } else { "s" }
        );
    }
}

/// The writeback order and, when ordered, where the epochs stand. Absent
/// when the JSON has no order (a server that predates it).
fn render_order(o: &mut String, f: &Fields<'_>) {
    let order = f.s("writeback_order");
    match order.as_str() {
        "-" => return,
        "ordered" => {
            let _ = writeln!(
                o,
                "  order          ordered (epoch by epoch: the origin is always crash-consistent)"
            );
        }
        _ => {
            let _ = writeln!(
                o,
                "  order          {order} (the origin is consistent only once writeback has finished)"
            );
            return;
        }
    }
    let _ = writeln!(
        o,
        "  epochs         current {}; on the origin up to {} (W)",
        f.n("epoch"),
        f.n("written_epoch")
    );
    let (sealed, oldest) = (f.n("epochs_pending"), f.n("oldest_pending_epoch_ms"));
    let mut pending = format!(
        "{sealed} sealed epoch{} not yet on the origin",
        if sealed == 1 { "" } else { "s" }
    );
    if oldest > 0 {
        let _ = write!(pending, "; the oldest owed began {} ago", age(oldest));
    }
    let _ = writeln!(o, "  pending        {pending}");
}

fn render_writeback_and_errors(o: &mut String, f: &Fields<'_>) {
    let _ = writeln!(o, "Writeback");
    render_order(o, f);
    let _ = writeln!(
        o,
        "  written back   {} blocks, {}",
        f.n("writebacks"),
        human(f.n("writeback_bytes"))
    );
    let _ = writeln!(o, "  still dirty    {} blocks", f.n("dirty"));
    render_retained(o, f);
    let _ = writeln!(o, "  space waits    {}", f.n("waits_for_space"));
    let _ = writeln!(o, "Errors");
    let _ = writeln!(o, "  origin errors  {}", f.n("origin_errors"));
    let _ = writeln!(o, "  reconnects     {}", f.n("origin_reconnects"));
    let _ = writeln!(o, "  corrupt blocks {}", f.n("corrupt_blocks"));
}

fn render_tls(o: &mut String, f: &Fields<'_>) {
    let mode = f.s("tls");
    let _ = writeln!(o, "TLS              {mode}");
    if mode != "off" && mode != "-" {
        let _ = writeln!(o, "  sessions       {}", f.n("tls_handshakes"));
        let _ = writeln!(
            o,
            "  refused        {} failed handshakes, {} options without TLS",
            f.n("tls_failed_handshakes"),
            f.n("tls_refused_plain")
        );
    }
}

/// A name from a peer (PSK identity, certificate CN) made safe to print on
/// a terminal: control characters become `?`.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// One line of the Connections section, from its JSON.
fn connection_line(c: &Value) -> String {
    let s = |k: &str| c.get(k).and_then(Value::as_str).map(printable);
    let mut line = format!(
        "  #{} {}",
        get(c, "id").unwrap_or(0),
        s("peer").unwrap_or_else(|| "-".into())
    );
    if c.get("tls").and_then(Value::as_bool) == Some(true) {
        let _ = write!(
            line,
            "  TLS {} {}",
            s("tls_version").unwrap_or_else(|| "-".into()),
            s("tls_cipher").unwrap_or_else(|| "-".into())
        );
        match s("tls_identity") {
            Some(id) => {
                let _ = write!(line, " as {id}");
            }
            None => line.push_str(" (client not identified)"),
        }
    } else {
        line.push_str("  plain");
    }
    let _ = write!(line, ", open {} s", get(c, "open_seconds").unwrap_or(0));
    if s("phase").as_deref() == Some("handshake") {
        line.push_str(", in the handshake");
    }
    line
}

/// The Connections section: a count, then one line per connection. Absent
/// when the JSON has no connection list (a server that predates it).
fn render_connections(o: &mut String, v: &Value) {
    let Some(conns) = v.get("connections").and_then(Value::as_array) else {
        return;
    };
    let tls = conns
        .iter()
        .filter(|c| c.get("tls").and_then(Value::as_bool) == Some(true))
        .count();
    let _ = writeln!(o, "Connections      {} open ({tls} over TLS)", conns.len());
    for c in conns {
        let _ = writeln!(o, "{}", connection_line(c));
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition format (version 0.0.4).
pub fn prometheus(engine: &Engine, info: &ServerInfo) -> String {
    prometheus_text(&engine.stats(), info)
}

fn prometheus_text(snap: &StatsSnapshot, info: &ServerInfo) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP pmcache_info cache configuration (always 1)\n# TYPE pmcache_info gauge"
    );
    let _ = writeln!(
        o,
        "pmcache_info{{mode=\"{}\",pmem_mode=\"{}\",writeback_order=\"{}\",cache=\"{}\",origin=\"{}\"}} 1",
        escape_label(&snap.mode),
        escape_label(&snap.pmem_mode),
        escape_label(&snap.writeback_order),
        escape_label(&info.cache.display().to_string()),
        escape_label(&info.origin)
    );
    let _ = writeln!(
        o,
        "# HELP pmcache_uptime_seconds seconds since the server started\n# TYPE pmcache_uptime_seconds gauge\npmcache_uptime_seconds {}",
        info.started.elapsed().as_secs()
    );
    let _ = writeln!(
        o,
        "# HELP pmcache_origin_size origin size in bytes\n# TYPE pmcache_origin_size gauge\npmcache_origin_size {}",
        info.origin_size
    );
    for (name, value, help) in snap.fields() {
        let kind = if is_counter(name) { "counter" } else { "gauge" };
        let _ = writeln!(
            o,
            "# HELP pmcache_{name} {help}\n# TYPE pmcache_{name} {kind}\npmcache_{name} {value}"
        );
    }
    let _ = writeln!(
        o,
        "# HELP pmcache_tls_info the NBD server's TLS mode (always 1)\n# TYPE pmcache_tls_info gauge\npmcache_tls_info{{mode=\"{}\"}} 1",
        info.tls_mode()
    );
    for (name, value, help) in tls_fields(&info.tls_stats()) {
        let _ = writeln!(
            o,
            "# HELP pmcache_{name} {help}\n# TYPE pmcache_{name} counter\npmcache_{name} {value}"
        );
    }
    connection_gauges(&mut o, &info.connections.snapshot());
    o
}

/// `pmcache_connections{tls="yes"|"no"}`: open connections by whether TLS
/// is up on them (one still haggling before STARTTLS counts as "no"). Both
/// series are always present, so a dashboard sees 0 rather than no data.
fn connection_gauges(o: &mut String, conns: &[ConnectionInfo]) {
    let tls = conns.iter().filter(|c| c.tls.is_some()).count();
    let _ = writeln!(
        o,
        "# HELP pmcache_connections open NBD connections, by whether TLS is up on them\n# TYPE pmcache_connections gauge"
    );
    let _ = writeln!(o, "pmcache_connections{{tls=\"yes\"}} {tls}");
    let _ = writeln!(o, "pmcache_connections{{tls=\"no\"}} {}", conns.len() - tls);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pmcache_nbd::{Phase, TlsSessionInfo};

    use super::*;

    fn conn(id: u64, tls: Option<&str>, phase: Phase) -> ConnectionInfo {
        ConnectionInfo {
            id,
            peer: "127.0.0.1:40000".into(),
            open_for: Duration::from_secs(5),
            phase,
            tls: tls.map(|name| TlsSessionInfo {
                version: "TLSv1.3".into(),
                cipher: "TLS_AES_256_GCM_SHA384".into(),
                peer_name: (!name.is_empty()).then(|| name.to_string()),
            }),
        }
    }

    fn server_info() -> ServerInfo {
        ServerInfo {
            cache: "/dev/shm/c.pmem".into(),
            origin: "file:/srv/o.img".into(),
            origin_size: 1 << 30,
            endpoint: "127.0.0.1:10809".into(),
            export: "pmcache".into(),
            read_only: false,
            started: Instant::now(),
            tls: None,
            connections: Connections::default(),
        }
    }

    fn ordered_snapshot() -> StatsSnapshot {
        StatsSnapshot {
            mode: "writeback".into(),
            writeback_order: "ordered".into(),
            dirty: 40,
            retained: 7,
            epoch: 12,
            written_epoch: 9,
            epochs_pending: 2,
            oldest_pending_epoch_ms: 1300,
            ..Default::default()
        }
    }

    #[test]
    fn ordered_writeback_shows_in_json_text_and_metrics() {
        let snap = ordered_snapshot();
        let v = live_json(&snap, &server_info());
        assert_eq!(v["writeback_order"], "ordered");
        for (k, want) in [
            ("retained", 7),
            ("epoch", 12),
            ("written_epoch", 9),
            ("epochs_pending", 2),
            ("oldest_pending_epoch_ms", 1300),
        ] {
            assert_eq!(v[k], want, "{k}");
        }

        let text = render_text(&v);
        let writeback: Vec<&str> = text
            .lines()
            .skip_while(|l| *l != "Writeback")
            .take_while(|l| *l != "Errors")
            .collect();
        assert_eq!(
            writeback,
            [
                "Writeback",
                "  order          ordered (epoch by epoch: the origin is always crash-consistent)",
                "  epochs         current 12; on the origin up to 9 (W)",
                "  pending        2 sealed epochs not yet on the origin; the oldest owed began 1.3 s ago",
                "  written back   0 blocks, 0 B",
                "  still dirty    40 blocks",
                "  retained       7 older versions, kept until their epoch is on the origin",
                "  space waits    0",
            ]
        );

        let prom = prometheus_text(&snap, &server_info());
        assert!(
            prom.contains(
                "pmcache_info{mode=\"writeback\",pmem_mode=\"\",writeback_order=\"ordered\","
            ),
            "{prom}"
        );
        for name in [
            "retained",
            "epoch",
            "written_epoch",
            "epochs_pending",
            "oldest_pending_epoch_ms",
        ] {
            assert!(
                prom.contains(&format!("# TYPE pmcache_{name} gauge\n")),
                "{name} is a gauge: {prom}"
            );
        }
        assert!(prom.contains("\npmcache_epochs_pending 2\n"), "{prom}");
        assert!(prom.contains("\npmcache_retained 7\n"), "{prom}");
    }

    #[test]
    fn unordered_writeback_says_what_it_risks_and_skips_epochs() {
        let snap = StatsSnapshot {
            writeback_order: "none".into(),
            ..ordered_snapshot()
        };
        let text = render_text(&live_json(&snap, &server_info()));
        assert!(
            text.contains(
                "  order          none (the origin is consistent only once writeback has finished)\n"
            ),
            "{text}"
        );
        assert!(!text.contains("  epochs "), "{text}");
        // A server that predates the order: no order lines at all.
        let mut v = live_json(&snap, &server_info());
        v.as_object_mut().unwrap().remove("writeback_order");
        assert!(!render_text(&v).contains("  order "));
    }

    /// The usage lines add up to the slots: what is neither current nor
    /// free shows as held.
    #[test]
    fn usage_adds_up_to_the_slots() {
        let snap = StatsSnapshot {
            slots: 100,
            occupied: 40,
            free: 10,
            ..ordered_snapshot()
        };
        let text = render_text(&live_json(&snap, &server_info()));
        assert!(text.contains("  occupancy      40 / 100 blocks"), "{text}");
        assert!(text.contains("  free           10 blocks\n"), "{text}");
        assert!(text.contains("  held           50 blocks ("), "{text}");
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(0), "0 ms");
        assert_eq!(age(999), "999 ms");
        assert_eq!(age(1300), "1.3 s");
        assert_eq!(age(125_000), "2 min 5 s");
        assert_eq!(age(3_600_000 + 120_000), "1 h 2 min");
    }

    #[test]
    fn connections_render_as_json_text_and_gauges() {
        let conns = [
            conn(3, Some("alice\n"), Phase::Transmission),
            conn(4, Some(""), Phase::Transmission),
            conn(5, None, Phase::Handshake),
        ];
        let json: Vec<Value> = conns.iter().map(connection_json).collect();
        assert_eq!(json[0]["tls"], true);
        assert_eq!(json[0]["tls_identity"], "alice\n");
        assert_eq!(json[1]["tls_identity"], Value::Null);
        assert_eq!(json[2]["tls"], false);
        assert_eq!(json[2]["tls_cipher"], Value::Null);
        assert_eq!(json[2]["phase"], "handshake");

        let mut text = String::new();
        render_connections(&mut text, &json!({ "connections": json }));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "Connections      3 open (2 over TLS)",
                "  #3 127.0.0.1:40000  TLS TLSv1.3 TLS_AES_256_GCM_SHA384 as alice?, open 5 s",
                "  #4 127.0.0.1:40000  TLS TLSv1.3 TLS_AES_256_GCM_SHA384 (client not identified), open 5 s",
                "  #5 127.0.0.1:40000  plain, open 5 s, in the handshake",
            ]
        );

        let mut prom = String::new();
        connection_gauges(&mut prom, &conns);
        assert!(
            prom.contains("pmcache_connections{tls=\"yes\"} 2\n"),
            "{prom}"
        );
        assert!(
            prom.contains("pmcache_connections{tls=\"no\"} 1\n"),
            "{prom}"
        );
    }
}
