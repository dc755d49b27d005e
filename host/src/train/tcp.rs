//! Ranks as processes talking TCP: [`TcpRank`], a [`Collective`] with rank 0 the hub at
//! `MASTER_ADDR:MASTER_PORT` and every other rank connected to it.
//!
//! Each collective call is a round: every other rank sends its part to the hub, the hub combines the parts
//! in rank order (the thread ranks' [`combine`], so a run on N processes gives the thread ranks' bits) and
//! sends the outcome back. It carries whole CPU runs (`lorahost run --procs N`: the test vehicle for the
//! process spawner, the launcher's environment and the failure path), and under NCCL the rendezvous (the
//! unique id is a broadcast), the small calls and the failure channel.
//!
//! Failure: a rank that fails sends its reason to the hub, which relays it to all; a rank that dies closes
//! its connection, which the hub sees at once (its reader thread) and relays as `rank K died`; when the hub
//! dies, the others see their connection close. A rank that neither arrives nor fails is named after the
//! timeout. A rank whose run ended well says goodbye first, so that its closing is not taken for a death.
use super::dist::{self, combine, Collective, Failure, Payload};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Says "a lorahost rank, this protocol" first on every connection.
const HELLO_MAGIC: &[u8; 16] = b"lorahost-ranks/1";
/// A frame larger than this is a stranger or a bug, not a rank (the token stream of a large mix is ~1 GB).
const MAX_FRAME: u64 = 1 << 40;

/// What travels on a connection: a tag, the body's length, the body.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(u8)]
enum Tag {
    /// Rank -> hub: HELLO_MAGIC, rank (u32), world (u32).
    Hello = 1,
    /// Hub -> rank: every rank has joined.
    Welcome = 2,
    /// Rank -> hub: this rank's part of a round (an encoded [`Payload`]).
    Part = 3,
    /// Hub -> rank: the round's outcome.
    Outcome = 4,
    /// Either way: a rank failed (rank u32, reason).
    Failed = 5,
    /// Either way: this side's run ended well.
    Bye = 6,
}

impl Tag {
    fn of(b: u8) -> Option<Tag> {
        [Tag::Hello, Tag::Welcome, Tag::Part, Tag::Outcome, Tag::Failed, Tag::Bye].into_iter().find(|t| *t as u8 == b)
    }
}

fn write_frame(w: &mut impl Write, tag: Tag, body: &[u8]) -> std::io::Result<()> {
    w.write_all(&[tag as u8])?;
    w.write_all(&(body.len() as u64).to_le_bytes())?;
    w.write_all(body)?;
    w.flush()
}

fn read_frame(r: &mut impl Read) -> Result<(Tag, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head)?;
    let tag = Tag::of(head[0]).with_context(|| format!("unknown frame tag {} (not a lorahost rank?)", head[0]))?;
    let len = u64::from_le_bytes(head[1..].try_into().expect("8 bytes"));
    if len > MAX_FRAME {
        bail!("a frame of {len} bytes (not a lorahost rank?)");
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    Ok((tag, body))
}

fn failure_body(f: &Failure) -> Vec<u8> {
    let mut b = (f.rank as u32).to_le_bytes().to_vec();
    b.extend_from_slice(f.reason.as_bytes());
    b
}

fn parse_failure(body: &[u8]) -> Failure {
    let rank = body.get(..4).map_or(0, |r| u32::from_le_bytes(r.try_into().expect("4 bytes")) as usize);
    Failure { rank, reason: String::from_utf8_lossy(body.get(4..).unwrap_or_default()).into_owned() }
}

// ---------------------------------------------------------------------------------------------------------
// Payloads on the wire.

