//! Request-smuggling guard: a transparent IO wrapper in front of hyper's HTTP/1 parser.
//!
//! hyper already refuses many smuggling shapes (obs-fold, differing duplicate `Content-Length`,
//! a `Transfer-Encoding` whose last coding is not `chunked`, `Transfer-Encoding` on HTTP/1.0),
//! but it *accepts* others and repairs them silently: a request with both `Transfer-Encoding:
//! chunked` and `Content-Length` (it drops the length), duplicate equal `Content-Length` fields,
//! `Transfer-Encoding: chunked, chunked`, bare-LF line endings. The service never sees what was
//! dropped, so it cannot refuse them. [`SmuggleGuard`] watches the client's bytes before hyper
//! does, follows the message framing (head, `Content-Length` body, chunked body) exactly as hyper
//! will, and when a head is ambiguous it never hands that head to hyper. Instead it substitutes a
//! synthetic request for `/.cbgate-rejected/<reason>` with `Connection: close`, after which
//! hyper gets no more bytes. hyper parses the synthetic request after any earlier pipelined
//! request, so responses stay in order, and the proxy answers it with a 400 that says why
//! ([`rejected`]).
//!
//! The guard is fail-closed: a head where its parse and httparse's disagree is refused, never
//! passed on. It steps aside (passthrough for the rest of the connection) only where hyper is
//! certain to reject the bytes itself and close the connection (a head longer than
//! [`MAX_HEAD`], a request line httparse refuses, malformed chunk framing), or where the bytes
//! are not HTTP/1 at all (the HTTP/2 preface, WebSocket frames after a `101`).
//!
//! Cost: a request head is copied once into a reused buffer and parsed once more with
//! httparse; bodies are counted, never copied, and are passed on as they arrive.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The largest request head (request line and header fields) the guard inspects. Past it the
/// guard steps aside and hyper answers 431 itself, which is safe only because hyper's HTTP/1
/// read buffer (`max_buf_size`, set in `server.rs`) is no larger: hyper then never holds a
/// complete head longer than this. If that buffer were larger, a head padded past this size
/// would reach hyper uninspected. `tests/smuggling.rs` checks exactly that.
pub const MAX_HEAD: usize = 64 * 1024;

/// How much is read from the client at a time while a head is being collected.
const READ_CHUNK: usize = 8 * 1024;

/// The path prefix of the synthetic request. `Proxy::forward` checks for it before anything
/// else and answers 400, and no route matches it, so a client that sends it itself only gets
/// the same 400.
const MARKER: &str = "/.cbgate-rejected/";

/// The start of the HTTP/2 connection preface (RFC 9113 §3.4). h2c clients with prior
/// knowledge send it first; hyper-util's auto builder then switches to HTTP/2, which has its
/// own framing and none of these ambiguities.
const H2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0";

/// The first byte of a TLS handshake record (a ClientHello on a new connection).
const TLS_HANDSHAKE: u8 = 0x16;

/// What a client that spoke TLS to a plain listener is told (in the log; it cannot read HTTP).
pub const TLS_ON_PLAIN: &str = "a TLS ClientHello arrived on a plain-HTTP listener: the client uses https://; point it at http://HOST:PORT, or at cbgate's https:// listener (listen = [\"https://127.0.0.1:8443\"], CA from `cbgate ca`)";

/// After refusing a request, how long and how much the guard keeps reading (and discarding)
/// once hyper has sent the 400 and shut down its side. Closing a socket with unread input makes
/// the kernel send a reset, which can destroy the 400 before the client reads it ("lingering
/// close", as Apache and nginx do).
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Why a request head was refused. Each has a slug (the last path segment of the synthetic
/// request) and a sentence for the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    TeAndCl,
    DuplicateCl,
    BadTe,
    TeHttp10,
    BadCl,
    BareLf,
    BareCr,
    Nul,
    ObsFold,
    WsBeforeColon,
    BadHeader,
}

impl Reason {
    const ALL: [Reason; 11] = [
        Reason::TeAndCl,
        Reason::DuplicateCl,
        Reason::BadTe,
        Reason::TeHttp10,
        Reason::BadCl,
        Reason::BareLf,
        Reason::BareCr,
        Reason::Nul,
        Reason::ObsFold,
        Reason::WsBeforeColon,
        Reason::BadHeader,
    ];

