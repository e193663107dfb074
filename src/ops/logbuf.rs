//! Log lines handed to a writer thread in batches, without a wake-up per line.
//!
//! A request thread appends its formatted line to a shared buffer under a short lock. The
//! writer thread is woken only when the buffer goes from empty to non-empty (then it collects
//! for [`BATCH_WINDOW`] before writing) or grows past [`WAKE_BYTES`]; at one line per request
//! that is at most a few wake-ups per second instead of one per request. Nothing is dropped:
//! past [`MAX_BYTES`] queued, the thread that logs writes the queue out itself (back-pressure,
//! as a full blocking channel would). [`Guard`] writes out what is left when dropped.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the writer collects lines after the first one arrives.
pub const BATCH_WINDOW: Duration = Duration::from_millis(25);
/// Queued bytes that wake the writer before the window ends.
pub const WAKE_BYTES: usize = 64 * 1024;
/// Queued bytes past which a logging thread writes the queue out itself.
pub const MAX_BYTES: usize = 1024 * 1024;

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    out: Mutex<Box<dyn Write + Send>>,
}

#[derive(Default)]
struct Queue {
    bytes: Vec<u8>,
    stop: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves bytes, not a broken invariant.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Takes the queued bytes and writes them out. The output is locked before the queue is
    /// let go (every writer takes the two in this order), so no later batch overtakes them.
    fn write_queued(&self, mut q: MutexGuard<'_, Queue>) {
        let bytes = std::mem::take(&mut q.bytes);
        if bytes.is_empty() {
            return;
        }
        let mut out = lock(&self.out);
        drop(q);
        // Errors (a closed stderr) cannot be reported anywhere.
        let _ = out.write_all(&bytes);
        let _ = out.flush();
    }
}

/// The `MakeWriter` for `tracing_subscriber::fmt`: each event's line is appended whole.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Keeps the writer thread; dropping it writes out every queued line and ends the thread.
pub struct Guard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread over `out`.
pub fn start(out: Box<dyn Write + Send>, thread_name: &str) -> io::Result<(BatchWriter, Guard)> {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        wake: Condvar::new(),
        out: Mutex::new(out),
    });
    let worker = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name(thread_name.to_owned())
        .spawn(move || run(&worker))?;
    Ok((
        BatchWriter {
            shared: Arc::clone(&shared),
        },
        Guard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn run(shared: &Shared) {
    loop {
        let mut q = lock(&shared.queue);
        while q.bytes.is_empty() && !q.stop {
            q = shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        if !q.stop && q.bytes.len() < WAKE_BYTES {
            // Collect the lines that follow the first one; woken early past WAKE_BYTES or at stop.
            q = shared
                .wake
                .wait_timeout(q, BATCH_WINDOW)
                .map_or_else(|p| p.into_inner().0, |(g, _)| g);
        }
        let stop = q.stop;
        shared.write_queued(q);
        if stop {
            // Lines queued after the last take are written by Guard::drop.
            return;
        }
    }
}

impl Write for BatchWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut q = lock(&self.shared.queue);
        let was_empty = q.bytes.is_empty();
        q.bytes.extend_from_slice(buf);
        let len = q.bytes.len();
        if len > MAX_BYTES || q.stop {
            // Back-pressure: the writer is behind (or gone); write the queue out here.
            self.shared.write_queued(q);
            return Ok(buf.len());
        }
        drop(q);
        if was_empty || len >= WAKE_BYTES {
            self.shared.wake.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        lock(&self.shared.queue).stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.shared.write_queued(lock(&self.shared.queue));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output the test can read back; `slow` makes each write take 300 ms (a stalled stderr).
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>, bool);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.1 {
                std::thread::sleep(Duration::from_millis(300));
            }
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn lines(n: usize, width: usize) -> Vec<String> {
        (0..n).map(|i| format!("{i:0width$}\n")).collect()
    }

    #[test]
    fn every_line_arrives_whole_and_in_order_when_the_output_stalls() {
        // A slow output lets the queue pass MAX_BYTES, so the back-pressure path runs too.
        let sink = Sink(Arc::default(), true);
        let (writer, guard) = start(Box::new(sink.clone()), "test-log").expect("thread");
        let want = lines(400_000, 12);
        for l in &want {
            let mut w = writer.clone();
            w.write_all(l.as_bytes()).expect("write");
        }
        drop(guard);
        let got = String::from_utf8(lock(&sink.0).clone()).expect("utf8");
        assert_eq!(got, want.concat());
    }

    #[test]
    fn lines_from_threads_are_not_interleaved() {
        let sink = Sink::default();
        let (writer, guard) = start(Box::new(sink.clone()), "test-log").expect("thread");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        let mut w = w.clone();
                        let line = format!("t{t} line {i:06} end\n");
                        w.write_all(line.as_bytes()).expect("write");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("join");
        }
        drop(guard);
        let got = String::from_utf8(lock(&sink.0).clone()).expect("utf8");
        let mut seen = [0usize; 4];
        for line in got.lines() {
            let t: usize = line[1..2].parse().expect("thread digit");
            // Each thread's lines arrive whole and in its order.
            assert_eq!(line, format!("t{t} line {:06} end", seen[t]));
            seen[t] += 1;
        }
        assert_eq!(seen, [20_000; 4]);
    }
}
