//! How a page is encoded: same-filled pages as one word of metadata, the rest
//! LZ4-compressed; and zcache's rule for refusing pages that compress badly.

use std::sync::atomic::{AtomicU32, Ordering};

use super::{PAGE_BYTES, Page};

/// Room lz4_flex asks for when compressing one page (its bound is
/// 20 + 1.1 × input; a test checks this against the crate).
pub const COMPRESS_BOUND_BYTES: usize = 20 + PAGE_BYTES * 11 / 10 + 1;

/// Compressed pages bigger than this are never kept (7/8 of a page).
pub const REJECT_ABOVE_BYTES: usize = PAGE_BYTES * 7 / 8;
/// Compressed pages bigger than this are refused while the running mean is
/// also above it (5/8 of a page): a workload of poorly compressing data would
/// otherwise fill the store at little gain.
pub const MEAN_LIMIT_BYTES: usize = PAGE_BYTES * 5 / 8;
/// Fill (used / capacity) above which the size limit starts to tighten.
const TIGHTEN_FROM_FILL: f64 = 0.5;
/// The size limit at a full store (half a page).
const FULL_STORE_LIMIT_BYTES: usize = PAGE_BYTES / 2;

/// The 8-byte word a page is made of, when it is one word repeated (zero
/// pages are the common case). Such pages are stored as that word alone.
pub fn same_filled_word(page: &Page) -> Option<u64> {
    let (words, _) = page.as_chunks::<8>();
    let first = words[0];
    // Comparing 8-byte chunks lets the compiler vectorise; most non-same
    // pages differ within the first few words, so this exits early.
    words
        .iter()
        .all(|w| *w == first)
        .then(|| u64::from_ne_bytes(first))
}

/// Rebuilds a same-filled page.
pub fn fill_page(word: u64, out: &mut Page) {
    let bytes = word.to_ne_bytes();
    for chunk in out.as_chunks_mut::<8>().0 {
        *chunk = bytes;
    }
}

/// LZ4's match table, kept per thread: allocating and zeroing a fresh one per
/// page cost about a fifth of a store.
pub type CompressTable = lz4_flex::block::CompressTable;

/// Compresses `page` into `out` (at least [`COMPRESS_BOUND_BYTES`]); returns
/// the compressed length.
pub fn compress(page: &Page, out: &mut [u8], table: &mut CompressTable) -> usize {
    lz4_flex::block::compress_into_with_table(page, out, table)
        .expect("output sized to the LZ4 bound")
}

/// Decompresses into a full page; `false` when the bytes do not decode to
/// exactly one page (the checksum would catch it too; this is cheaper).
pub fn decompress(compressed: &[u8], out: &mut Page) -> bool {
    matches!(
        lz4_flex::block::decompress_into(compressed, out),
        Ok(n) if n == PAGE_BYTES
    )
}

/// zcache's admission rule for compressed pages, with the running mean of
/// compressed sizes it depends on.
#[derive(Debug)]
pub struct AdmissionPolicy {
    /// Exponentially weighted mean of compressed sizes, in bytes × 16.
    mean_x16: AtomicU32,
}

impl Default for AdmissionPolicy {
    fn default() -> Self {
        // Start at the corpus's typical size, not at an extreme.
        AdmissionPolicy {
            mean_x16: AtomicU32::new((PAGE_BYTES as u32 / 2) * 16),
        }
    }
}

impl AdmissionPolicy {
    /// The size limit at a given fill (0.0 empty .. 1.0 full): 7/8 of a page
    /// until half full, then falling linearly to half a page at full.
    pub fn limit_bytes(fill: f64) -> usize {
        if fill <= TIGHTEN_FROM_FILL {
            return REJECT_ABOVE_BYTES;
        }
        let t = ((fill - TIGHTEN_FROM_FILL) / (1.0 - TIGHTEN_FROM_FILL)).min(1.0);
        let span = (REJECT_ABOVE_BYTES - FULL_STORE_LIMIT_BYTES) as f64;
        REJECT_ABOVE_BYTES - (span * t) as usize
    }

    /// Whether a page that compressed to `len` bytes is kept, and records
    /// `len` in the running mean either way.
    pub fn admit(&self, len: usize, fill: f64) -> bool {
        let mean = self.record(len);
        if len > Self::limit_bytes(fill) {
            return false;
        }
        !(len > MEAN_LIMIT_BYTES && mean > MEAN_LIMIT_BYTES)
    }

    /// Mean compressed size after recording `len` (weight 1/16). Racy updates
    /// from concurrent stores may lose a sample; the mean is a hint.
    fn record(&self, len: usize) -> usize {
        let old = self.mean_x16.load(Ordering::Relaxed);
        let new = old - old / 16 + len.min(PAGE_BYTES) as u32;
        self.mean_x16.store(new, Ordering::Relaxed);
        (new / 16) as usize
    }

    pub fn mean_bytes(&self) -> usize {
        (self.mean_x16.load(Ordering::Relaxed) / 16) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_filled_detects_zero_and_repeated_words_only() {
        let mut p = [0u8; PAGE_BYTES];
        assert_eq!(same_filled_word(&p), Some(0));
        let w = 0x0123_4567_89ab_cdefu64;
        fill_page(w, &mut p);
        assert_eq!(same_filled_word(&p), Some(w));
        p[PAGE_BYTES - 1] ^= 1;
        assert_eq!(same_filled_word(&p), None);
    }

    #[test]
    fn scratch_is_as_big_as_lz4_wants() {
        assert!(COMPRESS_BOUND_BYTES >= lz4_flex::block::get_maximum_output_size(PAGE_BYTES));
    }

    #[test]
    fn compress_round_trips() {
        let mut p = [0u8; PAGE_BYTES];
        for (i, b) in p.iter_mut().enumerate() {
            *b = (i % 7) as u8;
        }
        let mut c = [0u8; COMPRESS_BOUND_BYTES];
        let n = compress(&p, &mut c, &mut CompressTable::default());
        let mut back = [1u8; PAGE_BYTES];
        assert!(decompress(&c[..n], &mut back));
        assert_eq!(p, back);
        assert!(!decompress(&c[..n - 1], &mut back));
    }

    #[test]
    fn limit_tightens_as_the_store_fills() {
        assert_eq!(AdmissionPolicy::limit_bytes(0.0), REJECT_ABOVE_BYTES);
        assert_eq!(AdmissionPolicy::limit_bytes(0.5), REJECT_ABOVE_BYTES);
        assert!(AdmissionPolicy::limit_bytes(0.75) < REJECT_ABOVE_BYTES);
        assert_eq!(AdmissionPolicy::limit_bytes(1.0), FULL_STORE_LIMIT_BYTES);
    }

    #[test]
    fn poor_pages_are_refused_only_while_the_mean_is_poor_too() {
        let p = AdmissionPolicy::default();
        assert!(!p.admit(REJECT_ABOVE_BYTES + 1, 0.0));
        // Mean starts at half a page: a 3000-byte page is fine once.
        assert!(p.admit(3000, 0.0));
        for _ in 0..64 {
            p.admit(3500, 0.0);
        }
        assert!(p.mean_bytes() > MEAN_LIMIT_BYTES);
        assert!(!p.admit(3000, 0.0));
        assert!(p.admit(1000, 0.0));
    }
}
