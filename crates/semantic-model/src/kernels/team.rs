//! The forward pass's fork-join: the calling thread plus `threads - 1`
//! helper threads that spin between tasks.
//!
//! Why not rayon: a decode step is ~150 short parallel regions (4 matmuls
//! and attention per layer, each 5-50 µs), plus row-wise ops (norms,
//! quantization, RoPE, SwiGLU) of a few µs each for a handful of rows.
//! Rayon's regions cost several µs of wake-up and stealing each (~6-8% of
//! a decode step in `perf`), too much to split the row ops at all: with
//! rayon, spreading them over both cores made a 5-row decode step slower
//! (3.9 -> 4.3 ms). Here a region costs a store, a few atomic increments
//! and a spin on one cache line. Each thread runs a contiguous lane of the
//! tasks and then steals from the others' lanes (see [`Job`]), so a helper
//! preempted by the OS holds back only the task it is in.
//!
//! Use: [`Team::install`] makes a team current on the calling thread;
//! kernels call [`for_each`], which runs on the current team, or on the
//! calling thread alone when there is none (tests, tools) or when called
//! from inside a task (no nesting).
//!
//! Helpers spin for [`SPIN`] after their last task, then park; posting a
//! job unparks them.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks. Longer than the gaps
/// between the regions of a step and between the steps of a busy server
/// (sampling, scheduling: ~0.1 ms), so the helper stays hot while agents
/// decode and sleeps when the server is idle.
pub const SPIN: Duration = Duration::from_micros(500);

type TaskFn<'a> = dyn Fn(usize) + Sync + 'a;

/// Most lanes of a job (threads beyond share them).
const MAX_LANES: usize = 16;

/// A contiguous run of a job's tasks, claimed front to back.
#[repr(align(128))]
struct Lane {
    next: AtomicUsize,
    end: usize,
}

/// One posted region; lives on the poster's stack until every helper that
/// joined it has left.
///
/// Tasks are split into one contiguous lane per thread, and a thread
/// drains its own lane before it helps the others. Neighbouring matmul
/// chunks are neighbouring weights: a thread that runs them in order
/// streams one region, and each chunk's prefetch of the bytes after it
/// serves the same thread's next chunk. Claimed from one shared counter
/// instead (tasks dealt out alternately), a 5-row decode step took
/// 3.90 ms against 3.71 ms with rayon's halving split.
struct Job {
    f: *const TaskFn<'static>,
    lanes: [Lane; MAX_LANES],
    n_lanes: usize,
    panicked: AtomicBool,
}

impl Job {
    fn new(f: *const TaskFn<'static>, n: usize, threads: usize) -> Job {
        let n_lanes = threads.clamp(1, MAX_LANES).min(n.max(1));
        let lanes = std::array::from_fn(|l| {
            let (start, end) = if l < n_lanes { (l * n / n_lanes, (l + 1) * n / n_lanes) } else { (0, 0) };
            Lane { next: AtomicUsize::new(start), end }
        });
        Job { f, lanes, n_lanes, panicked: AtomicBool::new(false) }
    }
}

/// A value alone on its cache line(s).
#[repr(align(128))]
struct Line<T>(T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// `busy` and `sleeping` sit on lines of their own: the helper writes
/// `busy` twice per region, and the poster reads `sleeping` at every post,
/// which then stays a hit in its cache instead of a transfer from the
/// helper's core.
struct Helper {
    busy: Line<AtomicBool>,
    sleeping: Line<AtomicBool>,
    /// Set right after the spawn. A helper that parks before it is set
    /// is never woken, and the poster then runs every task itself.
    thread: OnceLock<Thread>,
}

struct Shared {
    job: AtomicPtr<Job>,
    epoch: AtomicU64,
    stop: AtomicBool,
}

pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<Arc<Helper>>,
    handles: Vec<JoinHandle<()>>,
    /// One poster at a time; a second caller runs its tasks alone.
    posting: Mutex<()>,
}

thread_local! {
    static CURRENT: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
}

impl Team {
    /// A team of `threads` (the caller counts as one).
    pub fn new(threads: usize) -> std::io::Result<Team> {
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let mut team = Team { shared, helpers: Vec::new(), handles: Vec::new(), posting: Mutex::new(()) };
        for i in 1..threads.max(1) {
            let me = Arc::new(Helper {
                busy: Line(AtomicBool::new(false)),
                sleeping: Line(AtomicBool::new(false)),
                thread: OnceLock::new(),
            });
            let (sh, h) = (team.shared.clone(), me.clone());
            let handle = std::thread::Builder::new()
                .name(format!("semantic-kernel-{i}"))
                .spawn(move || helper_loop(&sh, &h, i))?;
            let _ = me.thread.set(handle.thread().clone());
            team.helpers.push(me);
            team.handles.push(handle);
        }
        Ok(team)
    }

