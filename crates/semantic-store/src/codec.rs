//! KV codecs of the cache files: how one row of f16 values (one head of one
//! layer's K or V, all tokens, position major) is stored.
//!
//! | codec  | values          | scales                          | bytes/value |
//! |--------|-----------------|---------------------------------|-------------|
//! | `f16`  | F16, bit-exact  | none                            | 2           |
//! | `q8_0` | I8              | one F16 per group of 32 values  | 1.0625      |
//! | `q4_0` | U8, two nibbles | one F16 per group of 32 values  | 0.5625      |
//!
//! Groups are 32 consecutive values of a row (a row is `n_tokens * head_dim`
//! values; with `head_dim % 32 == 0` a group never spans two tokens). The last
//! group of a row may be shorter.
//!
//! Error bounds, with `m` = max |x| of the value's group (tested below):
//! - `f16`: exact, every bit (NaN payloads included).
//! - `q8_0`: scale `d = f16(m / 127)`, `q = round(x / d)` in [-127, 127]
//!   (round half to even, as everywhere here).
//!   |x - x'| <= m / 200 + 1e-5 (half a step, m/254, plus f16 rounding of the
//!   scale and the output; the 1e-5 covers groups with m < 0.008 whose f16
//!   scale is subnormal).
//! - `q4_0` (ggml's layout): `d = f16(v / -8)` where v is the signed value of
//!   largest magnitude (the positive one on a tie),
//!   `q = clamp(round(x / d) + 8, 0, 15)`, low nibble first.
//!   |x - x'| <= m / 16 for values the 16 levels reach without clipping, and
//!   <= m / 7.9 + 1e-5 for all values (values near -v clip to the level +7).
//!
//! Lossy codecs assume finite inputs; f16 K/V from the model always are.

use std::fmt;
use std::str::FromStr;

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Values per quantization group.
pub const GROUP: usize = 32;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvCodec {
    /// Lossless; the default. Greedy output after a warm resume is identical
    /// to a cold run only with this codec.
    #[default]
    F16,
    Q8_0,
    Q4_0,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kv codec {0:?} (expected f16, q8_0 or q4_0)")]
pub struct CodecParseError(pub String);

impl KvCodec {
    pub const ALL: [KvCodec; 3] = [KvCodec::F16, KvCodec::Q8_0, KvCodec::Q4_0];

    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        }
    }

    /// The stated bound on |x - decode(encode(x))| for a value whose group
    /// has max |x| = `group_max_abs` (see the module docs).
    pub fn max_abs_error(self, group_max_abs: f32) -> f32 {
        match self {
            Self::F16 => 0.0,
            Self::Q8_0 => group_max_abs / 200.0 + 1e-5,
            Self::Q4_0 => group_max_abs / 7.9 + 1e-5,
        }
    }

    pub fn has_scales(self) -> bool {
        self != Self::F16
    }

    /// safetensors dtype of the values tensors.
    pub(crate) fn values_dtype(self) -> &'static str {
        match self {
            Self::F16 => "F16",
            Self::Q8_0 => "I8",
            Self::Q4_0 => "U8",
        }
    }

    /// Last dimension of a values tensor for a head of `head_dim` values.
    pub(crate) fn values_last_dim(self, head_dim: usize) -> usize {
        match self {
            Self::Q4_0 => head_dim / 2,
            _ => head_dim,
        }
    }

    /// Bytes of one values element (after `values_last_dim`).
    pub(crate) fn values_elem_bytes(self) -> usize {
        match self {
            Self::F16 => 2,
            _ => 1,
        }
    }

    /// Whether rows of heads with `head_dim` values can be stored.
    pub(crate) fn supports_head_dim(self, head_dim: usize) -> bool {
        self != Self::Q4_0 || head_dim.is_multiple_of(2)
    }

    /// Appends one scale per group of `row` to `scales` (quantized codecs;
    /// f16 has none). `scratch` is reused between calls.
    pub(crate) fn push_scales(self, row: &[f16], scratch: &mut Vec<f32>, scales: &mut Vec<f16>) {
        if self == Self::F16 {
            return;
        }
        for g in to_f32(row, scratch).chunks(GROUP) {
            scales.push(self.group_scale(g));
        }
    }

    /// Encodes `row` into `out`, its values bytes. The scales are recomputed
    /// per group, bit-identical to [`KvCodec::push_scales`].
    pub(crate) fn encode(self, row: &[f16], scratch: &mut Vec<f32>, out: &mut [u8]) {
        match self {
            Self::F16 => {
                for (o, x) in out.chunks_exact_mut(2).zip(row) {
                    o.copy_from_slice(&x.to_bits().to_le_bytes());
                }
            }
            Self::Q8_0 => {
                for (g, o) in to_f32(row, scratch).chunks(GROUP).zip(out.chunks_mut(GROUP)) {
                    let id = inverse(self.group_scale(g));
                    for (o, x) in o.iter_mut().zip(g) {
                        *o = round_to_int(x * id, -127.0, 127.0) as u8;
                    }
                }
            }
            Self::Q4_0 => {
                for (g, o) in to_f32(row, scratch).chunks(GROUP).zip(out.chunks_mut(GROUP / 2)) {
                    let id = inverse(self.group_scale(g));
                    // Levels first, then packing: two simple loops vectorize.
                    let mut levels = [0u8; GROUP];
                    for (l, x) in levels.iter_mut().zip(g) {
                        *l = (round_to_int(x * id, -8.0, 7.0) + 8) as u8;
                    }
                    for (o, pair) in o.iter_mut().zip(levels.chunks_exact(2)) {
                        *o = pair[0] | (pair[1] << 4);
                    }
                }
            }
        }
    }

    /// Decodes the values bytes `data` of a row with its `scales` into `out`.
    pub(crate) fn decode(self, data: &[u8], scales: &[f16], scratch: &mut Vec<f32>, out: &mut [f16]) {
        if self == Self::F16 {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
            }
            return;
        }
        scratch.resize(out.len(), 0.0);
        let groups = scratch.chunks_mut(GROUP).zip(scales);
        match self {
            Self::Q8_0 => {
                for ((o, d), g) in groups.zip(data.chunks(GROUP)) {
                    let d = d.to_f32();
                    for (o, &q) in o.iter_mut().zip(g) {
                        *o = q as i8 as f32 * d;
                    }
                }
            }
            _ => {
                for ((o, d), g) in groups.zip(data.chunks(GROUP / 2)) {
                    let d = d.to_f32();
                    for (o, &b) in o.chunks_exact_mut(2).zip(g) {
                        o[0] = ((b & 15) as f32 - 8.0) * d;
                        o[1] = ((b >> 4) as f32 - 8.0) * d;
                    }
                }
            }
        }
        out.convert_from_f32_slice(scratch);
    }

    /// The f16 scale of one group (quantized codecs).
    fn group_scale(self, g: &[f32]) -> f16 {
        let (lo, hi) = min_max(g);
        let d = match self {
            // ggml's q4_0: the extreme value maps to level -8 exactly.
            Self::Q4_0 => (if -lo > hi { lo } else { hi }) / -8.0,
            _ => hi.max(-lo) / 127.0,
        };
        f16::from_f32(d)
    }
}