    fn slug(self) -> &'static str {
        match self {
            Reason::TeAndCl => "te-and-cl",
            Reason::DuplicateCl => "duplicate-cl",
            Reason::BadTe => "bad-te",
            Reason::TeHttp10 => "te-http10",
            Reason::BadCl => "bad-cl",
            Reason::BareLf => "bare-lf",
            Reason::BareCr => "bare-cr",
            Reason::Nul => "nul",
            Reason::ObsFold => "obs-fold",
            Reason::WsBeforeColon => "ws-before-colon",
            Reason::BadHeader => "bad-header",
        }
    }

    fn sentence(self) -> &'static str {
        match self {
            Reason::TeAndCl => "request refused: it carries both Transfer-Encoding and Content-Length (RFC 9112 §6.1); a request smuggling shape",
            Reason::DuplicateCl => "request refused: it carries more than one Content-Length value (RFC 9112 §6.3); a request smuggling shape",
            Reason::BadTe => "request refused: Transfer-Encoding must be exactly one \"chunked\" (RFC 9112 §6.1); other codings, lists and repeated fields are a request smuggling shape",
            Reason::TeHttp10 => "request refused: Transfer-Encoding in an HTTP/1.0 request (RFC 9112 §6.1); a request smuggling shape",
            Reason::BadCl => "request refused: Content-Length is not a plain decimal number (RFC 9110 §8.6, RFC 9112 §6.3); a request smuggling shape",
            Reason::BareLf => "request refused: a line of the request head ends in a bare LF instead of CRLF (RFC 9112 §2.2); parsers disagree on it, a request smuggling shape",
            Reason::BareCr => "request refused: a bare CR in the request head (RFC 9112 §2.2); a request smuggling shape",
            Reason::Nul => "request refused: a NUL byte in the request head (RFC 9110 §5.5); a request smuggling shape",
            Reason::ObsFold => "request refused: a header line starts with whitespace (obsolete line folding, RFC 9112 §5.2); a request smuggling shape",
            Reason::WsBeforeColon => "request refused: whitespace between a header name and its colon (RFC 9112 §5.1); a request smuggling shape",
            Reason::BadHeader => "request refused: a malformed header field (RFC 9110 §5.5, RFC 9112 §5.1)",
        }
    }
}

/// Maps the path of a synthetic request made by [`SmuggleGuard`] back to the sentence that
/// explains the refusal; `None` for every other path. The proxy checks this first and answers
/// 400 with the sentence.
pub fn rejected(path: &str) -> Option<&'static str> {
    let slug = path.strip_prefix(MARKER)?;
    Reason::ALL
        .iter()
        .find(|r| r.slug() == slug)
        .map(|r| r.sentence())
}

/// Where the client's byte stream is, in terms of HTTP/1 message framing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    /// Collecting a request head; nothing of it is passed on until it has been checked.
    Head,
    /// Inside a `Content-Length` body: this many bytes remain (never 0).
    Length(u64),
    /// Inside a chunked body: the decoder state and the chunk size being read / data left.
    Chunked(Chunk, u64),
    /// Not guarding any more: every byte goes through unchanged.
    Passthrough,
    /// A head was refused and the synthetic request queued; after it, hyper gets nothing more.
    Rejected,
    /// The client opened with a TLS ClientHello: it wants `https://`, which this listener
    /// does not speak. The read fails with a hint and the connection closes.
    TlsHello,
}

/// The chunked decoder's states, mirroring hyper's `ChunkedState` byte for byte (hyper 1.x,
/// `proto/h1/decode.rs`). The guard must never consider a byte to be body data where hyper
/// would start parsing a new head, so its framing accepts exactly what hyper accepts; where
/// hyper errors (and closes the connection), the guard stops guarding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// First hex digit of a chunk size.
    Start,
    /// Further hex digits, or what ends the size.
    Size,
    /// Whitespace after the size.
    SizeLws,
    /// A chunk extension, up to CR.
    Ext,
    /// The LF after the size line.
    SizeLf,
    /// Chunk data.
    Data,
    /// The CRLF after chunk data.
    DataCr,
    DataLf,
    /// After the last chunk's size line: CR (end) or the start of a trailer field.
    EndCr,
    /// A trailer field, up to CR.
    Trailer,
    TrailerLf,
    /// The final LF.
    EndLf,
}

enum Step {
    Next(Chunk, u64),
    End,
    Bad,
}

fn hex(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
        _ => None,
    }
}

/// One byte of chunk framing (everything but chunk data).
fn chunk_step(state: Chunk, size: u64, b: u8) -> Step {
    let digit = |size: u64, d: u64| match size.checked_mul(16).and_then(|s| s.checked_add(d)) {
        Some(s) => Step::Next(Chunk::Size, s),
        None => Step::Bad,
    };
    if let (Chunk::Start | Chunk::Size, Some(d)) = (state, hex(b)) {
        return digit(if state == Chunk::Start { 0 } else { size }, d);
    }
    match (state, b) {
        (Chunk::Size | Chunk::SizeLws, b' ' | b'\t') => Step::Next(Chunk::SizeLws, size),
        (Chunk::Size | Chunk::SizeLws, b';') => Step::Next(Chunk::Ext, size),
        (Chunk::Size | Chunk::SizeLws | Chunk::Ext, b'\r') => Step::Next(Chunk::SizeLf, size),
        (Chunk::Ext, b'\n') => Step::Bad,
        (Chunk::Ext, _) => Step::Next(Chunk::Ext, size),
        (Chunk::SizeLf, b'\n') if size == 0 => Step::Next(Chunk::EndCr, 0),
        (Chunk::SizeLf, b'\n') => Step::Next(Chunk::Data, size),
        (Chunk::DataCr, b'\r') => Step::Next(Chunk::DataLf, 0),
        (Chunk::DataLf, b'\n') => Step::Next(Chunk::Start, 0),
        (Chunk::EndCr, b'\r') => Step::Next(Chunk::EndLf, 0),
        (Chunk::Trailer, b'\r') => Step::Next(Chunk::TrailerLf, 0),
        (Chunk::EndCr | Chunk::Trailer, _) => Step::Next(Chunk::Trailer, 0),
        (Chunk::TrailerLf, b'\n') => Step::Next(Chunk::EndCr, 0),
        (Chunk::EndLf, b'\n') => Step::End,
        _ => Step::Bad,
    }
}