    /// Threads in the team, the caller included.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `body` with this team current on the calling thread.
    pub fn install<R>(&self, body: impl FnOnce() -> R) -> R {
        struct Restore(*const Team);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT.with(|c| c.replace(self as *const Team)));
        body()
    }

    /// Runs `f(0)..f(n - 1)` over the team and returns when all are done.
    /// A panic in a task (on any thread) panics here once all are done.
    pub fn run(&self, n: usize, f: &TaskFn<'_>) {
        let guard = if n > 1 && !self.helpers.is_empty() { self.posting.try_lock().ok() } else { None };
        let Some(_guard) = guard else {
            return (0..n).for_each(f);
        };
        // SAFETY: the pointer is only dereferenced while this call waits
        // (helpers leave the job before we return), so erasing the
        // closure's lifetime never lets it outlive its borrows.
        let f: *const TaskFn<'static> = unsafe { std::mem::transmute(f as *const TaskFn<'_>) };
        let job = Job::new(f, n, self.threads());
        self.shared.job.store(&job as *const Job as *mut Job, SeqCst);
        self.shared.epoch.fetch_add(1, SeqCst);
        for h in &self.helpers {
            if h.sleeping.load(SeqCst) {
                h.thread.get().map(Thread::unpark);
            }
        }
        // Tasks run with no current team: nested regions run serially.
        let outer = CURRENT.with(|c| c.replace(std::ptr::null()));
        work(&job, 0);
        CURRENT.with(|c| c.set(outer));
        // Every task is claimed now. Those a helper claimed finish before
        // it clears `busy` (its store releases their writes); a helper
        // that has not joined yet finds the job gone or every lane empty.
        self.shared.job.store(std::ptr::null_mut(), SeqCst);
        for h in &self.helpers {
            while h.busy.load(SeqCst) {
                std::hint::spin_loop();
            }
        }
        if job.panicked.load(Relaxed) {
            panic!("a kernel task panicked");
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        for h in &self.helpers {
            h.thread.get().map(Thread::unpark);
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Claims and runs tasks of `job` until none are left: lane `me` first,
/// then the others. A claim is an acquire-release increment, so a thread
/// whose claim comes after another's also sees that thread's `busy` flag
/// (set before it claimed): [`Team::run`] waits on the flags instead of a
/// shared count of finished tasks, which every thread wrote at the end of
/// every region and the poster spun on (one more cache-line transfer
/// between the cores per region). With that and `sleeping` on its own
/// line, a region's cost over its tasks' time (`team_rt`, vCPUs in one
/// core complex, 3 interleaved runs): 8 tasks of 1 µs 121-148 -> 80-98
/// ns, 2 tasks of 2 µs 160-190 -> 82-137 ns. A 5-row decode step
/// (`decode_steps`) 2.82-2.92 -> 2.74-2.88 ms.
fn work(job: &Job, me: usize) {
    for k in 0..job.n_lanes {
        let lane = &job.lanes[(me + k) % job.n_lanes];
        // Another lane: look before claiming, so an empty one is not
        // written to (which would take its line from its owner). Acquire,
        // like a claim: seeing the lane empty means seeing the `busy` flag
        // of whoever emptied it.
        if k > 0 && lane.next.load(Acquire) >= lane.end {
            continue;
        }
        loop {
            let i = lane.next.fetch_add(1, AcqRel);
            if i >= lane.end {
                break;
            }
            // SAFETY: `f` is alive while the job is posted (see `Team::run`).
            let r = catch_unwind(AssertUnwindSafe(|| unsafe { (*job.f)(i) }));
            if r.is_err() {
                job.panicked.store(true, Relaxed);
            }
        }
    }
}

fn helper_loop(sh: &Shared, me: &Helper, lane: usize) {
    let mut seen = sh.epoch.load(SeqCst);
    let mut idle = Instant::now();
    let mut polls = 0u32;
    loop {
        if sh.stop.load(Relaxed) {
            return;
        }
        let e = sh.epoch.load(Acquire);
        if e == seen {
            polls = polls.wrapping_add(1);
            // Reading the clock every poll would slow the poll loop down.
            if polls.is_multiple_of(64) && idle.elapsed() > SPIN {
                me.sleeping.store(true, SeqCst);
                if sh.epoch.load(SeqCst) == seen && !sh.stop.load(SeqCst) {
                    std::thread::park();
                }
                me.sleeping.store(false, SeqCst);
                idle = Instant::now();
            }
            std::hint::spin_loop();
            continue;
        }
        // Join only the job the epoch names: announce, then re-check, so
        // the poster either sees us busy or we see its job gone.
        me.busy.store(true, SeqCst);
        let p = sh.job.load(SeqCst);
        if !p.is_null() && sh.epoch.load(SeqCst) == e {
            // SAFETY: the poster keeps the job alive until `busy` is false.
            work(unsafe { &*p }, lane);
        }
        me.busy.store(false, SeqCst);
        seen = e;
        idle = Instant::now();
    }
}

/// Threads of the current team (1 without one, or inside a task).
pub fn threads() -> usize {
    CURRENT.with(|c| {
        let t = c.get();
        // SAFETY: CURRENT is set only by `install`, which outlives its body.
        if t.is_null() {
            1
        } else {
            unsafe { (*t).threads() }
        }
    })
}

/// Runs `f(0)..f(n - 1)` on the current team, or here when there is none.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    let t = CURRENT.with(|c| c.get());
    if t.is_null() || n <= 1 {
        return (0..n).for_each(f);
    }
    // SAFETY: as in `threads`.
    unsafe { (*t).run(n, &f) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_and_nested_regions_run_inline() {
        let team = Team::new(3).unwrap();
        assert_eq!(team.threads(), 3);
        team.install(|| {
            assert_eq!(threads(), 3);
            for n in [0, 1, 2, 7, 100] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                for_each(n, |i| {
                    // A lone task runs inline and may still use the team.
                    if n > 1 {
                        assert_eq!(threads(), 1, "no team inside a task");
                    }
                    let inner = AtomicUsize::new(0);
                    for_each(3, |_| {
                        inner.fetch_add(1, Relaxed);
                    });
                    assert_eq!(inner.load(Relaxed), 3);
                    hits[i].fetch_add(1, Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "n={n}");
            }
        });
        assert_eq!(threads(), 1, "install restores the previous team");
    }

    #[test]
    fn helpers_wake_after_parking() {
        let team = Team::new(2).unwrap();
        let caller = std::thread::current().id();
        for _ in 0..3 {
            std::thread::sleep(SPIN * 4);
            assert!(team.helpers[0].sleeping.load(SeqCst), "an idle helper parks");
            // Tasks that sleep leave a woken helper time to take some.
            let elsewhere = AtomicUsize::new(0);
            team.install(|| {
                for_each(32, |_| {
                    std::thread::sleep(Duration::from_micros(300));
                    if std::thread::current().id() != caller {
                        elsewhere.fetch_add(1, Relaxed);
                    }
                })
            });
            assert!(elsewhere.load(Relaxed) > 0, "the parked helper was woken and ran tasks");
        }
    }

    #[test]
    fn a_task_panic_reaches_the_caller_and_the_team_still_works() {
        let team = Team::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.install(|| {
                for_each(8, |i| {
                    if i == 5 {
                        panic!("task 5");
                    }
                })
            })
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        team.install(|| {
            for_each(8, |_| {
                n.fetch_add(1, Relaxed);
            })
        });
        assert_eq!(n.load(Relaxed), 8);
    }

    #[test]
    fn every_task_has_finished_and_is_visible_when_run_returns() {
        // A slow task on the helper's side: `run` must wait for it, not
        // only for every task to be claimed. Rounds go on until the helper
        // took part in enough of them (other tests share the cores).
        let team = Team::new(2).unwrap();
        let caller = std::thread::current().id();
        let mut out = vec![0usize; 8];
        let (mut round, mut helped) = (0usize, 0);
        while helped < 200 && round < 100_000 {
            round += 1;
            let p = SendOut(out.as_mut_ptr());
            let elsewhere = AtomicBool::new(false);
            team.install(|| {
                for_each(8, |i| {
                    if std::thread::current().id() != caller {
                        elsewhere.store(true, Relaxed);
                    }
                    // The first task of the helper's lane: it holds the
                    // helper while the caller runs (or steals) the rest.
                    if i == 4 {
                        let mut x = 0usize;
                        for k in 0..5000 {
                            x = std::hint::black_box(x + k);
                        }
                    }
                    // SAFETY: each task writes its own element.
                    unsafe { *p.at(i) = round };
                })
            });
            helped += elsewhere.load(Relaxed) as usize;
            assert!(out.iter().all(|&v| v == round), "round {round}: {out:?}");
        }
        assert!(helped > 0, "the helper never ran a task in {round} rounds");
    }

    #[derive(Clone, Copy)]
    struct SendOut(*mut usize);
    // SAFETY: tasks write disjoint elements.
    unsafe impl Send for SendOut {}
    unsafe impl Sync for SendOut {}
    impl SendOut {
        fn at(self, i: usize) -> *mut usize {
            // SAFETY: callers stay inside the vector.
            unsafe { self.0.add(i) }
        }
    }

    #[test]
    fn concurrent_callers_each_get_all_their_tasks() {
        let team = Team::new(2).unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        let n = AtomicUsize::new(0);
                        team.install(|| {
                            for_each(16, |_| {
                                n.fetch_add(1, Relaxed);
                            })
                        });
                        assert_eq!(n.load(Relaxed), 16);
                    }
                });
            }
        });
    }
}
