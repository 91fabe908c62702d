//! Helper threads that run the slices of a sliced batch and spin between calls.
//!
//! Why: with one slice per core, a call's time is that of its slowest slice, and on these
//! 2-core VMs the slice handed to a sleeping rayon worker started late: a trace of 900 calls of
//! the small CNN at batch 64 on two threads measured its start 16 us after the call in the
//! median but 176 us in the mean (a waking vCPU waits for the hypervisor), about a tenth of the
//! call. Rayon's workers sleep after some 30 idle rounds of `yield`; onnxruntime's intra-op
//! threads spin before sleeping, and so do these, for [`SPIN`] after each slice, long enough to
//! cover the gap to the next call of an attack loop or a batch of calls.
//!
//! One caller at a time: a second concurrent caller (two pipelines on one backend) gets `false`
//! from [`Crew::run`] and uses the rayon pool instead.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long a helper spins for the next slice before it parks: past the other threads' late
/// finishes (in the trace above the slower of two slices ended 74 us after their mean) and the
/// caller's work between calls of an attack loop, and short enough that a pipeline's other
/// stages on the same cores lose little to it.
const SPIN: Duration = Duration::from_micros(250);

/// How long the caller spins for the helpers before it also yields its core between checks.
const CALLER_SPIN: Duration = Duration::from_micros(200);

/// A call's slices: the lifetime-erased slice function, the slice count and the counter the
/// caller and its helpers take slice indices from.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync + 'static),
    parts: usize,
    next: *const AtomicUsize,
}

// SAFETY: the pointees are `Sync`, and `Crew::run` keeps them alive until every helper that was
// given the job has finished it (it waits for all of them, even when its own slices panic).
unsafe impl Send for Job {}

impl Job {
    /// Takes and runs slices until none is left.
    ///
    /// # Safety
    /// The pointees must be alive (see `Crew::run`).
    unsafe fn work(&self) -> std::thread::Result<()> {
        // SAFETY: the caller's guarantee.
        let (f, next) = unsafe { (&*self.f, &*self.next) };
        catch_unwind(AssertUnwindSafe(|| {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= self.parts {
                    break;
                }
                f(i);
            }
        }))
    }
}

/// One helper's mailbox.
struct Slot {
    /// Jobs posted so far; the helper runs job number `posted` when it differs from the last
    /// one it ran.
    posted: AtomicU64,
    /// The number of the last job the helper finished.
    finished: AtomicU64,
    /// Set by the helper before it parks, so that the caller unparks only a parked helper (an
    /// unpark of a running thread would leave a token that cuts its next park short).
    parked: AtomicBool,
    job: Mutex<Option<Job>>,
    /// The panic of the last job, if it panicked, for the caller to resume.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

struct Shared {
    slots: Vec<Slot>,
    stop: AtomicBool,
}

/// `helpers` threads that take the slices of each call beside the calling thread.
pub(super) struct Crew {
    shared: Arc<Shared>,
    threads: Vec<(Thread, JoinHandle<()>)>,
    /// Held by the caller of a run: the helpers serve one call at a time.
    busy: Mutex<()>,
}

impl Crew {
    /// `None` if the OS refuses a thread (the backend then stays on its rayon pool).
    pub(super) fn new(helpers: usize) -> Option<Crew> {
        let shared = Arc::new(Shared {
            slots: (0..helpers)
                .map(|_| Slot {
                    posted: AtomicU64::new(0),
                    finished: AtomicU64::new(0),
                    parked: AtomicBool::new(false),
                    job: Mutex::new(None),
                    panic: Mutex::new(None),
                })
                .collect(),
            stop: AtomicBool::new(false),
        });
        let mut crew = Crew {
            shared: shared.clone(),
            threads: Vec::with_capacity(helpers),
            busy: Mutex::new(()),
        };
        for i in 0..helpers {
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("adverse-slice-{}", i + 1))
                .spawn(move || helper(&shared, i))
                .ok()?; // `crew` drops here and stops the helpers already started
            crew.threads.push((handle.thread().clone(), handle));
        }
        Some(crew)
    }

