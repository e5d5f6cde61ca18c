//! A small seeded mutation fuzzer for the model's file readers and the frame preprocessing, on
//! stable Rust (cargo-fuzz needs nightly). Deterministic for a seed, so a CI run and any
//! failure it reports reproduce exactly.
//!
//! Each [`Target`] turns bytes into one call of the code under test and says how it went. The
//! [`Fuzzer`] starts from the target's seeds (plus a corpus directory, if given), mutates,
//! runs, and keeps every input whose outcome is new (the outcome's text with numbers and names
//! stripped: a cheap stand-in for coverage that steers towards new checks). An execution fails
//! when it panics, when one allocation exceeds the target's budget for that input size, or when
//! it takes longer than [`SLOW`]. The binary that runs it must install
//! [`crate::alloc_meter::MeteredAllocator`] (an allocation above 1 GiB aborts the process;
//! with a corpus directory the input being run is in `current-<target>` for the post-mortem).
//!
//! - `cargo test -p llamavid-gst-tests --test fuzz`: a short run of every target (CI);
//! - `cargo bench -p llamavid-gst-tests --bench fuzz -- --help`: long runs with a corpus that
//!   grows outside the repository (`~/.cache/gst-llamavid/fuzz-corpus/` by default).

pub mod targets;

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gstllamavid::model::error::panic_message;

use crate::alloc_meter::measure;

/// An execution slower than this is reported (a loop that a size field controls, say).
pub const SLOW: Duration = Duration::from_secs(5);

/// How one execution went, as the target judges it.
#[derive(Debug)]
pub enum Outcome {
    /// The input was accepted (a tensor read, a tokenizer built, pixels produced).
    Accepted(String),
    /// The input was refused with this error.
    Refused(String),
}

pub trait Target {
    fn name(&self) -> &'static str;
    /// Well-formed inputs to start from.
    fn seeds(&self) -> Vec<Vec<u8>>;
    /// Runs the code under test on `input`.
    fn run(&mut self, input: &[u8]) -> Outcome;
    /// The largest single allocation acceptable for an input of `len` bytes.
    fn allocation_budget(&self, len: usize) -> usize {
        (16 << 20) + 16 * len
    }
    /// Largest input worth trying (mutations that grow past it are cut).
    fn max_len(&self) -> usize {
        1 << 20
    }
}

/// splitmix64: tiny, fast, and the same sequence everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Integers that make size fields interesting.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
];

/// One random edit of `data`; `other` is another corpus entry to splice from.
pub fn mutate(data: &mut Vec<u8>, other: &[u8], rng: &mut Rng, max_len: usize) {
    let len = data.len();
    match rng.below(if len == 0 { 1 } else { 10 }) {
        0 => {
            // Insert random bytes.
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            data.splice(at..at, bytes);
        }
        1 => {
            let at = rng.below(len);
            data[at] ^= 1 << rng.below(8);
        }
        2 => {
            let at = rng.below(len);
            data[at] = [0, 0xff, 0x7f, 0x80, b'\n', b'.', b'(', b'0'][rng.below(8)];
        }
        3 => {
            // An interesting integer, little endian, 1/2/4/8 bytes wide.
            let width = [1, 2, 4, 8][rng.below(4)].min(len);
            let at = rng.below(len - width + 1);
            let value = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
            data[at..at + width].copy_from_slice(&value[..width]);
        }
        4 => {
            // Delete a range.
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(64));
            data.drain(at..at + n);
        }
        5 => {
            // Duplicate a range.
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(64));
            let copy = data[at..at + n].to_vec();
            let to = rng.below(len + 1);
            data.splice(to..to, copy);
        }
        6 => data.truncate(rng.below(len)),
        7 if !other.is_empty() => {
            // Splice a piece of another input in.
            let from = rng.below(other.len());
            let n = 1 + rng.below((other.len() - from).min(256));
            let at = rng.below(len + 1);
            let end = (at + n).min(len);
            data.splice(at..end, other[from..from + n].iter().copied());
        }
        8 => {
            // Overwrite a run with one byte (long runs of a repeated opcode, zeros, 0xff).
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(256));
            let b = data[rng.below(len)];
            data[at..at + n].fill(b);
        }
        _ => {
            let at = rng.below(len);
            data[at] = rng.next_u64() as u8;
        }
    }
    data.truncate(max_len);
}

/// A failed execution, with the input that did it.
#[derive(Debug, Clone)]
pub struct Finding {
    pub what: String,
    pub input: Vec<u8>,
}