fn encode(p: &Payload) -> Vec<u8> {
    let mut out = Vec::new();
    let u64s = |out: &mut Vec<u8>, v: u64| out.extend_from_slice(&v.to_le_bytes());
    match p {
        Payload::F32(tensors) => {
            out.push(0);
            u64s(&mut out, tensors.len() as u64);
            for (dims, data) in tensors {
                u64s(&mut out, dims.len() as u64);
                dims.iter().for_each(|d| u64s(&mut out, *d as u64));
                u64s(&mut out, data.len() as u64);
                out.reserve(data.len() * 4);
                data.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
            }
        }
        Payload::F64(values) => {
            out.push(1);
            u64s(&mut out, values.len() as u64);
            values.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        Payload::Bytes(data) => {
            out.push(2);
            if let Some(d) = data {
                out.push(1);
                out.extend_from_slice(d);
            } else {
                out.push(0);
            }
        }
        Payload::Nothing => out.push(3),
    }
    out
}

/// Reads what [`encode`] wrote; a short or odd body is an error, never a panic or a huge allocation.
fn decode(body: &[u8]) -> Result<Payload> {
    struct Cur<'a>(&'a [u8]);
    impl<'a> Cur<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8]> {
            if self.0.len() < n {
                bail!("a payload cut short");
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Ok(a)
        }
        fn u64(&mut self) -> Result<u64> {
            Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
        }
        /// A count of items of `size` bytes each that the rest of the body can hold.
        fn count(&mut self, size: usize) -> Result<usize> {
            let n = self.u64()?;
            if n.saturating_mul(size as u64) > self.0.len() as u64 {
                bail!("a payload claims {n} items, more than it holds");
            }
            Ok(n as usize)
        }
    }
    let mut c = Cur(body);
    let p = match c.take(1)?[0] {
        0 => {
            let n = c.count(16)?;
            let mut tensors = Vec::with_capacity(n);
            for _ in 0..n {
                let nd = c.count(8)?;
                let dims = (0..nd).map(|_| c.u64().map(|d| d as usize)).collect::<Result<Vec<_>>>()?;
                let len = c.count(4)?;
                let data = c.take(len * 4)?.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
                tensors.push((dims, data));
            }
            Payload::F32(tensors)
        }
        1 => {
            let n = c.count(8)?;
            Payload::F64(c.take(n * 8)?.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))).collect())
        }
        2 => match c.take(1)?[0] {
            0 => Payload::Bytes(None),
            _ => Payload::Bytes(Some(std::mem::take(&mut c.0).to_vec())),
        },
        3 => Payload::Nothing,
        k => bail!("unknown payload kind {k}"),
    };
    if !c.0.is_empty() {
        bail!("{} bytes after a payload", c.0.len());
    }
    Ok(p)
}

// ---------------------------------------------------------------------------------------------------------
// The group.

/// What the reader threads hand the rank's own thread.
enum Inbox {
    /// A part (on the hub, from that rank) or an outcome (on the others, from rank 0).
    Frame(usize, Vec<u8>),
    /// The group failed (see [`Shared::failed`]).
    Failed,
}

struct Shared {
    rank: usize,
    world: usize,
    /// The writing half of each connection, by the rank at its other end: on the hub every other rank,
    /// elsewhere rank 0 alone.
    peers: Vec<Option<Mutex<BufWriter<TcpStream>>>>,
    failed: Mutex<Option<Failure>>,
    /// This rank's run ended (well or not): connections closing now are no news.
    ended: AtomicBool,
    inbox: Mutex<Sender<Inbox>>,
}

impl Shared {
    fn send(&self, to: usize, tag: Tag, body: &[u8]) -> std::io::Result<()> {
        let Some(peer) = &self.peers[to] else { return Ok(()) };
        let mut w = peer.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut *w, tag, body)
    }

    /// Records the group's first failure and tells the others: the hub relays to every rank, another rank
    /// reports its own to the hub. Later failures (mostly consequences of the first) are dropped.
    fn fail(&self, f: Failure) {
        {
            let mut g = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            if g.is_some() {
                return;
            }
            *g = Some(f.clone());
        }
        let body = failure_body(&f);
        if self.rank == 0 {
            (1..self.world).filter(|&r| r != f.rank).for_each(|r| drop(self.send(r, Tag::Failed, &body)));
        } else if f.rank == self.rank {
            let _ = self.send(0, Tag::Failed, &body);
        }
        let _ = self.inbox.lock().unwrap_or_else(|p| p.into_inner()).send(Inbox::Failed);
    }

    fn failure(&self) -> Option<Failure> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One process's rank in a TCP group.
pub struct TcpRank {
    shared: Arc<Shared>,
    inbox: Mutex<Receiver<Inbox>>,
    timeout: Duration,
}