impl Frame {
    /// Consumes body bytes from the start of `data` and returns how many belong to the current
    /// body: all of them, unless the body ends inside `data`, in which case the state is `Head`
    /// afterwards and the rest is the next request.
    fn advance(&mut self, data: &[u8]) -> usize {
        let mut i = 0;
        while i < data.len() {
            let left = data.len() - i;
            match *self {
                Frame::Head | Frame::Rejected | Frame::TlsHello => return i,
                Frame::Passthrough => return data.len(),
                Frame::Length(n) => {
                    let take = take(n, left);
                    i += take;
                    let rest = n - take as u64;
                    *self = if rest == 0 {
                        Frame::Head
                    } else {
                        Frame::Length(rest)
                    };
                }
                Frame::Chunked(Chunk::Data, n) => {
                    let take = take(n, left);
                    i += take;
                    let rest = n - take as u64;
                    *self = if rest == 0 {
                        Frame::Chunked(Chunk::DataCr, 0)
                    } else {
                        Frame::Chunked(Chunk::Data, rest)
                    };
                }
                Frame::Chunked(state, size) => {
                    *self = match chunk_step(state, size, data[i]) {
                        Step::Next(state, size) => Frame::Chunked(state, size),
                        Step::End => Frame::Head,
                        // hyper fails the body on the same byte and closes the connection,
                        // so nothing after it will be parsed as a request.
                        Step::Bad => Frame::Passthrough,
                    };
                    i += 1;
                }
            }
        }
        i
    }
}

/// `min(n, left)` as a `usize`.
fn take(n: u64, left: usize) -> usize {
    usize::try_from(n).map_or(left, |n| n.min(left))
}

/// The result of scanning a head so far.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// No empty line yet.
    Partial,
    /// The head is complete and this long.
    Complete(usize),
    /// A byte-level smuggling shape.
    Reject(Reason),
    /// Not an HTTP/1 request line: hyper refuses it itself, or (after a 101) it is WebSocket.
    NotHttp,
}

/// Incremental scan of a request head, byte by byte, resumable across reads so that a head
/// split over many reads is scanned once.
#[derive(Debug, Default)]
struct HeadScan {
    /// Bytes of the head scanned so far.
    pos: usize,
    /// A non-empty line has begun (empty lines before the request line are skipped, as
    /// httparse and RFC 9112 §2.2 do).
    started: bool,
    prev_cr: bool,
    /// Non-empty lines completed (the request line is the first).
    lines: usize,
    line_len: usize,
    /// Still in the method token of the request line.
    in_method: bool,
    /// The current header line's colon has been seen.
    colon: bool,
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl HeadScan {
    fn scan(&mut self, head: &[u8]) -> Scan {
        while let Some(&b) = head.get(self.pos) {
            self.pos += 1;
            if self.prev_cr {
                self.prev_cr = false;
                if b != b'\n' {
                    return Scan::Reject(Reason::BareCr);
                }
                if !self.started {
                    continue;
                }
                if self.line_len == 0 {
                    return Scan::Complete(self.pos);
                }
                self.lines += 1;
                self.line_len = 0;
                self.colon = false;
                continue;
            }
            if self.lines == 0 && (self.line_len == 0 || self.in_method) {
                // A method is a token (RFC 9112 §3.1); anything else makes httparse fail at
                // once, and hyper answers 400 and closes. WebSocket frames, which follow a 101
                // on the same stream, always fail here: the first byte is a control byte or
                // 0x41/0x42 ('A'/'B', a compressed fragment), and the second has the mask bit
                // (0x80) set because client frames are masked (RFC 6455 §5.2).
                match b {
                    b'\r' if !self.started => self.prev_cr = true,
                    b'\n' => return Scan::Reject(Reason::BareLf),
                    b' ' if self.in_method => self.in_method = false,
                    b if is_tchar(b) => {
                        self.started = true;
                        self.in_method = true;
                    }
                    _ => return Scan::NotHttp,
                }
                if self.started {
                    self.line_len += 1;
                }
                continue;
            }
            match b {
                b'\r' => self.prev_cr = true,
                // httparse takes a bare LF as a line end (RFC 9112 §2.2 allows it), but a
                // parser in front of cbgate may take it as part of a field value, so
                // `X: a\nTransfer-Encoding: chunked` would frame differently on each side. No
                // HTTP library sends it.
                b'\n' => return Scan::Reject(Reason::BareLf),
                0 => return Scan::Reject(Reason::Nul),
                // A header line starting with whitespace is obs-fold (or whitespace before the
                // first field, RFC 9112 §2.2): parsers that unfold it and parsers that take it
                // as a new field see different headers (RFC 9112 §5.2).
                b' ' | b'\t' if self.lines > 0 && self.line_len == 0 => {
                    return Scan::Reject(Reason::ObsFold)
                }
                // `Transfer-Encoding : chunked` is a different field name to strict parsers and
                // the same one to lenient ones; RFC 9112 §5.1 says a server MUST reject it.
                b' ' | b'\t' if self.lines > 0 && !self.colon => {
                    return Scan::Reject(Reason::WsBeforeColon)
                }
                b':' => self.colon = true,
                _ => {}
            }
            if b != b'\r' {
                self.line_len += 1;
            }
        }
        Scan::Partial
    }
}

/// What to do with a complete head.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Pass it on; the body (if any) is framed like this.
    Pass(Frame),
    Reject(Reason),
    /// hyper refuses this head itself and closes the connection.
    StepAside,
}

