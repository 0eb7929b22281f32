//! The workload of `scripts/kernel-swap.sh`: run as the only program of a
//! small virtual machine whose swap device is a ramster NBD export, it
//! touches more memory than the machine has, so the kernel swaps most of it
//! out and back in, and checks every page it reads.
//!
//! Pass 0 writes every page. Passes 1 to P read every page back and compare
//! it with what was written; all but the last of them then rewrite a share
//! of the pages (new content, so a stale copy anywhere is caught). Each
//! pass walks the pages in another order (forward, strided, backward), so
//! that both swap readahead and random faults are exercised.
//!
//! A page's content follows from (seed, page index, generation), the
//! generation being the pass that last wrote it, in one of four classes:
//! zero, one repeated 8-byte word (both kept as metadata by a node's
//! store), compressible (tokens from a small table behind a header naming
//! the page) and random (incompressible: the store rejects it and the
//! export's backing file takes it).
//!
//! The first mismatch ends the run with exit status 1 and a message naming
//! the page, its class and generation, and the first differing byte.
//!
//!   swap-workload --mib 320 [--passes 3] [--seed 1] [--rewrite-percent 25]
//!
//! `--corrupt-after-pass N` flips one byte of one page in memory after
//! pass N: the run must then fail, which shows the check can fail.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

const PAGE: usize = 4096;

/// The SplitMix64 finaliser: a good 64-bit mixer.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    Zero,
    Word,
    Compressible,
    Random,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::Zero => "zero",
            Class::Word => "same-filled word",
            Class::Compressible => "compressible",
            Class::Random => "random",
        }
    }
}

/// Mixes a page's key: every (seed, page, generation) gives another value.
fn key(seed: u64, page: usize, generation: u32) -> u64 {
    mix(seed ^ mix((page as u64) ^ (u64::from(generation) << 40)))
}

fn class_of(seed: u64, page: usize, generation: u32) -> Class {
    // 2 in 8 zero, 1 in 8 a repeated word, 3 in 8 compressible, 2 in 8 random.
    match key(seed, page, generation) % 8 {
        0 | 1 => Class::Zero,
        2 => Class::Word,
        3..=5 => Class::Compressible,
        _ => Class::Random,
    }
}

/// Tokens of compressible pages: 16 words, so 4 bits of entropy per 8 bytes.
const TOKENS: [&[u8; 8]; 16] = [
    b"ramster ",
    b"swapped ",
    b"page of ",
    b"memory, ",
    b"donors, ",
    b"kernel  ",
    b"frontswp",
    b"zcache  ",
    b"RAMster ",
    b"remote  ",
    b"copies; ",
    b"QUIC    ",
    b"nbd0 in ",
    b"cluster ",
    b"verify. ",
    b"\n       ",
];

/// Writes the content of (seed, page, generation) into `out`.
fn fill(out: &mut [u8; PAGE], seed: u64, page: usize, generation: u32) -> Class {
    let class = class_of(seed, page, generation);
    let k = key(seed, page, generation);
    match class {
        Class::Zero => out.fill(0),
        Class::Word => {
            // Never zero, never the same for two pages in a row.
            let word = (mix(k) | 1).to_le_bytes();
            for chunk in out.chunks_exact_mut(8) {
                chunk.copy_from_slice(&word);
            }
        }
        Class::Compressible => {
            let header =
                format!("ramster swap-workload page {page} generation {generation} seed {seed}\n");
            let header = header.as_bytes();
            let mut state = k;
            let mut bits = 0u64;
            let mut left = 0;
            for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
                if i * 8 < header.len() {
                    let end = header.len().min(i * 8 + 8);
                    let part = &header[i * 8..end];
                    chunk.fill(b' ');
                    chunk[..part.len()].copy_from_slice(part);
                    continue;
                }
                if left == 0 {
                    state = state.wrapping_add(1);
                    bits = mix(state);
                    left = 16;
                }
                chunk.copy_from_slice(TOKENS[(bits & 15) as usize]);
                bits >>= 4;
                left -= 1;
            }
        }
        Class::Random => {
            let mut state = k;
            for chunk in out.chunks_exact_mut(8) {
                state = state.wrapping_add(1);
                chunk.copy_from_slice(&mix(state).to_le_bytes());
            }
        }
    }
    class
}

struct Args {
    mib: usize,
    passes: u32,
    seed: u64,
    rewrite_percent: u64,
    corrupt_after_pass: Option<u32>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        mib: 0,
        passes: 3,
        seed: 1,
        rewrite_percent: 25,
        corrupt_after_pass: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: std::num::ParseIntError| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--mib" => args.mib = value.parse().map_err(bad)?,
            "--passes" => args.passes = value.parse().map_err(bad)?,
            "--seed" => args.seed = value.parse().map_err(bad)?,
            "--rewrite-percent" => args.rewrite_percent = value.parse().map_err(bad)?,
            "--corrupt-after-pass" => args.corrupt_after_pass = Some(value.parse().map_err(bad)?),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.mib == 0 {
        return Err("--mib N (MiB of memory to touch) is required".into());
    }
    if args.passes == 0 || args.rewrite_percent > 100 {
        return Err("--passes must be at least 1, --rewrite-percent at most 100".into());
    }
    Ok(args)
}