impl FromStr for KvCodec {
    type Err = CodecParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| CodecParseError(s.to_owned()))
    }
}

impl fmt::Display for KvCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `row` widened into `scratch` (F16C where the CPU has it).
fn to_f32<'a>(row: &[f16], scratch: &'a mut Vec<f32>) -> &'a [f32] {
    scratch.resize(row.len(), 0.0);
    row.convert_to_f32_slice(scratch);
    scratch
}

/// (min(0, x..), max(0, x..)) in 16 independent lanes so it vectorizes
/// (`f32::max` chains do not, for their NaN rules; inputs are finite).
fn min_max(g: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = ([0.0f32; 16], [0.0f32; 16]);
    let mut chunks = g.chunks_exact(16);
    for c in &mut chunks {
        for ((l, h), &x) in lo.iter_mut().zip(hi.iter_mut()).zip(c) {
            *l = if x < *l { x } else { *l };
            *h = if x > *h { x } else { *h };
        }
    }
    let tail = chunks.remainder();
    let lo = lo.iter().chain(tail).fold(0.0f32, |m, &x| if x < m { x } else { m });
    let hi = hi.iter().chain(tail).fold(0.0f32, |m, &x| if x > m { x } else { m });
    (lo, hi)
}

/// `x` clamped to [lo, hi] (whole numbers) and rounded half to even, as an
/// integer. Adding 1.5 * 2^23 leaves round(x) in the low mantissa bits in
/// two's complement: branch-free and vectorizable, unlike `f32 as i8`.
#[inline(always)]
fn round_to_int(x: f32, lo: f32, hi: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    let c = if x < lo {
        lo
    } else if x > hi {
        hi
    } else {
        x
    };
    ((c + MAGIC).to_bits() as i32) - (MAGIC.to_bits() as i32)
}