    /// Runs `f(0)`..`f(parts - 1)` on the calling thread and up to `parts - 1` helpers, each
    /// taking the next slice not yet taken, and returns when all have finished (a panic in any
    /// slice resumes here, after all have finished). `false`, running nothing, when another
    /// caller holds the crew.
    pub(super) fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
        // A panic resumed below poisons the lock; the crew is still sound (every helper has
        // finished), so a poisoned lock is taken as free.
        let _busy = match self.busy.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        let next = AtomicUsize::new(0);
        let job = Job {
            // SAFETY: only the lifetime is erased. `f` outlives every use of the pointer: this
            // function waits below until each helper given the job has finished it.
            f: unsafe {
                std::mem::transmute::<
                    *const (dyn Fn(usize) + Sync + '_),
                    *const (dyn Fn(usize) + Sync + 'static),
                >(f)
            },
            parts,
            next: &next,
        };
        let used = &self.shared.slots[..(parts.max(1) - 1).min(self.shared.slots.len())];
        let mut targets = Vec::with_capacity(used.len());
        for (slot, (thread, _)) in used.iter().zip(&self.threads) {
            *slot.job.lock().unwrap_or_else(|p| p.into_inner()) = Some(job);
            targets.push(slot.posted.fetch_add(1, Ordering::SeqCst) + 1);
            // With `helper`'s store of `parked` and load of `posted` (all SeqCst), either the
            // helper sees this post before it parks or this sees it parked.
            if slot.parked.load(Ordering::SeqCst) {
                thread.unpark();
            }
        }
        // SAFETY: `f` and `next` live through this call.
        let mine = unsafe { job.work() };
        let start = Instant::now();
        for (slot, &target) in used.iter().zip(&targets) {
            while slot.finished.load(Ordering::Acquire) != target {
                if start.elapsed() < CALLER_SPIN {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        if let Err(p) = mine {
            resume_unwind(p);
        }
        for slot in used {
            if let Some(p) = slot.panic.lock().unwrap_or_else(|p| p.into_inner()).take() {
                resume_unwind(p);
            }
        }
        true
    }
}

impl Drop for Crew {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for (t, _) in &self.threads {
            t.unpark();
        }
        for (_, h) in self.threads.drain(..) {
            // A helper never panics (its jobs run under `catch_unwind`).
            let _ = h.join();
        }
    }
}

/// A helper's loop: wait for a job (spinning, then parked), run it, report.
fn helper(shared: &Shared, i: usize) {
    let slot = &shared.slots[i];
    let mut last = 0u64;
    loop {
        let mut idle = Instant::now();
        let mut spins = 0u32;
        let now = loop {
            let p = slot.posted.load(Ordering::SeqCst);
            if p != last {
                break p;
            }
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
            } else if idle.elapsed() >= SPIN {
                slot.parked.store(true, Ordering::SeqCst);
                // A post between the check above and the store is seen here; one after it
                // finds `parked` set and unparks (see `Crew::run`).
                if slot.posted.load(Ordering::SeqCst) == last && !shared.stop.load(Ordering::SeqCst)
                {
                    std::thread::park();
                }
                slot.parked.store(false, Ordering::SeqCst);
                idle = Instant::now();
            }
        };
        last = now;
        let job = slot.job.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(job) = job {
            // SAFETY: `Crew::run` keeps the pointees alive until `finished` reaches `now`.
            if let Err(p) = unsafe { job.work() } {
                *slot.panic.lock().unwrap_or_else(|p| p.into_inner()) = Some(p);
            }
        }
        slot.finished.store(now, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slice_runs_once_per_call() {
        let crew = Crew::new(3).expect("threads");
        for parts in [1, 2, 4, 3, 9, 0, 4] {
            let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            assert!(crew.run(parts, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            }));
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "{parts} slices"
            );
        }
    }

    /// Counts the calling slice in and waits until `n` slices have come (a slice that never
    /// comes fails the test after 10 s instead of hanging it).
    fn meet(started: &AtomicUsize, n: usize) {
        started.fetch_add(1, Ordering::SeqCst);
        let t = Instant::now();
        while started.load(Ordering::SeqCst) < n {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "a slice never started"
            );
            std::thread::yield_now();
        }
    }

    /// Each slice waits until all have started: this ends only if every slice runs at the same
    /// time as the others, on threads of their own.
    #[test]
    fn slices_run_concurrently_on_the_caller_and_every_helper() {
        let crew = Crew::new(3).expect("threads");
        for _ in 0..20 {
            let started = AtomicUsize::new(0);
            let ids = Mutex::new(Vec::new());
            assert!(crew.run(4, &|_| {
                ids.lock().unwrap().push(std::thread::current().id());
                meet(&started, 4);
            }));
            let mut ids = ids.into_inner().unwrap();
            assert!(
                ids.contains(&std::thread::current().id()),
                "the caller ran one"
            );
            ids.sort_by_key(|t| format!("{t:?}"));
            ids.dedup();
            assert_eq!(ids.len(), 4);
        }
    }

    #[test]
    fn helpers_that_parked_wake_for_the_next_call() {
        let crew = Crew::new(1).expect("threads");
        for _ in 0..3 {
            std::thread::sleep(SPIN * 3);
            let started = AtomicUsize::new(0);
            assert!(crew.run(2, &|_| meet(&started, 2)));
        }
    }

    /// Calls that find the helper at every stage of going to sleep (spinning, storing
    /// `parked`, parked): a lost wake-up would hang a call, which the watchdog turns into a
    /// failure.
    #[test]
    fn no_wake_up_is_lost_around_parking() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let crew = Crew::new(1).expect("threads");
            let mut ran = 0usize;
            for k in 0..1500u64 {
                // Gaps from 0 to 1.2 SPIN, densest around SPIN itself.
                let gap = SPIN.mul_f64(((k * 7919) % 120) as f64 / 100.0);
                let until = Instant::now() + gap;
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
                let n = AtomicUsize::new(0);
                assert!(crew.run(2, &|_| {
                    n.fetch_add(1, Ordering::Relaxed);
                }));
                ran += n.load(Ordering::Relaxed);
            }
            let _ = tx.send(ran);
        });
        let ran = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a call never returned");
        assert_eq!(ran, 3000);
    }

    #[test]
    fn a_panicking_slice_resumes_in_the_caller_after_all_finished() {
        let crew = Crew::new(2).expect("threads");
        for bad in 0..3 {
            let finished = AtomicUsize::new(0);
            let r = catch_unwind(AssertUnwindSafe(|| {
                crew.run(3, &|i| {
                    if i == bad {
                        panic!("slice {i}");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    finished.fetch_add(1, Ordering::SeqCst);
                })
            }));
            let msg = r.expect_err("the panic reaches the caller");
            assert_eq!(
                msg.downcast_ref::<String>().unwrap(),
                &format!("slice {bad}")
            );
            assert_eq!(
                finished.load(Ordering::SeqCst),
                2,
                "the others ran to the end"
            );
        }
        // Still usable.
        let n = AtomicUsize::new(0);
        assert!(crew.run(3, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        }));
        assert_eq!(n.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_second_concurrent_caller_is_refused_not_blocked() {
        let crew = Crew::new(1).expect("threads");
        let inner = AtomicBool::new(true);
        assert!(crew.run(1, &|_| {
            // The crew is held by the outer call.
            inner.store(crew.run(2, &|_| {}), Ordering::SeqCst);
        }));
        assert!(!inner.load(Ordering::SeqCst));
    }
}
