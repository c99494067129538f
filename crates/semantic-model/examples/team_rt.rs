//! Profiling aid: `cargo run --release -p semantic-model --example team_rt`
//! times the kernel team's fork-join: regions of N tasks that each spin a
//! fixed time, and how far each region runs over the ideal (the busier
//! of 2 threads running its whole tasks). The excess is the cost of posting a region,
//! the helper joining it and the caller learning that it is done.

use semantic_model::kernels::team::{for_each, Team};
fn spin(iters: u64) -> u64 {
    let mut x = 1u64;
    for i in 0..iters {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
    }
    x
}
fn main() {
    let team = Team::new(2).unwrap();
    // calibrate: iterations per microsecond on one thread
    let t = std::time::Instant::now();
    std::hint::black_box(spin(10_000_000));
    let per_us = 10_000_000.0 / (t.elapsed().as_secs_f64() * 1e6);
    team.install(|| {
        for (n, us) in [(8usize, 1.0f64), (8, 0.25), (3, 1.0), (2, 2.0)] {
            let iters = (per_us * us) as u64;
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                for _ in 0..5000 {
                    for_each(n, |_| {
                        std::hint::black_box(spin(iters));
                    });
                }
                best = best.min(t.elapsed().as_secs_f64() / 5000.0 * 1e9);
            }
            // Whole tasks per thread: the busier of two threads runs ceil(n / 2).
            let ideal = n.div_ceil(2) as f64 * us * 1000.0;
            println!("{n} tasks x {us} us: {best:.0} ns, {:.0} over the ideal", best - ideal);
        }
    });
}
