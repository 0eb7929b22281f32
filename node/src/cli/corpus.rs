//! Pages to benchmark on: a corpus file of real memory pages (made by
//! `shared/corpus/make-corpus.py`), or synthetic pages drawn with the same
//! mix (zero pages, incompressible pages, heap-like pages compressing ~2.3×).

use std::path::Path;

use anyhow::{Context, bail};
use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::store::PAGE_BYTES;

/// Pages back to back in one buffer.
#[derive(Clone)]
pub struct Pages {
    bytes: Bytes,
}

impl Pages {
    pub fn len(&self) -> usize {
        self.bytes.len() / PAGE_BYTES
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn page(&self, i: usize) -> &[u8; PAGE_BYTES] {
        self.bytes[i * PAGE_BYTES..(i + 1) * PAGE_BYTES]
            .try_into()
            .expect("page-sized")
    }

    /// Page `i` as a zero-copy slice, for requests.
    pub fn page_bytes(&self, i: usize) -> Bytes {
        self.bytes.slice(i * PAGE_BYTES..(i + 1) * PAGE_BYTES)
    }

    /// Reads a corpus file; with `count`, repeats or truncates it to that many pages.
    pub fn from_file(path: &Path, count: Option<usize>) -> anyhow::Result<Pages> {
        let bytes =
            std::fs::read(path).with_context(|| format!("reading corpus {}", path.display()))?;
        if bytes.len() < PAGE_BYTES || bytes.len() % PAGE_BYTES != 0 {
            bail!(
                "corpus {} is {} bytes: not a whole number of {PAGE_BYTES}-byte pages",
                path.display(),
                bytes.len()
            );
        }
        let have = bytes.len() / PAGE_BYTES;
        let want = count.unwrap_or(have);
        let bytes = if want == have {
            bytes
        } else {
            let total = want * PAGE_BYTES;
            let mut out = Vec::with_capacity(total);
            while out.len() < total {
                let take = (total - out.len()).min(bytes.len());
                out.extend_from_slice(&bytes[..take]);
            }
            out
        };
        Ok(Pages {
            bytes: Bytes::from(bytes),
        })
    }

    /// `count` synthetic pages from `seed`, with the corpus's mix: about 5%
    /// zero pages, 0.5% other same-filled pages, 12% incompressible (random)
    /// pages, and heap-like pages for the rest.
    pub fn synthetic(count: usize, seed: u64) -> Pages {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut bytes = vec![0u8; count * PAGE_BYTES];
        for page in bytes.chunks_exact_mut(PAGE_BYTES) {
            let roll: f64 = rng.random();
            if roll < 0.05 {
                // zero page: already zero
            } else if roll < 0.055 {
                let word: u64 = rng.random();
                for w in page.chunks_exact_mut(8) {
                    w.copy_from_slice(&word.to_ne_bytes());
                }
            } else if roll < 0.175 {
                rng.fill_bytes(page);
            } else {
                heap_like(&mut rng, page);
            }
        }
        Pages {
            bytes: Bytes::from(bytes),
        }
    }
}

const WORDS: &[&str] = &[
    "user", "session", "id", "name", "email", "created", "updated", "status", "active", "value",
    "count", "index", "the", "of", "and", "token", "expires", "true", "false", "null", "item",
    "price", "order", "address", "city", "country", "payload", "type", "object", "string",
];

/// A page that looks like a program's heap: objects with headers, pointers
/// into a few regions, small integers, text and hash-like values.
fn heap_like(rng: &mut SmallRng, page: &mut [u8]) {
    let region: u64 = 0x0000_7f00_0000_0000 | ((rng.random::<u64>() & 0xff_ffff) << 16);
    let mut at = 0;
    while at < page.len() {
        let room = page.len() - at;
        let kind = rng.random_range(0..100);
        let written = if kind < 28 {
            // a pointer into the same region, 16-byte aligned
            let p = region | (rng.random::<u64>() & 0x3ff0);
            put(page, at, &p.to_le_bytes())
        } else if kind < 52 {
            // a small integer or a header word
            let v: u64 = rng.random_range(0..512);
            put(page, at, &v.to_le_bytes())
        } else if kind < 72 {
            // a short text field
            let mut n = 0;
            for _ in 0..rng.random_range(1..5) {
                let w = WORDS[rng.random_range(0..WORDS.len())];
                n += put(page, at + n, w.as_bytes());
                n += put(page, at + n, b" ");
            }
            n
        } else if kind < 80 {
            // hash-like or floating-point noise
            let v: u64 = rng.random();
            put(page, at, &v.to_le_bytes()[..rng.random_range(4..=8)])
        } else {
            // padding
            rng.random_range(8..48).min(room)
        };
        at += written.max(1);
    }
}

fn put(page: &mut [u8], at: usize, bytes: &[u8]) -> usize {
    let n = bytes.len().min(page.len().saturating_sub(at));
    page[at..at + n].copy_from_slice(&bytes[..n]);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The synthetic mix matches the corpus's figures (shared/corpus README:
    /// zero pages 5.1%, 11.6% incompressible, LZ4 ratio 2.29 page by page).
    #[test]
    fn synthetic_pages_have_the_corpus_mix() {
        let pages = Pages::synthetic(4000, 7);
        let mut out = vec![0u8; crate::store::compress::COMPRESS_BOUND_BYTES];
        let mut table = crate::store::compress::CompressTable::default();
        let (mut zero, mut incompressible, mut compressed_bytes) = (0, 0, 0usize);
        for i in 0..pages.len() {
            let p = pages.page(i);
            if p.iter().all(|b| *b == 0) {
                zero += 1;
            }
            let n = crate::store::compress::compress(p, &mut out, &mut table);
            if n > crate::store::compress::REJECT_ABOVE_BYTES {
                incompressible += 1;
            }
            compressed_bytes += n;
        }
        let ratio = (pages.len() * PAGE_BYTES) as f64 / compressed_bytes as f64;
        let share = |n: usize| n as f64 / pages.len() as f64;
        eprintln!(
            "zero {:.3} incompressible {:.3} ratio {ratio:.2}",
            share(zero),
            share(incompressible)
        );
        assert!((0.04..0.06).contains(&share(zero)));
        assert!((0.10..0.14).contains(&share(incompressible)));
        assert!((2.1..2.5).contains(&ratio), "ratio {ratio}");
    }
}