impl TcpRank {
    /// Joins the group of `world` ranks whose hub is at `master` (`host:port`) as `rank`: rank 0 listens
    /// there, the others connect (retrying: the hub may start later). Returns when every rank has joined;
    /// gives up after `timeout`, naming the ranks that did not come.
    pub fn connect(rank: usize, world: usize, master: &str, timeout: Duration) -> Result<TcpRank> {
        if rank >= world {
            bail!("rank {rank} is not below the world size {world}");
        }
        let timeout = timeout.max(Duration::from_millis(1)); // socket timeouts refuse zero
        let deadline = Instant::now() + timeout;
        let (tx, rx) = mpsc::channel();
        let mut peers: Vec<Option<Mutex<BufWriter<TcpStream>>>> = (0..world).map(|_| None).collect();
        let mut readers = Vec::new();
        if rank == 0 {
            let port = master.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).with_context(|| format!("`{master}` has no port"))?;
            // Every interface: the other hosts reach rank 0 at MASTER_ADDR, whichever interface that is.
            let listener = TcpListener::bind(("0.0.0.0", port))
                .with_context(|| format!("rank 0: cannot listen on port {port} (MASTER_PORT) for the other ranks (in use?)"))?;
            listener.set_nonblocking(true)?;
            while peers.iter().skip(1).any(Option::is_none) {
                let (stream, from) = match listener.accept() {
                    Ok(s) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            let missing: Vec<String> = (1..world).filter(|&r| peers[r].is_none()).map(|r| r.to_string()).collect();
                            bail!("rank 0 of {world}: rank(s) {} did not join at {master} within {timeout:?}", missing.join(", "));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    Err(e) => return Err(e).context("rank 0: accepting the other ranks"),
                };
                stream.set_nonblocking(false)?;
                match hello_from(&stream, world, &peers) {
                    Ok(r) => {
                        readers.push((r, stream.try_clone()?));
                        // A peer that stops reading (stopped, hung) must not block a write for ever either.
                        stream.set_write_timeout(Some(timeout))?;
                        peers[r] = Some(Mutex::new(BufWriter::new(stream)));
                    }
                    // A stranger (or a rank of another run) is turned away; the group waits on.
                    Err(e) => {
                        let _ = write_frame(&mut &stream, Tag::Failed, &failure_body(&Failure { rank: 0, reason: format!("{e:#}") }));
                        eprintln!("rank 0: turned away a connection from {from}: {e:#}");
                    }
                }
            }
            for p in peers.iter().flatten() {
                write_frame(&mut *p.lock().expect("not shared yet"), Tag::Welcome, &[])?;
            }
        } else {
            let stream = connect_retrying(master, deadline).with_context(|| format!("rank {rank} of {world}: reaching rank 0 at {master}"))?;
            let mut hello = HELLO_MAGIC.to_vec();
            hello.extend_from_slice(&(rank as u32).to_le_bytes());
            hello.extend_from_slice(&(world as u32).to_le_bytes());
            write_frame(&mut &stream, Tag::Hello, &hello)?;
            stream.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))))?;
            match read_frame(&mut &stream) {
                Ok((Tag::Welcome, _)) => {}
                Ok((Tag::Failed, body)) => bail!("rank {rank} of {world}: rank 0 at {master} refused: {}", parse_failure(&body).reason),
                Ok((tag, _)) => bail!("rank {rank} of {world}: rank 0 at {master} sent {tag:?} before the welcome"),
                Err(e) => bail!("rank {rank} of {world}: no welcome from rank 0 at {master} within {timeout:?} (the others did not all join?): {e:#}"),
            }
            stream.set_read_timeout(None)?;
            readers.push((0, stream.try_clone()?));
            stream.set_write_timeout(Some(timeout))?;
            peers[0] = Some(Mutex::new(BufWriter::new(stream)));
        }
        let shared = Arc::new(Shared { rank, world, peers, failed: Mutex::new(None), ended: AtomicBool::new(false), inbox: Mutex::new(tx.clone()) });
        for (from, stream) in readers {
            let shared = shared.clone();
            let tx = tx.clone();
            std::thread::Builder::new().name(format!("rank {rank} <- {from}")).spawn(move || read_peer(&shared, from, stream, tx))?;
        }
        Ok(TcpRank { shared, inbox: Mutex::new(rx), timeout })
    }

    /// The group's first failure, if any (the NCCL ranks poll it while a GPU collective runs).
    pub fn failure(&self) -> Option<anyhow::Error> {
        self.shared.failure().map(|f| f.error(self.shared.world))
    }

    /// One round: this rank's part in, the combined outcome (in rank order) out.
    fn exchange(&self, mine: Payload) -> Result<Arc<Payload>> {
        let s = &*self.shared;
        let op = mine.op();
        if let Some(f) = s.failure() {
            return Err(f.stopped(s.rank, s.world, op));
        }
        let inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        if s.rank == 0 {
            let mut parts: Vec<Option<Payload>> = (0..s.world).map(|_| None).collect();
            parts[0] = Some(mine);
            let deadline = Instant::now() + self.timeout;
            while parts.iter().any(Option::is_none) {
                match inbox.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(Inbox::Frame(from, body)) => match decode(&body) {
                        Ok(p) => parts[from] = Some(p),
                        Err(e) => s.fail(Failure { rank: from, reason: format!("sent a bad part of {op}: {e:#}") }),
                    },
                    Ok(Inbox::Failed) => {}
                    Err(RecvTimeoutError::Timeout) => {
                        let missing: Vec<usize> = (0..s.world).filter(|&r| parts[r].is_none()).collect();
                        let names = missing.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ");
                        let reason = format!("did not reach {op} within {:?}: hung or dead", self.timeout);
                        s.fail(Failure { rank: missing[0], reason: reason.clone() });
                        bail!("rank 0 of {}: timed out waiting for rank(s) {names}, which {reason}", s.world);
                    }
                    Err(RecvTimeoutError::Disconnected) => unreachable!("the group holds a sender"),
                }
                if let Some(f) = s.failure() {
                    return Err(f.stopped(0, s.world, op));
                }
            }
            let out = match combine(parts.into_iter().map(|p| p.expect("all arrived")).collect()) {
                Ok(out) => out,
                Err(e) => {
                    s.fail(Failure { rank: 0, reason: format!("{op}: {e:#}") });
                    return Err(s.failure().expect("just failed").error(s.world));
                }
            };
            let body = encode(&out);
            for r in 1..s.world {
                if let Err(e) = s.send(r, Tag::Outcome, &body) {
                    s.fail(Failure { rank: r, reason: format!("died (sending it the outcome of {op}: {e})") });
                }
            }
            return Ok(Arc::new(out));
        }
        if let Err(e) = s.send(0, Tag::Part, &encode(&mine)) {
            s.fail(Failure { rank: 0, reason: format!("died (sending it this rank's part of {op}: {e})") });
            return Err(s.failure().expect("failed").stopped(s.rank, s.world, op));
        }
        // A little longer than the hub waits, so that the hub's word on who is missing comes first.
        let wait = self.timeout + Duration::from_secs(10);
        loop {
            match inbox.recv_timeout(wait) {
                Ok(Inbox::Frame(_, body)) => return decode(&body).map(Arc::new).with_context(|| format!("rank {}: the outcome of {op}", s.rank)),
                Ok(Inbox::Failed) => {
                    if let Some(f) = s.failure() {
                        return Err(f.stopped(s.rank, s.world, op));
                    }
                }
                Err(_) => bail!("rank {} of {}: no outcome of {op} from rank 0 within {wait:?} (rank 0 hung?)", s.rank, s.world),
            }
        }
    }
}

