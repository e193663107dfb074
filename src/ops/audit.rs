//! The audit log: one JSON line per state-changing request (intent before it leaves, result
//! after) and per refusal, hash-chained so that an edit, deletion or reordering shows.
//!
//! Write-ahead: [`Audit::intent`] returns only once the intent record is on disk (fsync'd), so a
//! crash after a request left cbgate cannot lose the record of it. One writer thread owns the
//! file (records never interleave) and commits in groups: it writes every record queued so far,
//! fsyncs once and then releases all of their waiters, so concurrent requests share an fsync.
//! A result record has no waiter (its request has left): it waits in memory, waking the writer
//! only when the writer sleeps with nothing pending, and is written with the next intent's
//! batch, or about [`RESULT_SYNC`] later.
//! On a virtual disk an fsync costs a few hundred microseconds of a core and a wake-up of the
//! writer tens: one of each per result would double them.
//!
//! Each record carries `seq` (1, 2, ...) and `prev`, the SHA-256 (hex) of the previous record's
//! line (without its newline); the first record of a fresh log chains from [`GENESIS`]. Rotation
//! (`audit.log` -> `audit.log.1` -> ...) keeps the chain: the first line of a new file chains
//! from the last line of the file before. [`verify`] checks a chain across files.
//!
//! Never in a record: the secret, a JWT, the client token, any header value or the query string
//! (only its SHA-256: queries may carry ids the operator did not mean to keep in a log, and the
//! hash still proves what was sent).

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::Method;
use hyper::body::{Frame, SizeHint};
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

use crate::config::AuditConfig;
use crate::{Body, BoxError};

/// The `prev` of the first record of a fresh log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Request and response bytes looked at for the order summary (order bodies are a few hundred
/// bytes; the hash always covers the whole body).
const SUMMARY_CAP: usize = 64 * 1024;

/// Strings copied from a body into a record are cut to this many characters.
const FIELD_CAP: usize = 256;

/// Jobs taken from the queue per fsync at most (pending results come on top), so the first
/// waiter of a huge queue is not held long.
const MAX_BATCH: usize = 1024;

/// How long a result record may wait for the writer when no intent brings one: the window in
/// which a crash can lose a result (never an intent: those are synced before their request
/// leaves).
pub const RESULT_SYNC: Duration = Duration::from_millis(200);

/// How much of a file's end is read at start to find its last record (records are far smaller).
const TAIL_READ: u64 = 1024 * 1024;

/// Error codes recorded as refusals whatever the method (state-changing requests record every
/// refusal): the policy, and the pre-trade guard and kill switch.
const REFUSAL_CODES: &[&str] = &["policy_denied", "guard_denied", "halted"];

/// The audit log could not be opened or written.
#[derive(Clone, Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit.file {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("the audit log cannot be written: {0}")]
    Write(String),
    #[error("the audit log writer has stopped")]
    Stopped,
}