/// The page visited at step `i` of pass `pass` over `n` pages.
fn order(pass: u32, i: usize, n: usize, stride: usize) -> usize {
    match pass % 3 {
        1 => i,
        2 => (i * stride) % n,
        _ => n - 1 - i,
    }
}

/// A stride coprime with `n`, about n / φ, so strided passes jump around.
fn coprime_stride(n: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let mut s = (n as f64 / 1.618) as usize | 1;
    while gcd(s, n) != 1 {
        s += 2;
    }
    s
}

fn describe(bytes: &[u8]) -> String {
    bytes[..32].iter().map(|b| format!("{b:02x}")).collect()
}

fn run(args: &Args) -> Result<u64, String> {
    let pages = args.mib * (1 << 20) / PAGE;
    // A zeroed allocation this large is fresh mmap memory: nothing is
    // touched until a pass writes it. One spare page to align on.
    let mut memory = vec![0u8; (pages + 1) * PAGE];
    let start = memory.as_ptr().align_offset(PAGE);
    let memory = &mut memory[start..start + pages * PAGE];
    let mut generations = vec![0u32; pages];
    let stride = coprime_stride(pages);
    let mut expected = [0u8; PAGE];
    let mut verified_total = 0u64;
    let out = &mut std::io::stdout();
    let _ = writeln!(
        out,
        "swap-workload: {pages} pages ({} MiB), seed {}, {} verify passes, {}% rewritten per pass",
        args.mib, args.seed, args.passes, args.rewrite_percent
    );

    for pass in 0..=args.passes {
        let started = Instant::now();
        let mut counts = [0u64; 4];
        let mut rewritten = 0u64;
        for i in 0..pages {
            let page = order(pass, i, pages, stride);
            let slot: &mut [u8; PAGE] = (&mut memory[page * PAGE..(page + 1) * PAGE])
                .try_into()
                .expect("page-sized slice");
            if pass > 0 {
                let generation = generations[page];
                let class = fill(&mut expected, args.seed, page, generation);
                if slot != &expected {
                    let at = slot
                        .iter()
                        .zip(&expected)
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    return Err(format!(
                        "MISMATCH in pass {pass}: page {page} ({} content of generation {generation}) \
                         differs first at byte {at}: read {:02x}, expected {:02x}; \
                         read starts {}, expected {}",
                        class.name(),
                        slot[at],
                        expected[at],
                        describe(slot),
                        describe(&expected),
                    ));
                }
                counts[class as usize] += 1;
                verified_total += 1;
            }
            let rewrite = pass == 0
                || (pass < args.passes
                    && mix(key(args.seed, page, pass) ^ 0x5157) % 100 < args.rewrite_percent);
            if rewrite {
                generations[page] = pass;
                fill(slot, args.seed, page, pass);
                rewritten += 1;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        if pass == 0 {
            let _ = writeln!(
                out,
                "swap-workload: pass 0: wrote {rewritten} pages in {secs:.1} s"
            );
        } else {
            let _ = writeln!(
                out,
                "swap-workload: pass {pass}: verified {} pages ({} zero, {} word, {} compressible, {} random), \
                 rewrote {rewritten}, {secs:.1} s",
                counts.iter().sum::<u64>(),
                counts[Class::Zero as usize],
                counts[Class::Word as usize],
                counts[Class::Compressible as usize],
                counts[Class::Random as usize],
            );
        }
        if args.corrupt_after_pass == Some(pass) {
            let page = pages / 2;
            memory[page * PAGE + 100] ^= 0x40;
            let _ = writeln!(
                out,
                "swap-workload: flipped a bit of page {page} on purpose"
            );
        }
        let _ = out.flush();
    }
    Ok(verified_total)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("swap-workload: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(verified) => {
            println!(
                "swap-workload: OK: {verified} page reads verified over {} passes",
                args.passes
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("swap-workload: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_appears_and_content_is_deterministic() {
        let mut seen = [false; 4];
        let (mut a, mut b) = ([0u8; PAGE], [0u8; PAGE]);
        for page in 0..256 {
            let class = fill(&mut a, 7, page, 3);
            assert_eq!(fill(&mut b, 7, page, 3), class);
            assert_eq!(a, b);
            seen[class as usize] = true;
        }
        assert_eq!(seen, [true; 4]);
    }

    #[test]
    fn another_generation_or_page_changes_non_zero_content() {
        let (mut a, mut b) = ([0u8; PAGE], [0u8; PAGE]);
        for page in 0..256 {
            let ca = fill(&mut a, 7, page, 1);
            let cb = fill(&mut b, 7, page, 2);
            if ca != Class::Zero || cb != Class::Zero {
                assert_ne!(a, b, "page {page}");
            }
            let cc = fill(&mut b, 7, page + 1, 1);
            if ca != Class::Zero || cc != Class::Zero {
                assert_ne!(a, b, "page {page}");
            }
        }
    }

    #[test]
    fn every_order_visits_every_page_once() {
        for n in [1, 2, 3, 10, 81920, 81921] {
            let stride = coprime_stride(n);
            for pass in 1..=3 {
                let mut seen = vec![false; n];
                for i in 0..n {
                    let p = order(pass, i, n, stride);
                    assert!(!seen[p]);
                    seen[p] = true;
                }
            }
        }
    }
}