/// Parses a complete head (as hyper will, with httparse) and checks its framing headers.
fn check_head(head: &[u8], lines: usize) -> Verdict {
    // Enough slots for every line, so the result does not depend on hyper's `max_headers`
    // (hyper answers 431 itself when there are too many).
    let mut stack = [httparse::EMPTY_HEADER; 64];
    let mut heap = Vec::new();
    let slots: &mut [httparse::Header<'_>] = if lines <= stack.len() {
        &mut stack
    } else {
        heap.resize(lines, httparse::EMPTY_HEADER);
        &mut heap
    };
    let mut req = httparse::Request::new(slots);
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        // The scan and httparse disagree on where the head ends: fail closed.
        Ok(_) => return Verdict::Reject(Reason::BadHeader),
        Err(
            httparse::Error::HeaderName
            | httparse::Error::HeaderValue
            | httparse::Error::TooManyHeaders,
        ) => return Verdict::Reject(Reason::BadHeader),
        // A bad method, target or version: hyper answers 400 or 505 itself and closes.
        Err(_) => return Verdict::StepAside,
    }

    let mut cl_fields = 0usize;
    let mut cl: Option<u64> = None;
    let mut cl_list = false;
    let mut cl_bad = false;
    let mut te_fields = 0usize;
    let mut te_chunked = true;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            cl_fields += 1;
            match parse_cl(h.value) {
                Some(n) => cl = Some(n),
                // `Content-Length: 5, 5` is a list of lengths, i.e. duplicates in one field.
                None if h.value.contains(&b',') => cl_list = true,
                None => cl_bad = true,
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te_fields += 1;
            te_chunked &= h.value.trim_ascii().eq_ignore_ascii_case(b"chunked");
        }
    }
    // RFC 9112 §6.1: a message with both "ought to be handled as an error"; §6.3 rule 3. hyper
    // drops the Content-Length and reads chunked; a peer that frames by Content-Length reads
    // something else.
    if te_fields > 0 && cl_fields > 0 {
        return Verdict::Reject(Reason::TeAndCl);
    }
    // RFC 9112 §6.3 rule 5 / RFC 9110 §8.6: repeated lengths are tolerated only when equal, a
    // leniency parsers apply differently (first, last, reject); refuse them all.
    if cl_fields > 1 || cl_list {
        return Verdict::Reject(Reason::DuplicateCl);
    }
    // RFC 9112 §6.1/§6.3 rule 4: only a final `chunked` frames a request. hyper accepts any list
    // ending in chunked (`chunked, chunked`, `gzip, chunked`) and several fields; cbgate does
    // not decode other codings, and a peer may read the list differently. One exact `chunked`.
    if te_fields > 1 || (te_fields == 1 && !te_chunked) {
        return Verdict::Reject(Reason::BadTe);
    }
    // RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing.
    if te_fields == 1 && req.version == Some(0) {
        return Verdict::Reject(Reason::TeHttp10);
    }
    // RFC 9110 §8.6: `Content-Length = 1*DIGIT`; signs, spaces inside, hex are each read
    // differently by some parser.
    if cl_bad {
        return Verdict::Reject(Reason::BadCl);
    }
    Verdict::Pass(match (te_fields, cl) {
        (1, _) => Frame::Chunked(Chunk::Start, 0),
        (_, Some(n)) if n > 0 => Frame::Length(n),
        // RFC 9112 §6.3 rule 7: a request without either has no body.
        _ => Frame::Head,
    })
}