/// Result records queued for the writer, which nobody waits for.
#[derive(Debug, Default)]
struct Pending {
    lines: std::sync::Mutex<Vec<Vec<u8>>>,
    /// Set by the writer before it sleeps with nothing to write: the next result wakes it.
    idle: std::sync::atomic::AtomicBool,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // A panic while holding it cannot leave the vector half-changed: use it as is.
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, line: Vec<u8>) {
        self.lock().push(line);
    }

    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.lock())
    }

    /// Puts records a failed commit took back in front of any queued since.
    fn restore(&self, mut lines: Vec<Vec<u8>>) {
        let mut pending = self.lock();
        lines.append(&mut pending);
        *pending = lines;
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// What the writer thread is asked to do.
enum Job {
    /// Write `record` with whatever is pending, fsync, then answer `done`.
    Commit {
        /// The record's fields as a JSON object, serialized on the request's own thread (the
        /// writer only frames them with `seq` and `prev`). `None`: a barrier (fsync what is
        /// queued, then answer).
        record: Option<Vec<u8>>,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Result records are pending and the writer slept: start their timer.
    Wake,
}

/// A handle on the audit log; cheap to clone (a channel to the writer thread).
#[derive(Clone, Debug)]
pub struct Audit {
    // Unbounded, yet bounded in practice: every intent and refusal waits for its fsync, so at
    // most one job per request in flight is queued (results wait in `pending`, which each
    // intent's batch empties).
    tx: mpsc::Sender<Job>,
    /// fsyncs done so far (shared with the writer thread), for metrics and tests.
    fsyncs: Arc<AtomicU64>,
    /// Result records waiting for the writer.
    pending: Arc<Pending>,
    /// How long a state-changing request's body may take to arrive (it is buffered to be hashed
    /// before it is sent).
    pub body_timeout: Duration,
}

/// Whether a method changes state (and so gets intent and result records).
pub fn audited(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// The proof that an intent record is durable; turned into the result record.
#[derive(Debug)]
pub struct Ticket {
    audit: Audit,
    request_id: String,
    started: Instant,
}

impl Audit {
    /// Opens the log named by `audit.file` (`None` when unset), resuming its chain, and starts
    /// the writer thread. A torn last line (a crash mid-write) is reported in a warning and
    /// recorded in a `chain_break` record; it does not stop cbgate.
    pub fn open(cfg: &AuditConfig, body_timeout: Duration) -> Result<Option<Audit>, AuditError> {
        Self::open_with(cfg, body_timeout, RESULT_SYNC)
    }

    fn open_with(
        cfg: &AuditConfig,
        body_timeout: Duration,
        result_sync: Duration,
    ) -> Result<Option<Audit>, AuditError> {
        let Some(path) = &cfg.file else {
            return Ok(None);
        };
        let mut writer = Writer::open(path, cfg.max_file_bytes, cfg.keep)?;
        writer.result_sync = result_sync;
        let fsyncs = Arc::clone(&writer.fsyncs);
        let pending = Arc::new(Pending::default());
        let theirs = Arc::clone(&pending);
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("cbgate-audit".into())
            .spawn(move || writer.run(rx, &theirs))
            .map_err(|e| AuditError::Open {
                path: path.clone(),
                message: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(Some(Audit {
            tx,
            fsyncs,
            pending,
            body_timeout,
        }))
    }

    /// The number of fsyncs of the log so far.
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    /// Appends `record` (`seq`, `prev` are added) and waits until it is on disk.
    pub async fn append(&self, record: Map<String, Value>) -> Result<(), AuditError> {
        self.submit(Some(record)).await
    }

    /// Waits until every record queued so far is on disk (for shutdown).
    pub async fn sync(&self) -> Result<(), AuditError> {
        self.submit(None).await
    }

    async fn submit(&self, record: Option<Map<String, Value>>) -> Result<(), AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Job::Commit {
                record: record.as_ref().map(fields_json),
                done,
            })
            .map_err(|_| AuditError::Stopped)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AuditError::Write(e)),
            Err(_) => Err(AuditError::Stopped),
        }
    }

    /// Queues `record` without waiting (result records: the request has already left). It is
    /// written with the next intent, or [`RESULT_SYNC`] later: no wake-up of the writer per
    /// result, only when the writer sleeps with nothing pending.
    fn queue(&self, record: Map<String, Value>) {
        let line = fields_json(&record);
        self.pending.push(line);
        if self.pending.idle.swap(false, Ordering::SeqCst) && self.tx.send(Job::Wake).is_err() {
            tracing::error!("audit log writer has stopped: a result record is lost");
        }
    }

    /// Writes the intent record of a state-changing request and waits until it is durable.
    pub async fn intent(&self, req: &RequestInfo<'_>, body: &[u8]) -> Result<Ticket, AuditError> {
        let mut r = base("intent", req);
        r.insert("body_sha256".into(), sha256_hex(body).into());
        r.insert("body_bytes".into(), body.len().into());
        if let Some(order) = order_summary(req.path, body) {
            r.insert("order".into(), Value::Object(order));
        }
        r.insert("decision".into(), "forwarded".into());
        self.append(r).await?;
        Ok(Ticket {
            audit: self.clone(),
            request_id: req.request_id.to_owned(),
            started: Instant::now(),
        })
    }

    /// Records a request cbgate answered itself with error `code`: the failed result of a
    /// forwarded request (`ticket` is set), or a refusal (for a state-changing request, or any
    /// request refused by policy, guard or kill switch). A write failure is logged: the request
    /// is refused either way.
    pub async fn refused(
        &self,
        ticket: Option<Ticket>,
        req: &RequestInfo<'_>,
        status: u16,
        code: &str,
    ) {
        let record = match ticket {
            Some(t) => {
                let mut r = t.result_base(status);
                r.insert("error".into(), code.into());
                r
            }
            None if audited(req.method) || REFUSAL_CODES.contains(&code) => {
                let mut r = base("refusal", req);
                r.insert("decision".into(), "refused".into());
                r.insert("error".into(), code.into());
                r.insert("status".into(), status.into());
                r
            }
            None => return,
        };
        if let Err(e) = self.append(record).await {
            tracing::error!(request_id = req.request_id, error = %e, "audit record of a refusal not written");
        }
    }
}

/// What a record says about the request.
#[derive(Debug)]
pub struct RequestInfo<'a> {
    pub request_id: &'a str,
    /// The client identity's name (`anonymous` for no known identity; never a token).
    pub identity: Option<&'a str>,
    /// The signing key's name (never its secret).
    pub key: Option<&'a str>,
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn base(kind: &str, req: &RequestInfo<'_>) -> Map<String, Value> {
    let mut r = Map::new();
    r.insert("time".into(), now_rfc3339().into());
    r.insert("type".into(), kind.into());
    r.insert("request_id".into(), req.request_id.into());
    r.insert(
        "identity".into(),
        req.identity.map(Value::from).unwrap_or(Value::Null),
    );
    r.insert(
        "key".into(),
        req.key.map(Value::from).unwrap_or(Value::Null),
    );
    r.insert("method".into(), req.method.as_str().into());
    r.insert("path".into(), capped(req.path, 8 * FIELD_CAP).into());
    if let Some(q) = req.query {
        r.insert("query_sha256".into(), sha256_hex(q.as_bytes()).into());
    }
    r
}

fn capped(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// The order summary of a request body: product, side, order type, sizes, limit price and
/// client order id, under Advanced Trade's names whatever the family: Advanced Trade's
/// `order_configuration` (the type is its one key), or the flat bodies of Exchange
/// (`size`, `funds`, `price`), INTX (`instrument`) and Prime (`base_quantity`, `quote_value`).
/// `None` for anything else.
fn order_summary(path: &str, body: &[u8]) -> Option<Map<String, Value>> {
    if !path.to_ascii_lowercase().contains("/order") || body.len() > SUMMARY_CAP {
        return None;
    }
    let v: Value = serde_json::from_slice(body).ok()?;
    let text = |v: &Value, k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .map(|s| Value::from(capped(s, FIELD_CAP)))
    };
    let mut out = Map::new();
    if let Some(cfg) = v.get("order_configuration") {
        let cfg = cfg.as_object()?;
        for k in ["product_id", "side", "client_order_id"] {
            if let Some(s) = text(&v, k) {
                out.insert(k.into(), s);
            }
        }
        if let Some((kind, params)) = cfg.iter().next() {
            out.insert("order_type".into(), capped(kind, FIELD_CAP).into());
            for k in ["base_size", "quote_size", "limit_price"] {
                if let Some(s) = text(params, k) {
                    out.insert(k.into(), s);
                }
            }
        }
        return Some(out);
    }
    // Exchange, INTX, Prime: one flat object, each field under its family's name.
    const FLAT: &[(&str, &[&str])] = &[
        ("product_id", &["product_id", "instrument"]),
        ("side", &["side"]),
        ("order_type", &["type"]),
        ("base_size", &["size", "base_quantity"]),
        ("quote_size", &["funds", "quote_value"]),
        ("limit_price", &["price", "limit_price"]),
        ("client_order_id", &["client_order_id", "client_oid"]),
    ];
    for (name, spellings) in FLAT {
        if let Some(s) = spellings.iter().find_map(|k| text(&v, k)) {
            out.insert((*name).into(), s);
        }
    }
    // A body with none of these (a cancel's `order_ids`) is not an order.
    (!out.is_empty()).then_some(out)
}

/// `success`, the order id and the error of an Advanced Trade create-order answer.
fn response_summary(body: &[u8], out: &mut Map<String, Value>) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    if let Some(ok) = v.get("success").and_then(Value::as_bool) {
        out.insert("success".into(), ok.into());
    }
    let s = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .map(|s| Value::from(capped(s, FIELD_CAP)))
    };
    if let Some(id) = s(v.pointer("/success_response/order_id")) {
        out.insert("order_id".into(), id);
    } else if let Some(id) = v
        .get("order_id")
        .filter(|id| id.is_string() || id.is_number())
    {
        // INTX (a number) and Prime answer the new order's id at the top level.
        out.insert(
            "order_id".into(),
            capped(&id.to_string().replace('"', ""), FIELD_CAP).into(),
        );
    } else if v.get("product_id").is_some() && v.get("side").is_some() {
        // Exchange answers the order itself, its id in `id`.
        if let Some(id) = s(v.get("id")) {
            out.insert("order_id".into(), id);
        }
    }
    if let Some(e) = s(v.pointer("/error_response/error")) {
        out.insert("order_error".into(), e);
    }
    if let Some(e) = s(v.get("failure_reason")) {
        out.insert("failure_reason".into(), e);
    }
}

