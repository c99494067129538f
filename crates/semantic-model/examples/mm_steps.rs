//! Profiling aid: `cargo run --release --example mm_steps -p semantic-model -- B REPS [OUT]`
//! times the quantized matmuls of one decode step alone (SmolLM2-135M shapes,
//! Q4_1, 30 layers: QKV, O, gate+up, down; with OUT=1 also a 49152-row Q8_0
//! output layer) for B activation rows, weights streamed from memory.

use semantic_model::kernels::matmul::{qmatmul, quantize_rows, QMatrix};
use semantic_model::kernels::quant::QType;
use semantic_model::kernels::team::Team;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (b, reps, with_out) = (arg(1, 5), arg(2, 200), arg(3, 0));
    let mut seed = 11u64;
    let mut byte = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 56) as u8
    };
    let mut mat = |ty: QType, rows: usize, cols: usize| {
        let bb = ty.block_bytes();
        let mut data: Vec<u8> = (0..rows * cols / 32 * bb).map(|_| byte()).collect();
        // Finite scales: f16 0x3c00-ish (about 1.0) with random low bits.
        for blk in data.chunks_exact_mut(bb) {
            blk[1] = 0x2c;
            if ty == QType::Q4_1 {
                blk[3] = 0x2c;
            }
        }
        QMatrix::new(ty, rows, cols, data).unwrap()
    };
    let mut mats = Vec::new();
    for _ in 0..30 {
        mats.push(mat(QType::Q4_1, 960, 576));
        mats.push(mat(QType::Q4_1, 576, 576));
        mats.push(mat(QType::Q4_1, 3072, 576));
        mats.push(mat(QType::Q4_1, 576, 1536));
    }
    if with_out == 1 {
        mats.push(mat(QType::Q8_0, 49152, 576));
    }
    let bytes: usize = mats.iter().map(|m| m.bytes()).sum();
    let x: Vec<f32> = (0..b * 1536).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let (mut q576, mut q1536) = (Vec::new(), Vec::new());
    quantize_rows(&x[..b * 576], 576, &mut q576);
    quantize_rows(&x, 1536, &mut q1536);
    let mut out = vec![0f32; b * 49152];
    let threads = Team::new(2).unwrap();
    let mut times = Vec::new();
    threads.install(|| {
        for _ in 0..reps {
            let t0 = std::time::Instant::now();
            for m in &mats {
                let q = if m.cols() == 576 { &q576 } else { &q1536 };
                qmatmul(m, q, &mut out[..b * m.rows()]);
            }
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    });
    times.sort_by(|a, b| a.total_cmp(b));
    let med = times[times.len() / 2];
    println!(
        "B={b} weights {:.1} MB: {med:.3} ms median ({:.1} GB/s), min {:.3}",
        bytes as f64 / 1e6,
        bytes as f64 / med / 1e6,
        times[0]
    );
}