/// Reads a joining rank's hello; its rank, unless it is no rank of this group.
fn hello_from(stream: &TcpStream, world: usize, peers: &[Option<Mutex<BufWriter<TcpStream>>>]) -> Result<usize> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let (tag, body) = read_frame(&mut &*stream)?;
    stream.set_read_timeout(None)?;
    stream.set_nodelay(true)?;
    if tag != Tag::Hello || body.len() != 24 || &body[..16] != HELLO_MAGIC {
        bail!("not a lorahost rank (or another version of lorahost)");
    }
    let rank = u32::from_le_bytes(body[16..20].try_into().expect("4 bytes")) as usize;
    let theirs = u32::from_le_bytes(body[20..24].try_into().expect("4 bytes")) as usize;
    if theirs != world {
        bail!("rank {rank} says WORLD_SIZE={theirs}, rank 0 has WORLD_SIZE={world}: every rank needs the same");
    }
    if rank == 0 || rank >= world {
        bail!("a second rank 0, or a rank {rank} not below WORLD_SIZE={world}: check RANK");
    }
    if peers[rank].is_some() {
        bail!("rank {rank} joined twice: check RANK on every process");
    }
    Ok(rank)
}

fn connect_retrying(master: &str, deadline: Instant) -> Result<TcpStream> {
    loop {
        let tried = master.to_socket_addrs().map_err(anyhow::Error::from).and_then(|addrs| {
            let mut last = anyhow!("`{master}` resolves to no address");
            for a in addrs {
                match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
                    Ok(s) => return Ok(s),
                    Err(e) => last = e.into(),
                }
            }
            Err(last)
        });
        match tried {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) if Instant::now() >= deadline => return Err(e.context("gave up (is rank 0 running, and MASTER_ADDR/MASTER_PORT right?)")),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A connection's reader: frames to the rank's thread, failures recorded (and relayed by the hub), a
/// closed connection a death unless the peer said goodbye or this rank's run is over.
fn read_peer(s: &Shared, from: usize, stream: TcpStream, tx: Sender<Inbox>) {
    let mut r = BufReader::new(stream);
    loop {
        match read_frame(&mut r) {
            Ok((Tag::Part | Tag::Outcome, body)) => {
                if tx.send(Inbox::Frame(from, body)).is_err() {
                    return;
                }
            }
            Ok((Tag::Failed, body)) => s.fail(parse_failure(&body)),
            Ok((Tag::Bye, _)) => return,
            Ok((tag, _)) => s.fail(Failure { rank: from, reason: format!("sent {tag:?} in the middle of the run (a bug)") }),
            Err(e) => {
                if !s.ended.load(Ordering::SeqCst) {
                    let eof = e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::UnexpectedEof);
                    let how = if eof { String::new() } else { format!(": {e:#}") };
                    s.fail(Failure { rank: from, reason: format!("died (its connection closed{how})") });
                }
                return;
            }
        }
    }
}