impl Ticket {
    fn result_base(&self, status: u16) -> Map<String, Value> {
        let mut r = Map::new();
        r.insert("time".into(), now_rfc3339().into());
        r.insert("type".into(), "result".into());
        r.insert("request_id".into(), self.request_id.as_str().into());
        r.insert("status".into(), status.into());
        r
    }

    /// Passes `body` through unchanged and unslowed, keeping its first bytes; the result record
    /// is queued when the body ends (or is dropped unfinished).
    pub fn tee(self, status: u16, upstream: Option<Duration>, body: Body) -> Body {
        http_body_util::BodyExt::boxed_unsync(Tee {
            inner: body,
            kept: Vec::new(),
            seen: 0,
            ticket: Some(self),
            status,
            upstream,
        })
    }
}

/// The response body on its way to the client, with a capped copy for the result record.
struct Tee {
    inner: Body,
    kept: Vec<u8>,
    seen: u64,
    ticket: Option<Ticket>,
    status: u16,
    upstream: Option<Duration>,
}

impl Tee {
    fn finish(&mut self, end: &str) {
        let Some(t) = self.ticket.take() else { return };
        let mut r = t.result_base(self.status);
        if let Some(u) = self.upstream {
            r.insert("upstream_ms".into(), ms(u).into());
        }
        r.insert("latency_ms".into(), ms(t.started.elapsed()).into());
        r.insert("response_bytes".into(), self.seen.into());
        r.insert("body".into(), end.into());
        if self.seen <= SUMMARY_CAP as u64 {
            response_summary(&self.kept, &mut r);
        }
        t.audit.queue(r);
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl hyper::body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    let room = SUMMARY_CAP.saturating_sub(this.kept.len());
                    this.kept.extend_from_slice(&data[..data.len().min(room)]);
                }
                // hyper may stop polling once the body says it has ended.
                if this.inner.is_end_stream() {
                    this.finish("complete");
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish("error"),
            Poll::Ready(None) => this.finish("complete"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        let end = if hyper::body::Body::is_end_stream(&self.inner) {
            "complete"
        } else {
            // The client went away before the end.
            "aborted"
        };
        self.finish(end);
    }
}

/// A record's fields as a compact JSON object.
fn fields_json(record: &Map<String, Value>) -> Vec<u8> {
    // Cannot fail: a map with string keys and JSON values always serializes.
    serde_json::to_vec(record).unwrap_or_else(|_| b"{}".to_vec())
}

/// The line of record `seq`: `{"seq":N,` then the fields of the JSON object `fields`, then
/// `,"prev":"<hex>"}`; the same bytes as serializing one object with `seq` first and `prev`
/// last.
fn framed(seq: u64, fields: &[u8], prev: &str) -> Vec<u8> {
    let inner = fields
        .strip_prefix(b"{")
        .and_then(|f| f.strip_suffix(b"}"))
        .unwrap_or_default();
    let mut line = Vec::with_capacity(inner.len() + prev.len() + 32);
    line.extend_from_slice(b"{\"seq\":");
    line.extend_from_slice(seq.to_string().as_bytes());
    if !inner.is_empty() {
        line.push(b',');
        line.extend_from_slice(inner);
    }
    line.extend_from_slice(b",\"prev\":\"");
    line.extend_from_slice(prev.as_bytes());
    line.extend_from_slice(b"\"}");
    line
}

/// SHA-256 as lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut s = String::with_capacity(64);
    for b in d.as_ref() {
        s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(b & 0x0f)]));
    }
    s
}