/// 1/d, or 0 for a zero scale (an all-zero group encodes to zeros).
fn inverse(d: f16) -> f32 {
    let d = d.to_f32();
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values with groups of very different magnitude: normal-ish noise,
    /// outliers, all-zero groups and tiny groups (subnormal f16 scales).
    fn rows(n: usize, seed: u64) -> Vec<f16> {
        let mut s = seed;
        let mut next = move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32
        };
        (0..n)
            .map(|i| {
                let group = i / GROUP;
                let scale = [3.0, 0.05, 0.0, 1e-4, 40.0, 1e-6, 1.0][group % 7];
                let u = next() + next() + next() - 1.5;
                let outlier = if next() < 0.02 { 8.0 } else { 1.0 };
                f16::from_f32(u * scale * outlier)
            })
            .collect()
    }

    fn max_abs16(g: &[f16]) -> f32 {
        g.iter().fold(0.0f32, |m, x| m.max(x.to_f32().abs()))
    }

    fn round_trip(codec: KvCodec, row: &[f16]) -> Vec<f16> {
        let (mut scratch, mut scales) = (Vec::new(), Vec::new());
        codec.push_scales(row, &mut scratch, &mut scales);
        assert_eq!(scales.len(), if codec.has_scales() { row.len().div_ceil(GROUP) } else { 0 });
        let per_byte = if codec == KvCodec::Q4_0 { 2 } else { 1 };
        let mut bytes = vec![0u8; row.len() * codec.values_elem_bytes() / per_byte];
        codec.encode(row, &mut scratch, &mut bytes);
        let mut out = vec![f16::ZERO; row.len()];
        codec.decode(&bytes, &scales, &mut scratch, &mut out);
        out
    }

    #[test]
    fn f16_is_bit_exact() {
        let mut row = rows(1000, 3);
        row.extend([f16::NAN, f16::INFINITY, f16::NEG_ZERO, f16::from_bits(1)]);
        let back = round_trip(KvCodec::F16, &row);
        let bits = |r: &[f16]| r.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&row), bits(&back));
    }

    #[test]
    fn quantized_codecs_stay_within_their_bounds() {
        // 64 * 33 + 16: whole groups and a short last group.
        let row = rows(64 * 33 + 16, 11);
        for codec in [KvCodec::Q8_0, KvCodec::Q4_0] {
            let back = round_trip(codec, &row);
            let (mut worst_rel, mut n_beyond_half_step) = (0.0f32, 0);
            for (g, b) in row.chunks(GROUP).zip(back.chunks(GROUP)) {
                let m = max_abs16(g);
                for (x, y) in g.iter().zip(b) {
                    let err = (x.to_f32() - y.to_f32()).abs();
                    assert!(err <= codec.max_abs_error(m), "{codec}: |{x} - {y}| in group max {m}");
                    if m > 0.01 {
                        worst_rel = worst_rel.max(err / m);
                        let half_step = if codec == KvCodec::Q8_0 { m / 254.0 } else { m / 16.0 };
                        n_beyond_half_step += (err > half_step * 1.01) as usize;
                    }
                }
            }
            eprintln!(
                "{codec}: worst |err| / group max = {worst_rel:.5}, {n_beyond_half_step} values beyond half a step"
            );
            if codec == KvCodec::Q8_0 {
                assert_eq!(n_beyond_half_step, 0);
            }
        }
    }

    #[test]
    fn q4_0_packs_low_nibble_first_and_zero_groups_stay_zero() {
        let mut row = vec![f16::ZERO; 64];
        row[32] = f16::from_f32(-8.0);
        row[33] = f16::from_f32(4.0);
        let (mut scratch, mut scales) = (Vec::new(), Vec::new());
        KvCodec::Q4_0.push_scales(&row, &mut scratch, &mut scales);
        assert_eq!(scales, [f16::ZERO, f16::ONE]);
        let mut bytes = [0u8; 32];
        KvCodec::Q4_0.encode(&row, &mut scratch, &mut bytes);
        assert_eq!(bytes[0], 0x88, "zero is level 8");
        assert_eq!(bytes[16], (8 + 4) << 4, "-8 -> 0 (low), 4 -> 12 (high)");
        assert_eq!(round_trip(KvCodec::Q4_0, &row), row);
    }

    #[test]
    fn round_to_int_matches_round_ties_even_and_clamps() {
        for i in -4000..4000 {
            let x = i as f32 / 16.0;
            let want = x.round_ties_even().clamp(-127.0, 127.0) as i32;
            assert_eq!(round_to_int(x, -127.0, 127.0), want, "{x}");
        }
        assert_eq!(round_to_int(-8.5, -8.0, 7.0), -8);
        assert_eq!(round_to_int(7.5, -8.0, 7.0), 7);
        assert_eq!(round_to_int(2.5, -8.0, 7.0), 2);
        assert_eq!(min_max(&[0.5, -3.0, 2.0]), (-3.0, 2.0));
        assert_eq!(min_max(&(0..40).map(|i| i as f32 - 35.0).collect::<Vec<_>>()), (-35.0, 4.0));
        assert_eq!(min_max(&[1.0; 17]), (0.0, 1.0));
    }

    #[test]
    fn names_round_trip() {
        for c in KvCodec::ALL {
            assert_eq!(c.name().parse::<KvCodec>(), Ok(c));
        }
        assert!("q5_1".parse::<KvCodec>().is_err());
        assert_eq!(KvCodec::default(), KvCodec::F16);
    }
}