impl Collective for TcpRank {
    fn rank(&self) -> usize {
        self.shared.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, tensors: &mut [&mut Tensor]) -> Result<()> {
        dist::all_reduce_by_rounds(self.shared.rank, tensors, |p| self.exchange(p))
    }

    fn all_reduce_sum_scalars(&self, values: &mut [f64]) -> Result<()> {
        dist::all_reduce_scalars_by_rounds(values, |p| self.exchange(p))
    }

    fn broadcast(&self, data: &mut Vec<u8>, root: usize) -> Result<()> {
        dist::broadcast_by_rounds(self.shared.rank, data, root, |p| self.exchange(p))
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(Payload::Nothing).map(|_| ())
    }

    fn abort(&self, reason: &str) {
        self.shared.fail(Failure { rank: self.shared.rank, reason: reason.to_string() });
        self.shared.ended.store(true, Ordering::SeqCst);
    }

    fn finish(&self) {
        let s = &*self.shared;
        s.ended.store(true, Ordering::SeqCst);
        (0..s.world).filter(|&r| r != s.rank).for_each(|r| drop(s.send(r, Tag::Bye, &[])));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A free port on this machine (bound, then released for the hub to take).
    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Runs `body` on `world` TCP ranks, one thread each (as processes would), rank 0 first in the result.
    fn on_tcp<T: Send>(world: usize, timeout: Duration, body: impl Fn(&TcpRank) -> Result<T> + Sync) -> Vec<Result<T>> {
        let master = format!("127.0.0.1:{}", free_port());
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let (master, body) = (&master, &body);
                    scope.spawn(move || {
                        let c = TcpRank::connect(rank, world, master, timeout)?;
                        let out = body(&c);
                        match &out {
                            Ok(_) => c.finish(),
                            Err(e) => c.abort(&format!("{e:#}")),
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn tcp_ranks_sum_in_rank_order_like_the_thread_ranks() {
        // 1e8 + 1 - 1e8 is 0 in rank order (left to right), 1 otherwise.
        let vals = [1e8f32, 1.0, -1e8];
        let out = on_tcp(3, Duration::from_secs(20), |c| {
            let mut got = Vec::new();
            for round in 0..5u8 {
                let mut t = Tensor::from_slice(&[vals[c.rank()], 2.0, c.rank() as f32], (3, 1), &Device::Cpu)?;
                c.all_reduce_sum(&mut [&mut t])?;
                let mut s = [c.rank() as f64, 0.5];
                c.all_reduce_sum_scalars(&mut s)?;
                let mut data = if c.rank() == 1 { vec![round; round as usize + 1] } else { Vec::new() };
                c.broadcast(&mut data, 1)?;
                c.barrier()?;
                got.push((t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?, s, data));
            }
            Ok(got)
        });
        for rank in out {
            for (round, (dims, t, s, data)) in rank.unwrap().into_iter().enumerate() {
                assert_eq!(dims, vec![3, 1]);
                assert_eq!(t, vec![(1e8f32 + 1.0) - 1e8, 6.0, 3.0]);
                assert_eq!(s, [3.0, 1.5]);
                assert_eq!(data, vec![round as u8; round + 1]);
            }
        }
    }

    #[test]
    fn a_failing_tcp_rank_stops_the_others_with_an_error_naming_it() {
        let t0 = Instant::now();
        let out = on_tcp(3, Duration::from_secs(60), |c| {
            for step in 0..5 {
                if c.rank() == 2 && step == 2 {
                    bail!("out of memory at step {step}");
                }
                c.barrier()?;
            }
            Ok(())
        });
        for (rank, r) in out.iter().enumerate() {
            let msg = format!("{:#}", r.as_ref().unwrap_err());
            let named = rank == 2 || msg.contains(&format!("rank {rank} of 3: barrier stopped because rank 2 failed"));
            assert!(named && msg.contains("out of memory at step 2"), "rank {rank}: {msg}");
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "the others stop at once, not at the timeout");
    }

    #[test]
    fn a_rank_that_never_arrives_is_named_after_the_timeout() {
        let out = on_tcp(2, Duration::from_millis(500), |c| {
            if c.rank() == 1 {
                std::thread::sleep(Duration::from_millis(2000)); // hung, from rank 0's view
                return Ok(());
            }
            c.barrier()
        });
        let msg = format!("{:#}", out[0].as_ref().unwrap_err());
        assert!(msg.contains("timed out waiting for rank(s) 1") && msg.contains("barrier"), "{msg}");
    }

    #[test]
    fn a_wrong_world_size_or_a_stranger_is_turned_away() {
        let master = format!("127.0.0.1:{}", free_port());
        let err = std::thread::scope(|scope| {
            let hub = scope.spawn(|| TcpRank::connect(0, 2, &master, Duration::from_secs(2)).map(|_| ()));
            std::thread::sleep(Duration::from_millis(200));
            // A stranger says something else first: the hub turns it away and waits on.
            let mut stranger = connect_retrying(&master, Instant::now() + Duration::from_secs(5)).unwrap();
            stranger.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            let err = TcpRank::connect(1, 3, &master, Duration::from_secs(5)).map(|_| ()).unwrap_err();
            let hub = hub.join().unwrap().unwrap_err();
            (format!("{err:#}"), format!("{hub:#}"))
        });
        assert!(err.0.contains("WORLD_SIZE=3") && err.0.contains("refused"), "{}", err.0);
        assert!(err.1.contains("rank(s) 1 did not join"), "{}", err.1);
    }

    #[test]
    fn payloads_survive_the_wire_and_bad_bodies_are_errors() {
        let ps = [
            Payload::F32(vec![(vec![2, 3], vec![1.5; 6]), (vec![], vec![])]),
            Payload::F64(vec![1.0, -2.5]),
            Payload::Bytes(Some(b"abc".to_vec())),
            Payload::Bytes(None),
            Payload::Nothing,
        ];
        for p in &ps {
            assert_eq!(format!("{:?}", decode(&encode(p)).unwrap()), format!("{p:?}"));
        }
        let f32s = encode(&ps[0]);
        assert!(decode(&f32s[..f32s.len() - 1]).is_err());
        // A count far beyond the body is refused before anything is allocated.
        let mut huge = vec![1u8];
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(format!("{:#}", decode(&huge).unwrap_err()).contains("more than it holds"));
        assert!(decode(&[9]).is_err());
    }
}