// ---------------------------------------------------------------------------------------------
// The writer
// ---------------------------------------------------------------------------------------------

/// The one owner of the file.
struct Writer {
    path: PathBuf,
    file: File,
    /// Bytes in the current file that are written and synced.
    size: u64,
    /// How long pending result records wait for the writer at most ([`RESULT_SYNC`]).
    result_sync: Duration,
    fsyncs: Arc<AtomicU64>,
    /// `seq` of the last record written (0: none yet).
    seq: u64,
    /// SHA-256 of the last line written.
    prev: String,
    max_file_bytes: u64,
    keep: usize,
}

/// The end of an existing log.
enum Tail {
    Empty,
    Good {
        seq: u64,
        hash: String,
    },
    /// The last line does not parse (a crash mid-write); `good` is the line before, if it does.
    Torn {
        bytes: Vec<u8>,
        newline: bool,
        good: Option<(u64, String)>,
    },
}

fn open_err(path: &Path, message: impl Into<String>) -> AuditError {
    AuditError::Open {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// `seq` and `prev` of a line, when it is an audit record.
fn parse_record(line: &[u8]) -> Option<(u64, String, Map<String, Value>)> {
    let Value::Object(m) = serde_json::from_slice::<Value>(line).ok()? else {
        return None;
    };
    let seq = m.get("seq")?.as_u64()?;
    let prev = m.get("prev")?.as_str()?.to_owned();
    Some((seq, prev, m))
}

/// Reads the end of `path` and finds its last record.
fn read_tail(path: &Path) -> Result<Tail, AuditError> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Tail::Empty),
        Err(e) => return Err(open_err(path, format!("cannot be read: {e}"))),
    };
    let len = f
        .metadata()
        .map_err(|e| open_err(path, format!("cannot be read: {e}")))?
        .len();
    let start = len.saturating_sub(TAIL_READ);
    let mut buf = Vec::new();
    f.seek(SeekFrom::Start(start))
        .and_then(|_| f.read_to_end(&mut buf))
        .map_err(|e| open_err(path, format!("cannot be read: {e}")))?;
    if buf.is_empty() {
        return Ok(Tail::Empty);
    }
    let newline = buf.last() == Some(&b'\n');
    let body = if newline {
        &buf[..buf.len() - 1]
    } else {
        &buf[..]
    };
    let mut lines = body.rsplit(|b| *b == b'\n');
    let last = lines.next().unwrap_or_default();
    let good = |l: &[u8]| parse_record(l).map(|(seq, _, _)| (seq, sha256_hex(l)));
    if newline {
        if let Some((seq, hash)) = good(last) {
            return Ok(Tail::Good { seq, hash });
        }
    }
    Ok(Tail::Torn {
        bytes: last.to_vec(),
        newline,
        good: lines.next().and_then(good),
    })
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Opens for appending, creating the file with mode 0600 (never readable by others, not even
/// for a moment).
fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

impl Writer {
    fn open(path: &Path, max_file_bytes: u64, keep: usize) -> Result<Writer, AuditError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                return Err(open_err(
                    path,
                    format!(
                        "directory {} does not exist; create it (mode 0700) or change audit.file",
                        dir.display()
                    ),
                ));
            }
        }
        let mut tail = read_tail(path)?;
        // Whether the tail is in `path` itself (not in the rotated file before it).
        let mut own = true;
        if matches!(tail, Tail::Empty) {
            // A crash between rotating and the first write leaves only audit.log.1.
            tail = read_tail(&rotated(path, 1))?;
            own = false;
        }
        let file =
            open_append(path).map_err(|e| open_err(path, format!("cannot be opened: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| open_err(path, format!("cannot be read: {e}")))?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "audit log was readable by others: mode set to 0600");
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| open_err(path, format!("cannot be made private: {e}")))?;
        }
        let mut w = Writer {
            path: path.to_owned(),
            file,
            size: meta.len(),
            result_sync: RESULT_SYNC,
            fsyncs: Arc::default(),
            seq: 0,
            prev: GENESIS.to_owned(),
            max_file_bytes,
            keep,
        };
        match tail {
            Tail::Empty => {}
            Tail::Good { seq, hash } => {
                w.seq = seq;
                w.prev = hash;
            }
            Tail::Torn {
                bytes,
                newline,
                good,
            } => {
                tracing::warn!(
                    file = %path.display(),
                    torn_bytes = bytes.len(),
                    "audit log's last line is torn (a crash while writing?): starting a new chain segment with a chain_break record"
                );
                if let Some((seq, hash)) = good {
                    w.seq = seq;
                    w.prev = hash;
                }
                if !newline && own {
                    // Ends the torn line, so the break record is a line of its own.
                    w.file
                        .write_all(b"\n")
                        .map_err(|e| open_err(path, format!("cannot be written: {e}")))?;
                    w.size += 1;
                }
                let mut r = Map::new();
                r.insert("time".into(), now_rfc3339().into());
                r.insert("type".into(), "chain_break".into());
                r.insert(
                    "reason".into(),
                    "the previous line is torn (cbgate stopped while writing it)".into(),
                );
                r.insert("torn_bytes".into(), bytes.len().into());
                r.insert("torn_sha256".into(), sha256_hex(&bytes).into());
                w.commit(&[fields_json(&r)])
                    .map_err(|e| open_err(path, format!("cannot be written: {e}")))?;
            }
        }
        Ok(w)
    }

    fn run(mut self, rx: mpsc::Receiver<Job>, pending: &Pending) {
        let mut batch = Vec::new();
        loop {
            let job = if !pending.is_empty() {
                match rx.recv_timeout(self.result_sync) {
                    Ok(j) => j,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        // No intent came to carry them: write and sync the results now.
                        self.write_results(pending.take(), pending);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                pending.idle.store(true, Ordering::SeqCst);
                // A result queued before `idle` was set sent no wake-up: look once more.
                if !pending.is_empty() {
                    pending.idle.store(false, Ordering::SeqCst);
                    continue;
                }
                let job = rx.recv();
                pending.idle.store(false, Ordering::SeqCst);
                match job {
                    Ok(j) => j,
                    Err(_) => break,
                }
            };
            batch.push(job);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            // Only a batch someone waits for (an intent, a refusal, a barrier) is written and
            // fsync'd now, with the pending results before it; a wake-up alone starts the
            // results' timer.
            let mut records = Vec::new();
            let mut waiters = Vec::new();
            for job in batch.drain(..) {
                if let Job::Commit { record, done } = job {
                    records.extend(record);
                    waiters.push(done);
                }
            }
            if waiters.is_empty() {
                continue;
            }
            // Pending results first: their requests left before these intents'.
            let mut all = pending.take();
            let results = all.len();
            all.append(&mut records);
            let n = all.len();
            let res = self.commit(&all).map_err(|e| e.to_string());
            if let Err(e) = &res {
                tracing::error!(file = %self.path.display(), records = n, error = %e, "audit log write failed: state-changing requests are refused until it succeeds");
                // The intents' requests are refused (their waiters get the error); the
                // results' requests have left, so their records are tried again.
                all.truncate(results);
                pending.restore(all);
            }
            for done in waiters {
                let _ = done.send(res.clone());
            }
        }
        // Every handle is gone: what is pending is written and everything synced.
        self.write_results(pending.take(), pending);
    }

    /// Writes result records nobody waits for, and fsyncs.
    fn write_results(&mut self, records: Vec<Vec<u8>>, pending: &Pending) {
        let n = records.len();
        if n == 0 {
            return;
        }
        if let Err(e) = self.commit(&records) {
            tracing::error!(file = %self.path.display(), records = n, error = %e, "audit log write of result records failed: tried again with the next record");
            pending.restore(records);
        }
    }

    /// Writes `records` and fsyncs once. On failure the file is cut back to its last good
    /// length and the chain state restored, so the next attempt continues a clean chain.
    fn commit(&mut self, records: &[Vec<u8>]) -> std::io::Result<()> {
        let (seq0, prev0) = (self.seq, self.prev.clone());
        let res = self.write_all(records);
        if res.is_err() {
            let _ = self.file.set_len(self.size);
            self.seq = seq0;
            self.prev = prev0;
        }
        res
    }

    fn write_all(&mut self, records: &[Vec<u8>]) -> std::io::Result<()> {
        let mut out: Vec<u8> = Vec::new();
        let (mut seq, mut prev) = (self.seq, self.prev.clone());
        for fields in records {
            let line = framed(seq + 1, fields, &prev);
            let pending = self.size + out.len() as u64;
            if pending > 0 && pending + line.len() as u64 + 1 > self.max_file_bytes {
                self.flush(&out, seq, &prev)?;
                out.clear();
                self.rotate()?;
            }
            prev = sha256_hex(&line);
            seq += 1;
            out.extend_from_slice(&line);
            out.push(b'\n');
        }
        self.flush(&out, seq, &prev)
    }

    fn flush(&mut self, out: &[u8], seq: u64, prev: &str) -> std::io::Result<()> {
        self.file.write_all(out)?;
        self.sync()?;
        self.size += out.len() as u64;
        self.seq = seq;
        self.prev = prev.to_owned();
        Ok(())
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.file.sync_data()
    }

    /// `audit.log` -> `audit.log.1` -> ... -> `audit.log.<keep>` (the oldest is dropped).
    fn rotate(&mut self) -> std::io::Result<()> {
        for i in (1..self.keep).rev() {
            match std::fs::rename(rotated(&self.path, i), rotated(&self.path, i + 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, rotated(&self.path, 1))?;
        self.file = open_append(&self.path)?;
        sync_dir(&self.path);
        self.size = 0;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------------------------

/// What is wrong at the first broken record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The record's hash no longer matches the `prev` its successor recorded.
    Edited { next_line: usize },
    /// Records are missing between the previous record and this one.
    Deleted { from_seq: u64, to_seq: u64 },
    /// This record's `seq` does not follow the previous one's.
    Reordered {
        seq: u64,
        after: u64,
        /// The previous record is in the file before (files given out of order?).
        across_files: bool,
    },
    /// The last line is incomplete (a crash while writing, or cut off).
    Truncated,
    /// The line is not an audit record.
    NotARecord,
    /// The first record of the log does not chain from the genesis value.
    BadGenesis,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Edited { next_line } => write!(
                f,
                "edited: its SHA-256 does not match the prev recorded by the next record (line {next_line})"
            ),
            Problem::Deleted { from_seq, to_seq } if from_seq == to_seq => {
                write!(f, "deleted: record seq {from_seq} is missing before this one")
            }
            Problem::Deleted { from_seq, to_seq } => write!(
                f,
                "deleted: records seq {from_seq}..{to_seq} are missing before this one"
            ),
            Problem::Reordered {
                seq,
                after,
                across_files,
            } => {
                write!(f, "reordered: seq {seq} comes after seq {after}")?;
                if *across_files {
                    write!(f, " in the file before: give rotated files oldest first (audit.log.2 audit.log.1 audit.log)")?;
                }
                Ok(())
            }
            Problem::Truncated => write!(f, "truncated: the last line is incomplete"),
            Problem::NotARecord => write!(f, "not an audit record (edited or corrupted)"),
            Problem::BadGenesis => write!(
                f,
                "edited: the first record (seq 1) does not chain from the genesis value"
            ),
        }
    }
}

/// Verification failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{file}:{line}: {problem}", file = .file.display())]
    Broken {
        file: PathBuf,
        /// 1-based.
        line: usize,
        problem: Problem,
    },
    // Not a `source`: the message includes it, and `{:#}` would repeat it.
    #[error("{file}: cannot be read: {error}", file = .file.display())]
    Read {
        file: PathBuf,
        error: std::io::Error,
    },
    #[error("no audit records in the files given")]
    Empty,
}