#[derive(Debug, Default, Clone)]
pub struct Report {
    pub target: String,
    pub executions: u64,
    pub accepted: u64,
    pub refused: u64,
    /// Distinct outcomes seen (corpus entries kept).
    pub outcomes: usize,
    pub corpus: usize,
    pub findings: Vec<Finding>,
    pub largest_allocation: usize,
    pub slowest: Duration,
    pub elapsed: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<16} {:>9} runs ({:.0}/s), {:>7} accepted, {:>8} refused, {:>4} outcomes, \
             corpus {:>4}, largest allocation {:>6} KiB, slowest {:>6.1} ms, {} findings",
            self.target,
            self.executions,
            self.executions as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.accepted,
            self.refused,
            self.outcomes,
            self.corpus,
            self.largest_allocation / 1024,
            self.slowest.as_secs_f64() * 1e3,
            self.findings.len()
        )
    }
}

/// The outcome's text with digits and quoted or back-quoted names removed, cut short.
fn signature(outcome: &Outcome) -> String {
    let (tag, text) = match outcome {
        Outcome::Accepted(t) => ("ok", t),
        Outcome::Refused(t) => ("err", t),
    };
    let mut out = String::from(tag);
    let mut quoted = false;
    for c in text.chars() {
        if c == '`' || c == '"' {
            quoted = !quoted;
            continue;
        }
        if !quoted && !c.is_ascii_digit() {
            out.push(c);
        }
        if out.len() >= 80 {
            break;
        }
    }
    out
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

pub struct Fuzzer {
    pub seed: u64,
    /// Where the corpus grows and findings are kept (a folder per target); none in CI.
    pub corpus_dir: Option<PathBuf>,
}

impl Fuzzer {
    /// Runs `target` for `iterations` executions or until `deadline`, whichever comes first.
    pub fn run(
        &self,
        target: &mut dyn Target,
        iterations: u64,
        deadline: Option<Duration>,
    ) -> Report {
        let started = Instant::now();
        let mut rng = Rng::new(self.seed ^ fnv(target.name().as_bytes()));
        let dir = self.corpus_dir.as_ref().map(|d| d.join(target.name()));
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir.join("findings")).expect("corpus folder");
        }
        let mut corpus = target.seeds();
        if let Some(dir) = &dir {
            corpus.extend(read_corpus(dir));
        }
        assert!(!corpus.is_empty(), "{}: no seeds", target.name());
        let mut seen = HashSet::new();
        let mut report = Report {
            target: target.name().into(),
            ..Report::default()
        };
        let max_len = target.max_len();
        let mut i = 0u64;
        // The seeds first, unmutated, then mutations of random corpus entries.
        let seeds = corpus.len() as u64;
        while i < iterations.max(seeds) {
            if deadline.is_some_and(|d| started.elapsed() > d) && i >= seeds {
                break;
            }
            let input = if i < seeds {
                corpus[i as usize].clone()
            } else {
                let mut input = corpus[rng.below(corpus.len())].clone();
                let other = corpus[rng.below(corpus.len())].clone();
                for _ in 0..1 + rng.below(4) {
                    mutate(&mut input, &other, &mut rng, max_len);
                }
                input
            };
            i += 1;
            if let Some(dir) = &dir {
                let _ = std::fs::write(dir.join(format!("../current-{}", target.name())), &input);
            }
            let t0 = Instant::now();
            let (result, allocated) =
                measure(|| std::panic::catch_unwind(AssertUnwindSafe(|| target.run(&input))));
            let took = t0.elapsed();
            report.executions += 1;
            report.slowest = report.slowest.max(took);
            report.largest_allocation = report.largest_allocation.max(allocated.largest);
            let mut finding = None;
            match &result {
                Ok(Outcome::Accepted(_)) => report.accepted += 1,
                Ok(Outcome::Refused(_)) => report.refused += 1,
                Err(panic) => finding = Some(format!("panic: {}", panic_message(&**panic))),
            }
            let budget = target.allocation_budget(input.len());
            if allocated.largest > budget {
                finding = Some(format!(
                    "allocated {} bytes at once for an input of {} bytes (budget {budget})",
                    allocated.largest,
                    input.len()
                ));
            }
            if took > SLOW {
                finding = Some(format!("took {took:?}"));
            }
            if let Some(what) = finding {
                if let Some(dir) = &dir {
                    let name = format!("findings/{:016x}", fnv(&input));
                    let _ = std::fs::write(dir.join(name), &input);
                }
                if report.findings.len() < 20 {
                    report.findings.push(Finding { what, input });
                }
                continue;
            }
            let outcome = result.expect("not a panic");
            // A new outcome from a mutation (not a seed) joins the corpus.
            if seen.insert(signature(&outcome)) && i > seeds {
                if let Some(dir) = &dir {
                    let _ = std::fs::write(dir.join(format!("{:016x}", fnv(&input))), &input);
                }
                corpus.push(input);
            }
        }
        if let Some(dir) = &dir {
            let _ = std::fs::remove_file(dir.join(format!("../current-{}", target.name())));
        }
        report.outcomes = seen.len();
        report.corpus = corpus.len();
        report.elapsed = started.elapsed();
        report
    }
}

fn read_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// The default corpus root: outside the repository, beside the other cached tools.
pub fn default_corpus_root() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache/gst-llamavid/fuzz-corpus")
}