/// `1*DIGIT` (httparse has already trimmed surrounding whitespace), without overflow.
fn parse_cl(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// The state machine without IO: bytes go in, checked bytes come out.
#[derive(Debug)]
struct Sniffer {
    /// Bytes read from the client and not yet handed on: `buf[out..ok]` are checked and
    /// waiting, `buf[ok..end]` is a head being collected. `buf.len()` is only the initialized
    /// high-water mark; the buffer is reused and never shrinks.
    buf: Vec<u8>,
    out: usize,
    ok: usize,
    end: usize,
    frame: Frame,
    scan: HeadScan,
    /// No head has been passed on yet (the HTTP/2 preface is only possible here).
    first: bool,
}

impl Sniffer {
    fn new() -> Sniffer {
        Sniffer {
            buf: Vec::new(),
            out: 0,
            ok: 0,
            end: 0,
            frame: Frame::Head,
            scan: HeadScan::default(),
            first: true,
        }
    }

    /// Checked bytes waiting to be handed on.
    fn ready(&self) -> &[u8] {
        &self.buf[self.out..self.ok]
    }

    /// `n` bytes of [`Sniffer::ready`] were handed on.
    fn consume(&mut self, n: usize) {
        self.out += n;
        if self.out == self.ok {
            // Move the partial head (usually nothing) to the front so the buffer is reused.
            self.buf.copy_within(self.ok..self.end, 0);
            self.end -= self.ok;
            self.out = 0;
            self.ok = 0;
        }
    }

    /// Room for the next read from the client, at `buf[end..]`.
    fn space(&mut self) -> &mut [u8] {
        let want = self.end + READ_CHUNK;
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        &mut self.buf[self.end..want]
    }

    /// `n` bytes were read into [`Sniffer::space`].
    fn filled(&mut self, n: usize) {
        self.end += n;
        self.process();
    }

    /// Appends bytes read elsewhere (the tail of a direct body read) and processes them.
    fn push(&mut self, data: &[u8]) {
        self.append(data);
        self.process();
    }

    fn append(&mut self, data: &[u8]) {
        let want = self.end + data.len();
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        self.buf[self.end..want].copy_from_slice(data);
        self.end = want;
    }

    /// The client closed its side in the middle of a head: drop the partial head (hyper would
    /// only report an incomplete message).
    fn eof(&mut self) {
        self.end = self.ok;
    }

    /// Classifies the unchecked bytes `buf[ok..end]` as far as possible.
    fn process(&mut self) {
        loop {
            match self.frame {
                Frame::Rejected | Frame::TlsHello => {
                    self.end = self.ok;
                    return;
                }
                Frame::Passthrough => {
                    self.ok = self.end;
                    return;
                }
                Frame::Length(_) | Frame::Chunked(..) => {
                    self.ok += self.frame.advance(&self.buf[self.ok..self.end]);
                    if self.ok == self.end {
                        return;
                    }
                    self.scan = HeadScan::default();
                }
                Frame::Head => {
                    let head = &self.buf[self.ok..self.end];
                    // A TLS record of type handshake (22) with major version 3: a ClientHello
                    // (RFC 8446 §5.1). No HTTP method starts with byte 22.
                    if self.first && head.first() == Some(&TLS_HANDSHAKE) {
                        match head.get(1) {
                            Some(&3) => {
                                self.frame = Frame::TlsHello;
                                self.end = self.ok;
                                return;
                            }
                            None => return,
                            Some(_) => {}
                        }
                    }
                    if self.first {
                        let n = head.len().min(H2_PREFACE_LINE.len());
                        if head[..n] == H2_PREFACE_LINE[..n] {
                            if n == H2_PREFACE_LINE.len() {
                                self.step_aside();
                            }
                            // Otherwise wait: it may still be the preface.
                            return;
                        }
                    }
                    match self.scan.scan(head) {
                        // Too long: no empty line within the first MAX_HEAD bytes, so hyper's
                        // buffer fills without a complete head and it answers 431 (see MAX_HEAD).
                        Scan::Partial if head.len() > MAX_HEAD => {
                            self.step_aside();
                            return;
                        }
                        Scan::Partial => return,
                        Scan::Complete(n) if n > MAX_HEAD => {
                            self.step_aside();
                            return;
                        }
                        Scan::Complete(n) => match check_head(&head[..n], self.scan.lines) {
                            Verdict::Pass(frame) => {
                                self.ok += n;
                                self.frame = frame;
                                self.first = false;
                                self.scan = HeadScan::default();
                            }
                            Verdict::Reject(r) => {
                                self.reject(r);
                                return;
                            }
                            Verdict::StepAside => {
                                self.step_aside();
                                return;
                            }
                        },
                        Scan::Reject(r) => {
                            self.reject(r);
                            return;
                        }
                        Scan::NotHttp => {
                            self.step_aside();
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Replaces the offending head, and everything after it, by the synthetic request.
    fn reject(&mut self, reason: Reason) {
        self.end = self.ok;
        self.append(b"GET ");
        self.append(MARKER.as_bytes());
        self.append(reason.slug().as_bytes());
        self.append(b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        self.ok = self.end;
        self.frame = Frame::Rejected;
        self.first = false;
    }

    fn step_aside(&mut self) {
        self.ok = self.end;
        self.frame = Frame::Passthrough;
        self.first = false;
    }

    /// Nothing is buffered and the stream is in a body or passed through: the next read can
    /// go straight into the caller's buffer.
    fn direct(&self) -> bool {
        matches!(
            self.frame,
            Frame::Length(_) | Frame::Chunked(..) | Frame::Passthrough
        ) && self.out == self.end
    }
}

/// Lingering close after a refusal.
#[derive(Debug)]
struct Linger {
    shut: bool,
    timer: Pin<Box<Sleep>>,
}

/// A transparent wrapper around a client connection that refuses HTTP/1 request-smuggling
/// shapes before hyper parses them; see the [module documentation](self).
///
/// Writes go to the inner stream unchanged. Reads return exactly the client's bytes, except
/// that a refused request head (and everything after it) is replaced by a synthetic request for
/// `/.cbgate-rejected/<reason>`, after which reads stay pending while the client's further
/// bytes are discarded.
#[derive(Debug)]
pub struct SmuggleGuard<I> {
    io: I,
    sniff: Sniffer,
    linger: Option<Linger>,
    /// Bytes discarded after a refusal.
    discarded: usize,
}

impl<I> SmuggleGuard<I> {
    /// Wraps a freshly accepted client stream.
    pub fn new(io: I) -> SmuggleGuard<I> {
        SmuggleGuard {
            io,
            sniff: Sniffer::new(),
            linger: None,
            discarded: 0,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// Reads and drops what the client sends after a refused head, so that closing the
    /// socket later does not turn into a reset that destroys the 400. Ready once the client has
    /// closed its side or [`LINGER_BYTES`] have been dropped: nothing more to wait for.
    fn poll_discard(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>
    where
        I: AsyncRead + Unpin,
    {
        let mut scratch = [0u8; 4096];
        while self.discarded < LINGER_BYTES {
            let mut rb = ReadBuf::new(&mut scratch);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                break;
            }
            self.discarded += rb.filled().len();
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for SmuggleGuard<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let ready = this.sniff.ready();
            if !ready.is_empty() {
                let n = ready.len().min(buf.remaining());
                buf.put_slice(&ready[..n]);
                this.sniff.consume(n);
                return Poll::Ready(Ok(()));
            }
            match this.sniff.frame {
                Frame::TlsHello => {
                    tracing::warn!("{TLS_ON_PLAIN}; connection closed");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        TLS_ON_PLAIN,
                    )));
                }
                // hyper only needs the synthetic request (it has `Connection: close`). The read
                // side is never reported closed: hyper takes end of stream during a request for
                // the client giving up and drops the response, the 400. So the read stays
                // pending, draining what the client still sends, until hyper shuts down.
                Frame::Rejected => {
                    ready!(this.poll_discard(cx))?;
                    return Poll::Pending;
                }
                _ if this.sniff.direct() => {
                    let before = buf.filled().len();
                    ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
                    let got = &buf.filled()[before..];
                    if got.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    let used = this.sniff.frame.advance(got);
                    if used < got.len() {
                        // The body ended inside this read: the rest is the next head, held
                        // back until it has been checked.
                        this.sniff.push(&got[used..]);
                        buf.set_filled(before + used);
                    }
                    if used > 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                _ => {
                    let mut space = ReadBuf::new(this.sniff.space());
                    match Pin::new(&mut this.io).poll_read(cx, &mut space) {
                        // The connection task's timer bounds the wait for the first request
                        // (`header_read_timeout`), hyper's own timer later heads.
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(())) => {
                            let n = space.filled().len();
                            if n == 0 {
                                this.sniff.eof();
                                return Poll::Ready(Ok(()));
                            }
                            this.sniff.filled(n);
                        }
                    }
                }
            }
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for SmuggleGuard<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.sniff.frame != Frame::Rejected {
            return Pin::new(&mut this.io).poll_shutdown(cx);
        }
        // After a refusal the client's unread input is discarded before the socket is closed,
        // so that the 400 is not destroyed by a reset.
        let linger = this.linger.get_or_insert_with(|| Linger {
            shut: false,
            timer: Box::pin(tokio::time::sleep(LINGER_TIME)),
        });
        if !linger.shut {
            ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            linger.shut = true;
        }
        if linger.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        // Until the client closes, the byte budget is spent or the timer fires. A read error
        // ends the linger too: there is nothing left to protect.
        match this.poll_discard(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::task::Waker;

    /// A reader that yields the given pieces, one per read (a piece larger than the caller's
    /// buffer is split), with a `Pending` before every piece, then end of stream.
    struct Pieces {
        parts: VecDeque<Vec<u8>>,
        pend: bool,
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.pend {
                self.pend = false;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.pend = true;
            if let Some(mut part) = self.parts.pop_front() {
                let n = part.len().min(buf.remaining());
                buf.put_slice(&part[..n]);
                if n < part.len() {
                    self.parts.push_front(part.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Pieces {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Runs `parts` through a guard, reading with a caller buffer of `cap` bytes, and returns
    /// what hyper would see.
    fn run(parts: Vec<Vec<u8>>, cap: usize) -> Vec<u8> {
        let mut guard = SmuggleGuard::new(Pieces {
            parts: parts.into(),
            pend: false,
        });
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = Vec::new();
        let mut scratch = vec![0u8; cap];
        loop {
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut guard).poll_read(&mut cx, &mut rb) {
                // After a refusal the guard stays pending for good (see poll_read).
                Poll::Pending
                    if guard.sniff.frame == Frame::Rejected && guard.io.parts.is_empty() =>
                {
                    return out
                }
                Poll::Pending => continue,
                Poll::Ready(Err(e)) => panic!("read error: {e}"),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return out,
                Poll::Ready(Ok(())) => out.extend_from_slice(rb.filled()),
            }
        }
    }

    /// Every way of splitting `input` in two and in three, plus byte by byte, with small and
    /// large reader buffers.
    fn splits(input: &[u8]) -> Vec<(String, Vec<Vec<u8>>, usize)> {
        let mut v = vec![
            ("whole".to_owned(), vec![input.to_vec()], 8192),
            ("whole, 1-byte reads".to_owned(), vec![input.to_vec()], 1),
            (
                "1-byte pieces".to_owned(),
                input.iter().map(|b| vec![*b]).collect(),
                8192,
            ),
        ];
        for i in 1..input.len() {
            v.push((
                format!("split at {i}"),
                vec![input[..i].to_vec(), input[i..].to_vec()],
                8192,
            ));
            v.push((
                format!("split at {i}, 7-byte reads"),
                vec![input[..i].to_vec(), input[i..].to_vec()],
                7,
            ));
        }
        let step = (input.len() / 12).max(1);
        for i in (1..input.len()).step_by(step) {
            for j in (i + 1..input.len()).step_by(step) {
                v.push((
                    format!("split at {i} and {j}"),
                    vec![
                        input[..i].to_vec(),
                        input[i..j].to_vec(),
                        input[j..].to_vec(),
                    ],
                    8192,
                ));
            }
        }
        v
    }

    fn assert_unchanged(input: &[u8]) {
        for (name, parts, cap) in splits(input) {
            let out = run(parts, cap);
            assert!(
                out == input,
                "{name}: stream changed\n in: {:?}\nout: {:?}",
                String::from_utf8_lossy(input),
                String::from_utf8_lossy(&out)
            );
        }
    }

    fn synthetic(slug: &str) -> Vec<u8> {
        format!(
            "GET /.cbgate-rejected/{slug} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .into_bytes()
    }

    /// `prefix` passes unchanged, then the rest becomes the synthetic request for `slug`.
    fn assert_rejected_after(prefix: &[u8], bad: &[u8], slug: &str) {
        let input = [prefix, bad].concat();
        let want = [prefix, &synthetic(slug)[..]].concat();
        for (name, parts, cap) in splits(&input) {
            let out = run(parts, cap);
            assert!(
                out == want,
                "{name}: want the {slug} refusal\n in: {:?}\nout: {:?}",
                String::from_utf8_lossy(&input),
                String::from_utf8_lossy(&out)
            );
        }
        assert!(rejected(&format!("/.cbgate-rejected/{slug}")).is_some());
    }

    fn assert_rejected(bad: &[u8], slug: &str) {
        assert_rejected_after(b"", bad, slug);
    }

    const GET: &[u8] = b"GET /api/v3/brokerage/accounts HTTP/1.1\r\nHost: localhost\r\n\r\n";
    /// A Content-Length body that contains an empty line and a request line.
    const POST_CL: &[u8] = b"POST /api/v3/brokerage/orders HTTP/1.1\r\nHost: localhost\r\nContent-Length: 25\r\n\r\n{\"a\":1,\"b\":\"\r\n\r\nGET / x\"}";
    /// Chunks with an extension and a size with trailing whitespace, data that looks like
    /// framing, and a trailer field.
    const POST_CHUNKED: &[u8] = b"POST /api/v3/brokerage/orders HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=\"x\"\r\nhello\r\nA \r\n\r\n\r\nGET / \r\n0\r\nX-Trailer: 1\r\n\r\n";

    #[test]
    fn valid_pipelined_requests_pass_byte_identical() {
        assert_unchanged(GET);
        assert_unchanged(POST_CL);
        assert_unchanged(POST_CHUNKED);
        let all = [GET, POST_CL, POST_CHUNKED, GET, POST_CHUNKED, POST_CL].concat();
        assert_unchanged(&all);
        // Leading empty lines before a request line are skipped, as by httparse.
        assert_unchanged(&[GET, b"\r\n", GET].concat());
        // HTTP/1.0, Content-Length: 0, upper-case chunked, an empty trailer section.
        assert_unchanged(
            b"POST /a HTTP/1.0\r\nContent-Length: 0\r\n\r\nPOST /b HTTP/1.1\r\nTransfer-Encoding:  CHUNKED \r\n\r\n0\r\n\r\n",
        );
    }

    #[test]
    fn bodies_are_not_inspected_as_heads() {
        // Body bytes that look like a smuggled request are only counted.
        let body = b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
        let head = format!("POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len());
        assert_unchanged(&[head.as_bytes(), body, GET].concat());
    }

    #[test]
    fn smuggling_shapes_become_the_synthetic_request() {
        let cases: &[(&[u8], &str)] = &[
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "te-and-cl"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", "te-and-cl"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\ncontent-length: 0\r\n\r\n0\r\n\r\n", "te-and-cl"),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", "duplicate-cl"),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", "duplicate-cl"),
            (b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc", "duplicate-cl"),
            (b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello", "bad-cl"),
            (b"POST / HTTP/1.1\r\nContent-Length: 1 0\r\n\r\n0123456789", "bad-cl"),
            (b"POST / HTTP/1.1\r\nContent-Length: 0x5\r\n\r\nhello", "bad-cl"),
            (b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", "bad-cl"),
            (b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", "bad-cl"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", "bad-te"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", "bad-te"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "bad-te"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", "bad-te"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "bad-te"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "bad-te"),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "te-http10"),
            (b"GET / HTTP/1.1\r\nX-A: 1\r\n  continued\r\n\r\n", "obs-fold"),
            (b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", "obs-fold"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", "ws-before-colon"),
            (b"POST / HTTP/1.1\r\nContent-Length\t: 1\r\n\r\nx", "ws-before-colon"),
            (b"GET / HTTP/1.1\r\nX-A: 1\x002\r\n\r\n", "nul"),
            (b"GET / HTTP/1.1\nHost: a\n\n", "bare-lf"),
            (b"GET / HTTP/1.1\r\nX: a\nTransfer-Encoding: chunked\r\n\r\n", "bare-lf"),
            (b"GET / HTTP/1.1\r\nX: a\rTransfer-Encoding: chunked\r\n\r\n", "bare-cr"),
            (b"GET / HTTP/1.1\r\nX-A: 1\x0b\r\n\r\n", "bad-header"),
            (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", "bad-header"),
            (b"GET / HTTP/1.1\r\n: empty-name\r\n\r\n", "bad-header"),
        ];
        for (bad, slug) in cases {
            assert_rejected(bad, slug);
            // After a valid request (whose response comes first) and after bodies of each kind.
            assert_rejected_after(GET, bad, slug);
            assert_rejected_after(&[POST_CL, POST_CHUNKED].concat(), bad, slug);
        }
    }

    #[test]
    fn oversized_heads_are_left_to_hyper() {
        // Past MAX_HEAD the guard steps aside (hyper's buffer is no larger: it answers 431),
        // whether or not the head ever ends.
        let mut head = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        head.resize(MAX_HEAD + 10, b'a');
        assert_eq!(run(vec![head.clone()], 8192), head);
        head.extend_from_slice(b"\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx");
        assert_eq!(run(vec![head.clone()], 8192), head);
        // Up to the limit it is checked.
        let mut bad =
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\nX-Big: ".to_vec();
        bad.resize(MAX_HEAD - 4, b'a');
        bad.extend_from_slice(b"\r\n\r\nx");
        assert_eq!(run(vec![bad], 8192), synthetic("duplicate-cl"));
    }

    #[test]
    fn many_headers_are_parsed_whatever_their_number() {
        // More header lines than the stack slots: the heap path, and still checked.
        let mut head = b"POST / HTTP/1.1\r\n".to_vec();
        for i in 0..150 {
            head.extend_from_slice(format!("X-{i}: {i}\r\n").as_bytes());
        }
        let mut bad = head.clone();
        bad.extend_from_slice(b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nx");
        assert_eq!(run(vec![bad], 8192), synthetic("duplicate-cl"));
        head.extend_from_slice(b"\r\n");
        assert_eq!(run(vec![head.clone()], 8192), head);
    }

    #[test]
    fn non_http_bytes_step_aside() {
        // The HTTP/2 preface at the start of a connection, then frames: untouched.
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00";
        assert_unchanged(h2);
        // After a 101, masked WebSocket frames: a text frame and a compressed fragment ('A').
        let ws_get =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        assert_unchanged(&[&ws_get[..], b"\x81\x85abcd\x09\x07\x0f\x08\x0e"].concat());
        assert_unchanged(&[&ws_get[..], b"A\x82abcdxy"].concat());
        // A request line hyper refuses itself (bad version): stepped aside, hyper answers.
        assert_unchanged(b"GET / HTTP/9.9\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n");
        // Malformed chunk framing: hyper fails the body and closes; the guard steps aside.
        assert_unchanged(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        );
    }

    #[test]
    fn upgrade_requests_stay_guarded() {
        // A non-101 answer keeps the connection in HTTP/1, so an Upgrade head must not switch
        // the guard off: the next head is still checked.
        let ws_get =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        assert_rejected_after(
            ws_get,
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "te-and-cl",
        );
    }

    #[test]
    fn prefix_of_the_preface_is_held_until_decided() {
        // "PRI" could begin the preface; "PRIX" cannot, and is an ordinary (odd) method.
        assert_unchanged(b"PRIX / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_rejected(
            b"PRI / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            "duplicate-cl",
        );
    }

    #[test]
    fn rejected_maps_only_marker_paths() {
        for r in Reason::ALL {
            let path = format!("{MARKER}{}", r.slug());
            assert_eq!(rejected(&path), Some(r.sentence()));
        }
        assert_eq!(rejected("/.cbgate-rejected/other"), None);
        assert_eq!(rejected("/api/v3/brokerage/accounts"), None);
        assert!(rejected("/.cbgate-rejected/te-and-cl")
            .is_some_and(|s| s.contains("both Transfer-Encoding and Content-Length")));
    }

    #[test]
    fn chunk_framing_matches_hyper() {
        // Size with trailing whitespace and extensions, upper-case hex, trailers.
        let mut f = Frame::Chunked(Chunk::Start, 0);
        let body = b"1A \t;a=b;c\r\n01234567890123456789012345\r\n0\r\nA: b\r\nC: d\r\n\r\n";
        assert_eq!(f.advance(body), body.len());
        assert_eq!(f, Frame::Head);
        for bad in [
            &b"\r\n"[..],
            b"g\r\n",
            b"5\n",
            b"5 5\r\n",
            b"5;a\nb\r\n",
            b"1\r\nxx",
            b"0\r\n\r\r",
            b"0\r\nA: b\rx",
            b"11111111111111111\r\n",
        ] {
            let mut f = Frame::Chunked(Chunk::Start, 0);
            f.advance(bad);
            assert_eq!(f, Frame::Passthrough, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