/// A verified chain.
#[derive(Debug)]
pub struct Report {
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// SHA-256 of the last line: compare with a copy kept elsewhere to detect a cut-off end.
    pub head: String,
    /// Chain breaks cbgate recorded after a crash (file, line, reason).
    pub breaks: Vec<String>,
}

struct Line<'a> {
    file: &'a Path,
    no: usize,
    bytes: &'a [u8],
    newline: bool,
}

/// Checks the hash chain across `files`, oldest first (`audit.log.2 audit.log.1 audit.log`),
/// and names the first broken record.
pub fn verify(files: &[PathBuf]) -> Result<Report, VerifyError> {
    let mut texts = Vec::new();
    for f in files {
        let t = std::fs::read(f).map_err(|error| VerifyError::Read {
            file: f.clone(),
            error,
        })?;
        texts.push((f.as_path(), t));
    }
    let mut lines = Vec::new();
    for (file, text) in &texts {
        let mut rest: &[u8] = text;
        let mut no = 0;
        while !rest.is_empty() {
            no += 1;
            let (bytes, newline, next) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => (&rest[..i], true, &rest[i + 1..]),
                None => (rest, false, &rest[rest.len()..]),
            };
            lines.push(Line {
                file,
                no,
                bytes,
                newline,
            });
            rest = next;
        }
    }
    let broken = |l: &Line<'_>, problem| VerifyError::Broken {
        file: l.file.to_owned(),
        line: l.no,
        problem,
    };
    let mut report = Report {
        records: 0,
        first_seq: 0,
        last_seq: 0,
        head: String::new(),
        breaks: Vec::new(),
    };
    // (seq, hash, index) of the last good record.
    let mut last: Option<(u64, String, usize)> = None;
    for (i, l) in lines.iter().enumerate() {
        let Some((seq, prev, rec)) = parse_record(l.bytes).filter(|_| l.newline) else {
            // A torn line cbgate found at start and recorded in the next line is accepted.
            let explained = lines
                .get(i + 1)
                .and_then(|n| parse_record(n.bytes))
                .is_some_and(|(_, _, r)| {
                    r.get("type").and_then(Value::as_str) == Some("chain_break")
                        && r.get("torn_sha256").and_then(Value::as_str)
                            == Some(sha256_hex(l.bytes).as_str())
                });
            if explained {
                continue;
            }
            let problem = if !l.newline && i + 1 == lines.len() {
                Problem::Truncated
            } else {
                Problem::NotARecord
            };
            return Err(broken(l, problem));
        };
        match &last {
            None => {
                if seq == 1 && prev != GENESIS {
                    return Err(broken(l, Problem::BadGenesis));
                }
                report.first_seq = seq;
            }
            Some((pseq, phash, pi)) => {
                let expected = pseq + 1;
                // The missing record further down means moved, not deleted.
                let later = || {
                    lines[i + 1..]
                        .iter()
                        .any(|n| parse_record(n.bytes).is_some_and(|(s, _, _)| s == expected))
                };
                if seq < expected || (seq > expected && later()) {
                    return Err(broken(
                        l,
                        Problem::Reordered {
                            seq,
                            after: *pseq,
                            across_files: lines[*pi].file != l.file,
                        },
                    ));
                }
                if seq > expected {
                    return Err(broken(
                        l,
                        Problem::Deleted {
                            from_seq: pseq + 1,
                            to_seq: seq - 1,
                        },
                    ));
                }
                if &prev != phash {
                    return Err(broken(&lines[*pi], Problem::Edited { next_line: l.no }));
                }
            }
        }
        if rec.get("type").and_then(Value::as_str) == Some("chain_break") {
            report.breaks.push(format!(
                "{}:{}: {}",
                l.file.display(),
                l.no,
                rec.get("reason").and_then(Value::as_str).unwrap_or("")
            ));
        }
        report.records += 1;
        report.last_seq = seq;
        last = Some((seq, sha256_hex(l.bytes), i));
    }
    match last {
        Some((_, head, _)) => {
            report.head = head;
            Ok(report)
        }
        None => Err(VerifyError::Empty),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("type".into(), kind.into());
        m
    }

    fn rec_json(kind: &str) -> Vec<u8> {
        fields_json(&rec(kind))
    }

    #[test]
    fn a_framed_line_is_the_object_with_seq_first_and_prev_last() {
        let mut fields = Map::new();
        fields.insert("type".into(), "intent".into());
        fields.insert("path".into(), "/a \"quoted\" \u{e9}".into());
        fields.insert("n".into(), 3.into());
        let mut whole = Map::new();
        whole.insert("seq".into(), 7.into());
        whole.extend(fields.clone());
        whole.insert("prev".into(), GENESIS.into());
        let want = serde_json::to_vec(&Value::Object(whole)).expect("json");
        assert_eq!(framed(7, &fields_json(&fields), GENESIS), want);
        assert_eq!(
            framed(1, b"{}", GENESIS),
            format!("{{\"seq\":1,\"prev\":\"{GENESIS}\"}}").into_bytes()
        );
    }

    fn lines(path: &Path) -> usize {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .count()
    }

    /// Polls `ok` for up to 10 s.
    async fn eventually(mut ok: impl FnMut() -> bool) -> bool {
        for _ in 0..1000 {
            if ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ok()
    }

    /// A log at `dir/name` whose pending results wait `timer` at most.
    fn open_log(dir: &Path, name: &str, timer: Duration) -> (PathBuf, Audit) {
        let path = dir.join(name);
        let cfg = AuditConfig {
            file: Some(path.clone()),
            ..AuditConfig::default()
        };
        let log = Audit::open_with(&cfg, Duration::from_secs(5), timer)
            .expect("open")
            .expect("configured");
        (path, log)
    }

    #[tokio::test]
    async fn result_records_ride_with_the_next_intent_or_are_written_by_the_timer() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A timer that never fires within the test: only an intent may write them.
        let (path, log) = open_log(dir.path(), "audit.log", Duration::from_secs(3600));
        let base = log.fsyncs();
        for _ in 0..3 {
            log.queue(rec("result"));
        }
        // Give a wrongly eager writer time to write them; it must not.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(lines(&path), 0, "a result record was written on its own");
        assert_eq!(
            log.fsyncs(),
            base,
            "a result record cost an fsync of its own"
        );
        log.append(rec("intent")).await.expect("intent");
        assert_eq!(
            log.fsyncs(),
            base + 1,
            "one fsync for the intent and the results"
        );
        assert_eq!(lines(&path), 4, "the results are written with the intent");
        // With a short timer: a result is written and synced without any intent.
        let (path2, log2) = open_log(dir.path(), "audit2.log", Duration::from_millis(20));
        let base2 = log2.fsyncs();
        log2.queue(rec("result"));
        assert!(
            eventually(|| lines(&path2) == 1 && log2.fsyncs() == base2 + 1).await,
            "a result record was never written and synced"
        );
        // And again after the writer went back to sleep: the wake-up is not lost.
        tokio::time::sleep(Duration::from_millis(100)).await;
        log2.queue(rec("result"));
        assert!(
            eventually(|| lines(&path2) == 2).await,
            "a second result record, queued while the writer slept, was never written"
        );
        // A handle dropped: what is pending is written.
        let (path3, log3) = open_log(dir.path(), "audit3.log", Duration::from_secs(3600));
        log3.queue(rec("result"));
        drop(log3);
        assert!(
            eventually(|| lines(&path3) == 1).await,
            "a pending result was lost when the last handle went away"
        );
        let r = verify(std::slice::from_ref(&path)).expect("chain");
        assert_eq!(r.records, 4);
    }

    #[test]
    fn chain_resumes_after_restart_and_a_torn_tail_is_a_recorded_break() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let mut w = Writer::open(&path, 1 << 20, 3).expect("open");
        w.commit(&[rec_json("a"), rec_json("b")]).expect("write");
        drop(w);
        let mut w = Writer::open(&path, 1 << 20, 3).expect("reopen");
        assert_eq!(w.seq, 2);
        w.commit(&[rec_json("c")]).expect("write");
        drop(w);
        let r = verify(std::slice::from_ref(&path)).expect("chain verifies across a restart");
        assert_eq!((r.records, r.last_seq, r.breaks.len()), (3, 3, 0));
        // A crash mid-write leaves half a line.
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"{\"seq\":4,\"time\":\"20").expect("tear");
        drop(f);
        let e = verify(std::slice::from_ref(&path)).expect_err("torn tail");
        assert!(
            matches!(
                e,
                VerifyError::Broken {
                    line: 4,
                    problem: Problem::Truncated,
                    ..
                }
            ),
            "{e}"
        );
        let mut w = Writer::open(&path, 1 << 20, 3).expect("open over a torn tail");
        w.commit(&[rec_json("d")]).expect("write");
        drop(w);
        let r = verify(std::slice::from_ref(&path)).expect("torn line explained by a chain_break");
        assert_eq!(r.records, 5, "a, b, c, chain_break, d");
        assert_eq!(r.breaks.len(), 1, "{:?}", r.breaks);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn rotation_keeps_the_chain_and_the_newest_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let mut w = Writer::open(&path, 300, 2).expect("open");
        for _ in 0..20 {
            w.commit(&[rec_json("x"), rec_json("y")]).expect("write");
        }
        assert!(rotated(&path, 2).exists() && !rotated(&path, 3).exists());
        let files = vec![rotated(&path, 2), rotated(&path, 1), path.clone()];
        let r = verify(&files).expect("chain spans the kept files");
        assert_eq!(r.last_seq, 40);
        assert!(r.first_seq > 1, "the oldest files were dropped");
        let e = verify(&[path.clone(), rotated(&path, 1)]).expect_err("newest first");
        assert!(e.to_string().contains("oldest first"), "{e}");
    }

    #[test]
    fn order_summary_reads_the_order_configuration() {
        let body = br#"{"client_order_id":"c1","product_id":"BTC-USD","side":"BUY","order_configuration":{"limit_limit_gtc":{"base_size":"0.001","limit_price":"10000"}}}"#;
        let s = order_summary("/api/v3/brokerage/orders", body).expect("summary");
        assert_eq!(
            Value::Object(s),
            serde_json::json!({"product_id":"BTC-USD","side":"BUY","client_order_id":"c1","order_type":"limit_limit_gtc","base_size":"0.001","limit_price":"10000"})
        );
        assert!(order_summary("/api/v3/brokerage/orders", b"not json").is_none());
        assert!(order_summary("/v2/accounts", body).is_none());
        // The flat shapes of Exchange, INTX and Prime, under the same names.
        let ex = br#"{"product_id":"BTC-USD","side":"buy","type":"market","funds":"10","client_oid":"c-9"}"#;
        let s = order_summary("/orders", ex).expect("exchange summary");
        assert_eq!(s["order_type"], "market");
        assert_eq!(s["quote_size"], "10");
        assert_eq!(s["client_order_id"], "c-9");
        let ix = br#"{"instrument":"BTC-PERP","side":"BUY","type":"LIMIT","size":"1","price":"2"}"#;
        let s = order_summary("/api/v1/orders", ix).expect("intx summary");
        assert_eq!(
            (&s["product_id"], &s["base_size"], &s["limit_price"]),
            (&"BTC-PERP".into(), &"1".into(), &"2".into())
        );
        let pr = br#"{"product_id":"ETH-USD","side":"SELL","type":"LIMIT","base_quantity":"3","limit_price":"4"}"#;
        let s = order_summary("/v1/portfolios/p/order", pr).expect("prime summary");
        assert_eq!(
            (&s["base_size"], &s["limit_price"]),
            (&"3".into(), &"4".into())
        );
        assert!(order_summary("/orders", br#"{"order_ids":["a"]}"#).is_none());
    }
}
