//! Process-level chaos: seeded random schedules of faults against real
//! node processes on loopback, with mutual TLS: two owners, two peer
//! donors and a memory server, two copies of every remote page, and
//! owners that repair as soon as a donor is down (`--out-after 0`).
//!
//! Each schedule starts a fresh cluster, fills the owners until thousands
//! of their pages are on donors, then injects two or three faults, one at
//! a time, drawn from:
//! - SIGKILL of a donor, and a restart (it comes back empty);
//! - SIGSTOP of a donor until it is repaired around, then SIGCONT (it comes
//!   back with copies that are no longer needed);
//! - SIGKILL of an owner, and a restart: a new incarnation with an empty
//!   index, so the test forgets that owner's pages, initialises its area
//!   again and fills it, and the donors must drop the old run's copies;
//! - `ramster cluster drain` of a donor, then either `activate` again, or
//!   `remove` and a restart with a fresh identity (added back).
//!
//! The owners store, overwrite, invalidate and load (checking every page
//! loaded) in a burst as each fault begins, and from a thread each all
//! the while the test waits for the cluster to see the victim down,
//! drained, removed or back. The test waits on conditions, never on time:
//! the owners see the victim down, no page is short of a copy, and the
//! donors hold exactly two copies of every remote page, no more (the
//! copies of a restarted owner's previous run, of a stopped donor
//! repaired around, of a drain are released). During each fault, once it
//! is repaired around and once the victim is back, every page an owner
//! accepted loads back byte-identical. At the end (and on a failure)
//! every node's log is scanned for panics and ERROR lines not in
//! [`ALLOWED_ERRORS`].
//!
//! `RAMSTER_CHAOS_SEED=N` (default 7; `random` draws one) is the first
//! schedule's seed, `RAMSTER_CHAOS_SCHEDULES=K` (default 1) runs K
//! schedules with seeds N, N+1, ..., each in a cluster of its own, and
//! `RAMSTER_CHAOS_STEPS=S` gives every schedule S faults instead of the two
//! or three its seed draws. A failing schedule prints its seed and the
//! command that replays it alone; `scripts/chaos-schedules.sh` runs many.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ramster_client::BlockingClient;
use ramster_cluster_tests::{Member, MemberSpec, Rng, TestCluster, wait_for};
use ramster_node::cli::corpus::Pages;
use ramster_node::cluster::membership::MemberState;
use ramster_node::cluster::status::{Liveness, NodeStatus};
use ramster_protocol::v1;

const AREA: u32 = 1;
const FORM_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a repair, a drain or the releases after a fault may take.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
const OWNERS: [&str; 2] = ["owner1", "owner2"];
const DONORS: [&str; 3] = ["donor1", "donor2", "memsrv"];
const MEMBERS: usize = OWNERS.len() + DONORS.len();
/// Copies of every remote page.
const REPLICAS: u64 = 2;
/// Distinct page contents stored (12% of them incompressible, refused).
const DISTINCT_PAGES: usize = 4_096;
/// Pages each owner stores at first (and again after a restart), at
/// offsets 0 up: about twice what its 8 MiB store holds, so thousands go
/// to donors.
const FILL_PAGES: u64 = 8_192;
/// Offsets the owners' traffic stores at, new and overwritten: the pages
/// held stay about as many as the fill.
const SPAN_PAGES: u64 = 10_240;
/// Remote pages each owner must have after a fill, so that faults matter.
const MIN_REMOTE_PAGES: u64 = 1_000;
/// Stores in the burst of traffic as a fault begins (an eighth as many
/// invalidations, a quarter as many checked loads).
const BURST_PAGES: usize = 1_024;
/// Stores in a round of the traffic that goes on while the test waits.
const TRAFFIC_ROUND_PAGES: usize = 64;
/// The most rounds of traffic during one wait (far more than any takes).
const TRAFFIC_ROUNDS_MAX: usize = 100_000;
/// The schedule a plain test run replays.
const DEFAULT_SEED: u64 = 7;
/// Schedules failing before the run stops starting new ones.
const MAX_FAILURES: usize = 3;
/// ERROR lines a node may log in these schedules (substrings); any other
/// ERROR line, or a panic, fails the schedule.
const ALLOWED_ERRORS: &[&str] = &[
    // The Raft leader cannot reach a member that is killed or stopped
    // (openraft logs each failed replication as an error).
    "openraft::replication: RPCError err=Unreachable",
    "openraft::replication: RPCError err=timeout",
    "openraft::core::raft_core: while requesting vote error=Unreachable",
    // Members joining at once while the cluster forms: the leader's
    // second membership change meets the first, and the join is retried.
    "the cluster is already undergoing a configuration change",
];

const CLUSTER: [MemberSpec<'static>; MEMBERS] = [
    MemberSpec {
        name: "owner1",
        capacity: "8MiB",
        extra: &["--role", "client", "--replicas", "2", "--out-after", "0"],
    },
    MemberSpec {
        name: "owner2",
        capacity: "8MiB",
        extra: &["--role", "client", "--replicas", "2", "--out-after", "0"],
    },
    MemberSpec {
        name: "donor1",
        capacity: "64MiB",
        extra: &["--donate", "64MiB"],
    },
    MemberSpec {
        name: "donor2",
        capacity: "64MiB",
        extra: &["--donate", "64MiB"],
    },
    MemberSpec {
        name: "memsrv",
        capacity: "64MiB",
        extra: &["--role", "memory-server"],
    },
];

/// One fault of a schedule.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGKILL, then a restart: the donor comes back empty.
    KillDonor(&'static str),
    /// SIGSTOP until repaired around, then SIGCONT.
    StopDonor(&'static str),
    /// SIGKILL, then a restart as a new incarnation; `wait_down`: only
    /// once the other owner sees it down.
    KillOwner { owner: usize, wait_down: bool },
    /// Drain; then `remove` and add back with a fresh identity, or
    /// `activate` again.
    DrainDonor { donor: &'static str, remove: bool },
}

impl Fault {
    fn draw(rng: &mut Rng) -> Fault {
        let donor = DONORS[rng.below(DONORS.len() as u64) as usize];
        match rng.below(4) {
            0 => Fault::KillDonor(donor),
            1 => Fault::StopDonor(donor),
            2 => Fault::KillOwner {
                owner: rng.below(OWNERS.len() as u64) as usize,
                wait_down: rng.below(2) == 0,
            },
            _ => Fault::DrainDonor {
                donor,
                remove: rng.below(2) == 0,
            },
        }
    }

    fn describe(self) -> String {
        match self {
            Fault::KillDonor(d) => format!("SIGKILL and restart {d}"),
            Fault::StopDonor(d) => format!("SIGSTOP {d}, SIGCONT once repaired around"),
            Fault::KillOwner { owner, wait_down } => format!(
                "SIGKILL and restart {}{}",
                OWNERS[owner],
                if wait_down { " once seen down" } else { "" }
            ),
            Fault::DrainDonor { donor, remove } => format!(
                "drain {donor}, then {}",
                if remove {
                    "remove it and add it back"
                } else {
                    "activate it"
                }
            ),
        }
    }
}

/// What one owner's area must hold: offset → index of its page.
struct Owner {
    name: &'static str,
    client: BlockingClient,
    held: BTreeMap<u64, usize>,
    /// The owner's traffic; the schedule's faults have a generator of
    /// their own, so that they replay whatever the traffic did.
    rng: Rng,
}

impl Owner {
    /// Connects to a (new) run of the owner and initialises its area empty.
    fn connect(m: &Member, name: &'static str, rng: Rng) -> Owner {
        let client = BlockingClient::connect(&m.socket())
            .unwrap_or_else(|e| panic!("connecting to {name}: {e}"));
        client
            .init_area(AREA, false)
            .unwrap_or_else(|e| panic!("init of {name}'s area: {e}"));
        Owner {
            name,
            client,
            held: BTreeMap::new(),
            rng,
        }
    }

    /// Stores `batch` (offset, page index); the accepted pages are held,
    /// a refused one must miss (the contract drops the old page).
    fn store(&mut self, pages: &Pages, batch: &[(u64, usize)]) -> Result<(), String> {
        for chunk in batch.chunks(256) {
            let wire: Vec<(u64, Bytes)> = chunk
                .iter()
                .map(|&(o, i)| (o, pages.page_bytes(i)))
                .collect();
            let statuses = self
                .client
                .store_pages(AREA, &wire)
                .map_err(|e| format!("store request failed: {e}"))?;
            for (&(o, i), s) in chunk.iter().zip(statuses) {
                if s == v1::Status::Ok {
                    self.held.insert(o, i);
                } else {
                    self.held.remove(&o);
                }
            }
        }
        Ok(())
    }

    /// A page at every offset below [`FILL_PAGES`].
    fn fill(&mut self, pages: &Pages) -> Result<(), String> {
        let batch: Vec<(u64, usize)> = (0..FILL_PAGES)
            .map(|o| (o, self.rng.below(pages.len() as u64) as usize))
            .collect();
        self.store(pages, &batch)
    }

    /// `count` random held offsets (repeats dropped).
    fn some_held(&mut self, count: usize) -> Vec<u64> {
        let keys: Vec<u64> = self.held.keys().copied().collect();
        if keys.is_empty() {
            return Vec::new();
        }
        let mut picked: Vec<u64> = (0..count)
            .map(|_| keys[self.rng.below(keys.len() as u64) as usize])
            .collect();
        picked.sort_unstable();
        picked.dedup();
        picked
    }

    /// One round of traffic: `count` stores at random offsets of the span
    /// (new pages and overwrites), an eighth as many invalidations (so
    /// most of the span stays held, thousands of pages on donors) and a
    /// quarter as many loads of random held pages; the loads checked.
    fn round(&mut self, pages: &Pages, count: usize) -> Result<u64, String> {
        let mut batch: Vec<(u64, usize)> = (0..count)
            .map(|_| {
                (
                    self.rng.below(SPAN_PAGES),
                    self.rng.below(pages.len() as u64) as usize,
                )
            })
            .collect();
        // One store per offset in a batch: the last would win, and the
        // bookkeeping could not say which.
        batch.sort_unstable_by_key(|&(o, _)| o);
        batch.dedup_by_key(|&mut (o, _)| o);
        self.store(pages, &batch)?;
        let gone = self.some_held(count / 8);
        for chunk in gone.chunks(256) {
            self.client
                .invalidate_pages(AREA, chunk)
                .map_err(|e| format!("invalidate request failed: {e}"))?;
            for o in chunk {
                self.held.remove(o);
            }
        }
        let sample = self.some_held(count / 4);
        self.check(pages, &sample)
    }

    /// Rounds of [`TRAFFIC_ROUND_PAGES`] until `stop` (at most
    /// [`TRAFFIC_ROUNDS_MAX`]); the loads checked.
    fn traffic(&mut self, pages: &Pages, stop: &AtomicBool) -> Result<u64, String> {
        let mut checked = 0;
        for _ in 0..TRAFFIC_ROUNDS_MAX {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            checked += self.round(pages, TRAFFIC_ROUND_PAGES)?;
        }
        Ok(checked)
    }

    /// Loads `offsets` (held ones) and checks each: the loads checked, or
    /// the first failure.
    fn check(&self, pages: &Pages, offsets: &[u64]) -> Result<u64, String> {
        for chunk in offsets.chunks(256) {
            let got = self
                .client
                .load_pages(AREA, chunk)
                .map_err(|e| format!("load request failed: {e}"))?;
            for (&o, g) in chunk.iter().zip(got) {
                let page = g.map_err(|s| format!("page {o} did not load: {s:?}"))?;
                if page[..] != pages.page(self.held[&o])[..] {
                    return Err(format!("page {o} came back different"));
                }
            }
        }
        Ok(offsets.len() as u64)
    }

    /// Every held page loads back byte-identical.
    fn verify(&self, pages: &Pages) -> Result<u64, String> {
        let offsets: Vec<u64> = self.held.keys().copied().collect();
        self.check(pages, &offsets)
    }
}

/// One schedule's cluster and what its owners must hold.
struct Schedule {
    seed: u64,
    /// Draws the faults.
    rng: Rng,
    cluster: TestCluster,
    pages: Pages,
    /// By index in [`OWNERS`]; `None` while that owner is down.
    owners: Vec<Option<Owner>>,
    /// Runs of each owner so far, for its traffic's seed.
    runs: u64,
    /// What the schedule is doing, for a failure's message.
    doing: String,
    /// Page loads checked.
    checked: u64,
    /// Copies re-created on other donors (owners' runs that ended count
    /// with their last figure).
    repaired: f64,
}

/// What a passed schedule did.
struct Summary {
    /// Each fault, with the pages on donors as it began.
    faults: Vec<(Fault, u64)>,
    checked: u64,
    repaired: f64,
    remote: u64,
    /// Pages the owners hold at the end.
    held: u64,
}

impl Schedule {
    fn fail(&self, what: &str) -> ! {
        panic!("seed {} {}: {what}", self.seed, self.doing)
    }

    fn owner_member(&self, i: usize) -> &Member {
        self.cluster.member(OWNERS[i])
    }

    /// The owner's log, for a failure's message.
    fn log_of(&self, name: &str) -> String {
        format!(
            "{name}'s log ends:\n{}",
            self.cluster.member(name).log_tail(60)
        )
    }

    /// Connects to owner `i`'s new run, initialises its area and fills it
    /// until enough of its pages are on donors.
    fn start_owner(&mut self, i: usize) {
        self.runs += 1;
        let rng = Rng((self.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ self.runs) | 1);
        let mut o = Owner::connect(self.owner_member(i), OWNERS[i], rng);
        if let Err(e) = o.fill(&self.pages) {
            self.fail(&format!("filling {}: {e}; {}", o.name, self.log_of(o.name)));
        }
        self.owners[i] = Some(o);
        let m = self.owner_member(i);
        wait_for(SETTLE_TIMEOUT, || {
            let remote = m.metric("ramster_store_remote_pages")? as u64;
            (remote >= MIN_REMOTE_PAGES).then_some(())
        })
        .unwrap_or_else(|e| {
            self.fail(&format!(
                "{} has only {:?} of {} held pages on donors ({e}); {}",
                m.name,
                m.metric("ramster_store_remote_pages"),
                self.owners[i].as_ref().map_or(0, |o| o.held.len()),
                self.log_of(&m.name)
            ))
        });
    }

    /// One burst of traffic from every live owner, right as a fault
    /// begins.
    fn burst(&mut self) {
        for i in 0..self.owners.len() {
            let Some(o) = self.owners[i].as_mut() else {
                continue;
            };
            match o.round(&self.pages, BURST_PAGES) {
                Ok(n) => self.checked += n,
                Err(e) => {
                    let name = o.name;
                    self.fail(&format!("{name} under traffic: {e}; {}", self.log_of(name)))
                }
            }
        }
    }

    /// Runs `wait` while every live owner sends traffic (rounds of
    /// stores, overwrites, invalidations and checked loads) from a thread
    /// of its own, then stops the traffic; a failed load fails the
    /// schedule.
    fn with_traffic(&mut self, wait: impl FnOnce(&Schedule)) {
        let mut owners = std::mem::take(&mut self.owners);
        let stop = AtomicBool::new(false);
        let this = &*self;
        let (waited, traffic) = std::thread::scope(|scope| {
            let threads: Vec<_> = owners
                .iter_mut()
                .flatten()
                .map(|o| {
                    let (pages, stop) = (&this.pages, &stop);
                    let name = o.name;
                    (name, scope.spawn(move || o.traffic(pages, stop)))
                })
                .collect();
            let waited = catch_unwind(AssertUnwindSafe(|| wait(this)));
            stop.store(true, Ordering::Relaxed);
            let traffic: Vec<_> = threads
                .into_iter()
                .map(|(name, t)| {
                    let r = t.join().map_err(|p| panic_message(&*p));
                    (name, r.and_then(|r| r))
                })
                .collect();
            (waited, traffic)
        });
        self.owners = owners;
        for (name, r) in traffic {
            match r {
                Ok(n) => self.checked += n,
                Err(e) => self.fail(&format!("{name} under traffic: {e}; {}", self.log_of(name))),
            }
        }
        if let Err(panic) = waited {
            std::panic::resume_unwind(panic);
        }
    }

    /// Every page every live owner holds loads back byte-identical.
    fn verify(&mut self, when: &str) {
        for o in self.owners.iter().flatten() {
            match o.verify(&self.pages) {
                Ok(n) => self.checked += n,
                Err(e) => self.fail(&format!("{} {when}: {e}; {}", o.name, self.log_of(o.name))),
            }
        }
    }

    /// The sum of a metric over the live owners.
    fn owners_figure(&self, name: &str) -> f64 {
        self.live_owner_names()
            .iter()
            .filter_map(|o| self.cluster.member(o).metric(name))
            .sum()
    }

    /// The live owners' pages on donors.
    fn remote_pages(&self) -> u64 {
        self.owners_figure("ramster_store_remote_pages") as u64
    }

    /// The owners whose process runs.
    fn live_owner_names(&self) -> Vec<&'static str> {
        OWNERS
            .iter()
            .copied()
            .filter(|n| self.cluster.member(n).pid().is_some())
            .collect()
    }

    /// Every member with a process (none of them stopped, when called).
    fn running(&self) -> Vec<&'static str> {
        OWNERS
            .iter()
            .chain(DONORS.iter())
            .copied()
            .filter(|n| self.cluster.member(n).pid().is_some())
            .collect()
    }

    /// Waits until each of `observers` sees `node` as `pred` says.
    fn wait_seen(
        &self,
        observers: &[&str],
        node: &str,
        what: &str,
        pred: impl Fn(Option<&NodeStatus>) -> bool,
    ) {
        for name in observers {
            let m = self.cluster.member(name);
            wait_for(FORM_TIMEOUT, || {
                let view = m.view()?;
                pred(view.nodes.iter().find(|n| n.name == node)).then_some(())
            })
            .unwrap_or_else(|e| {
                self.fail(&format!(
                    "{name} never saw {node} {what} ({e}): {:?}",
                    m.view().map(|v| v.nodes)
                ))
            });
        }
    }

    /// Waits until every live owner sees all members up, with a leader.
    fn wait_all_up(&self) {
        for name in self.live_owner_names() {
            let m = self.cluster.member(name);
            wait_for(FORM_TIMEOUT, || {
                let v = m.view()?;
                (v.nodes_up == MEMBERS && v.nodes_total == MEMBERS && v.leader.is_some())
                    .then_some(())
            })
            .unwrap_or_else(|e| {
                self.fail(&format!(
                    "{} never saw {MEMBERS} members up ({e}): {:?}",
                    m.name,
                    m.view().map(|v| v.nodes)
                ))
            });
        }
    }

    /// Waits until no live owner has a page short of a copy and the
    /// `holders` hold exactly [`REPLICAS`] copies of every remote page:
    /// repaired, and every copy no longer needed (a restarted owner's old
    /// run, a drain's, a stopped donor's repaired around) released. Fails
    /// at once when a page lost every copy. The owners' remote pages.
    fn wait_settled(&self, holders: &[&str]) -> u64 {
        let owner_figures = || -> Option<(u64, u64, u64)> {
            let (mut remote, mut degraded, mut lost) = (0, 0, 0);
            for name in self.live_owner_names() {
                let m = self.cluster.member(name);
                remote += m.metric("ramster_store_remote_pages")? as u64;
                degraded += m.metric("ramster_degraded_pages")? as u64;
                lost += m.metric("ramster_unrecoverable_pages")? as u64
                    + m.metric("ramster_lost_pages_total")? as u64;
            }
            Some((remote, degraded, lost))
        };
        let held = || -> Option<u64> {
            holders
                .iter()
                .map(|d| Some(self.cluster.member(d).metric("ramster_donor_held_pages")? as u64))
                .sum()
        };
        let settled = wait_for(SETTLE_TIMEOUT, || {
            let (remote, degraded, lost) = owner_figures()?;
            if lost > 0 {
                return Some(Err(format!("{lost} pages lost every copy")));
            }
            (degraded == 0 && held()? == REPLICAS * remote).then_some(Ok(remote))
        });
        match settled {
            Ok(Ok(remote)) => remote,
            Ok(Err(e)) => self.fail(&self.settle_report(&e, holders)),
            Err(e) => self.fail(&self.settle_report(
                &format!(
                    "never settled with {REPLICAS} copies of each remote page on {holders:?}: {e}"
                ),
                holders,
            )),
        }
    }

    fn settle_report(&self, what: &str, holders: &[&str]) -> String {
        let mut report = format!("{what}\n");
        for name in self.live_owner_names() {
            let m = self.cluster.member(name);
            report += &format!(
                "{}: remote {:?}, degraded {:?}, unrecoverable {:?}, lost {:?}, release backlog {:?}\n",
                m.name,
                m.metric("ramster_store_remote_pages"),
                m.metric("ramster_degraded_pages"),
                m.metric("ramster_unrecoverable_pages"),
                m.metric("ramster_lost_pages_total"),
                m.metric("ramster_release_backlog_pages"),
            );
        }
        for d in holders {
            report += &format!(
                "{d}: holds {:?}\n",
                self.cluster.member(d).metric("ramster_donor_held_pages")
            );
        }
        for name in self.live_owner_names() {
            report += &format!("{}\n", self.log_of(name));
        }
        report
    }

    /// The members other than `victim` that a change may be asked of.
    fn someone_else(&mut self, victim: &str) -> &'static str {
        let others: Vec<&'static str> = OWNERS
            .iter()
            .chain(DONORS.iter())
            .copied()
            .filter(|n| *n != victim)
            .collect();
        others[self.rng.below(others.len() as u64) as usize]
    }

    /// `ramster cluster <args>` asked of `via`; must succeed. Asked again
    /// while the answer is that no leader is elected (HTTP 503): right
    /// after a fault, an election can be under way (a member back from a
    /// stop may call one).
    fn change(&self, via: &str, args: &[&str]) {
        let m = self.cluster.member(via);
        let mut last = String::new();
        let done = wait_for(FORM_TIMEOUT, || {
            let (code, said) = m.cluster(args);
            if code == 0 {
                return Some(Ok(()));
            }
            if said.contains("(HTTP 503)") {
                last = said;
                return None;
            }
            Some(Err(format!("exited {code}: {said}")))
        });
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.fail(&format!("ramster cluster {args:?} via {via} {e}")),
            Err(e) => self.fail(&format!("ramster cluster {args:?} via {via}: {e}; {last}")),
        }
    }

    /// Starts `name` again and waits until it serves.
    fn restart(&mut self, name: &str) {
        if let Err(e) = self.cluster.member_mut(name).start() {
            self.fail(&format!("starting {name} again: {e:#}"));
        }
    }

    fn inject(&mut self, fault: Fault) {
        let donors_but = |victim: &str| -> Vec<&'static str> {
            DONORS.iter().copied().filter(|d| *d != victim).collect()
        };
        let seen_down = |s: &Schedule, victim: &str| {
            s.wait_seen(&s.live_owner_names(), victim, "down", |n| {
                n.is_some_and(|n| n.state == Liveness::Down)
            })
        };
        match fault {
            Fault::KillDonor(victim) | Fault::StopDonor(victim) => {
                let kill = matches!(fault, Fault::KillDonor(_));
                if kill {
                    self.cluster.member_mut(victim).kill();
                } else {
                    self.cluster.member(victim).signal("-STOP");
                }
                // Loads go to the other copy (past a stopped donor after
                // the hedge delay); stores and invalidations go on.
                self.burst();
                self.verify("during the fault");
                self.with_traffic(|s| seen_down(s, victim));
                self.wait_settled(&donors_but(victim));
                self.verify("once repaired around the victim");
                if kill {
                    // Back empty, as a new incarnation.
                    self.restart(victim);
                } else {
                    // Back with copies repaired elsewhere meanwhile.
                    self.cluster.member(victim).signal("-CONT");
                }
            }
            Fault::KillOwner { owner, wait_down } => {
                let name = OWNERS[owner];
                if let Some(n) = self
                    .owner_member(owner)
                    .metric("ramster_repaired_pages_total")
                {
                    self.repaired += n;
                }
                self.cluster.member_mut(name).kill();
                self.owners[owner] = None;
                self.burst();
                self.verify("during the fault");
                if wait_down {
                    self.with_traffic(|s| seen_down(s, name));
                }
                self.restart(name);
                // A new run: its pages are gone, its area starts again.
                self.start_owner(owner);
            }
            Fault::DrainDonor { donor, remove } => {
                let via = self.someone_else(donor);
                self.change(via, &["drain", donor]);
                self.burst();
                self.verify("during the drain");
                // Every member sees it drained, the Raft leader (which
                // refuses to remove a node holding pages) among them.
                self.with_traffic(|s| {
                    s.wait_seen(&s.running(), donor, "drained", |n| {
                        n.is_some_and(|n| {
                            n.member_state == MemberState::Draining && n.held_for_others_pages == 0
                        })
                    })
                });
                self.wait_settled(&donors_but(donor));
                let held = self
                    .cluster
                    .member(donor)
                    .metric("ramster_donor_held_pages");
                if held != Some(0.0) {
                    self.fail(&format!("{donor} drained but holds {held:?} pages"));
                }
                self.verify("once drained");
                let via = self.someone_else(donor);
                if remove {
                    self.change(via, &["remove", donor]);
                    self.with_traffic(|s| {
                        let others: Vec<&str> =
                            s.running().into_iter().filter(|n| *n != donor).collect();
                        s.wait_seen(&others, donor, "removed", |n| n.is_none())
                    });
                    self.cluster.member_mut(donor).kill();
                    self.verify("once removed");
                    // Added back as a new node: a fresh identity and Raft
                    // log under the same name and certificate.
                    forget_identity(self.cluster.member(donor));
                    self.restart(donor);
                } else {
                    self.change(via, &["activate", donor]);
                }
                self.with_traffic(|s| {
                    s.wait_seen(&s.running(), donor, "active", |n| {
                        n.is_some_and(|n| n.member_state == MemberState::Active)
                    })
                });
            }
        }
        // Traffic while the victim rejoins.
        self.with_traffic(|s| s.wait_all_up());
        self.wait_settled(&DONORS);
        self.verify("once the victim is back");
    }

    fn run(&mut self, steps: Option<usize>) -> Summary {
        self.doing = "forming".into();
        self.cluster
            .wait_up(OWNERS[0], MEMBERS, FORM_TIMEOUT)
            .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
        self.doing = "filling".into();
        for i in 0..OWNERS.len() {
            self.start_owner(i);
        }
        self.wait_settled(&DONORS);
        self.verify("before any fault");
        let steps = steps.unwrap_or_else(|| 2 + self.rng.below(2) as usize);
        let mut faults = Vec::new();
        for step in 0..steps {
            let fault = Fault::draw(&mut self.rng);
            self.doing = format!("step {step} ({})", fault.describe());
            // Faults matter only with pages on donors.
            let remote = self.remote_pages();
            if remote < MIN_REMOTE_PAGES {
                self.fail(&format!("only {remote} pages are on donors"));
            }
            eprintln!(
                "  seed {} {}; {remote} pages on donors",
                self.seed, self.doing
            );
            self.inject(fault);
            faults.push((fault, remote));
        }
        self.repaired += self.owners_figure("ramster_repaired_pages_total");
        Summary {
            faults,
            checked: self.checked,
            repaired: self.repaired,
            remote: self.remote_pages(),
            held: self
                .owners
                .iter()
                .flatten()
                .map(|o| o.held.len() as u64)
                .sum(),
        }
    }
}

/// Deletes what makes `m` the node it was (identity, Raft log, sockets),
/// keeping its log: started again, it joins as a new node.
fn forget_identity(m: &Member) {
    for entry in std::fs::read_dir(&m.data_dir).expect("data dir") {
        let path = entry.expect("data dir entry").path();
        if path.file_name().is_some_and(|n| n == "node.log") {
            continue;
        }
        if path.is_dir() {
            std::fs::remove_dir_all(&path).expect("removing from the data dir");
        } else {
            std::fs::remove_file(&path).expect("removing from the data dir");
        }
    }
}

/// Panics and unexpected ERROR lines in the members' logs, each prefixed
/// with its member's name.
fn log_problems(cluster: &TestCluster) -> Vec<String> {
    let mut problems = Vec::new();
    for m in &cluster.members {
        for line in m.log().lines() {
            let line = strip_ansi(line);
            // `<time> ERROR <target>: <message>`, as tracing writes it.
            let error = line.split_whitespace().nth(1) == Some("ERROR");
            if line.contains("panicked at")
                || (error && !ALLOWED_ERRORS.iter().any(|a| line.contains(a)))
            {
                problems.push(format!("{}: {line}", m.name));
            }
        }
    }
    problems
}

/// `line` without terminal colour sequences (ESC [ ... letter).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs the schedule of `seed` in a fresh cluster: what it did, or why
/// it failed.
fn run_schedule(seed: u64, steps: Option<usize>) -> Result<Summary, String> {
    let cluster = TestCluster::start(&CLUSTER).map_err(|e| format!("starting: {e:#}"))?;
    let mut schedule = Schedule {
        seed,
        // Neighbouring seeds, far apart schedules; never the stuck state 0.
        rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
        cluster,
        pages: Pages::synthetic(DISTINCT_PAGES, seed),
        owners: vec![None, None],
        runs: 0,
        doing: String::new(),
        checked: 0,
        repaired: 0.0,
    };
    let outcome = catch_unwind(AssertUnwindSafe(|| schedule.run(steps)));
    let problems = log_problems(&schedule.cluster);
    let shown = problems.len().min(20);
    let problems = (!problems.is_empty()).then(|| {
        format!(
            "{} panics or unexpected ERROR lines in the nodes' logs; the first {shown}:\n{}",
            problems.len(),
            problems[..shown].join("\n")
        )
    });
    match (outcome, problems) {
        (Ok(summary), None) => Ok(summary),
        (Ok(_), Some(problems)) => Err(problems),
        (Err(panic), problems) => Err(format!(
            "{}{}",
            panic_message(&*panic),
            problems.map(|p| format!("\n{p}")).unwrap_or_default()
        )),
    }
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?}: expected a number")),
    )
}

/// The command that replays the schedule of `seed` alone.
fn replay(seed: u64, steps: Option<usize>) -> String {
    let steps = steps.map_or(String::new(), |s| format!(" RAMSTER_CHAOS_STEPS={s}"));
    format!(
        "RAMSTER_CHAOS_SEED={seed}{steps} cargo test --release -p ramster-cluster-tests \
         --test chaos -- --nocapture"
    )
}

#[test]
fn accepted_pages_survive_seeded_schedules_of_faults() {
    let first = match std::env::var("RAMSTER_CHAOS_SEED").ok().as_deref() {
        // A fixed schedule by default, so a plain test run is repeatable.
        None => DEFAULT_SEED,
        // Short enough to type back.
        Some("random") => {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_000
        }
        Some(_) => env_number("RAMSTER_CHAOS_SEED").unwrap(),
    };
    let count = env_number("RAMSTER_CHAOS_SCHEDULES").unwrap_or(1);
    let steps = env_number("RAMSTER_CHAOS_STEPS").map(|s| s as usize);
    eprintln!(
        "chaos: {count} schedule(s), seeds {first}..={}, {} faults each",
        first.wrapping_add(count.saturating_sub(1)),
        steps.map_or("2 or 3".into(), |s| s.to_string())
    );
    let started = Instant::now();
    let (mut passed, mut faults, mut checked) = (0, 0, 0);
    let mut failed = Vec::new();
    for seed in (0..count).map(|i| first.wrapping_add(i)) {
        let began = Instant::now();
        match run_schedule(seed, steps) {
            Ok(s) => {
                passed += 1;
                faults += s.faults.len();
                checked += s.checked;
                eprintln!(
                    "PASS seed {seed} in {:.1} s: {}; {} page loads checked, {} copies \
                     repaired, {} pages held at the end ({} remote), 0 lost",
                    began.elapsed().as_secs_f64(),
                    s.faults
                        .iter()
                        .map(|(f, remote)| format!("{} ({remote} pages remote)", f.describe()))
                        .collect::<Vec<_>>()
                        .join("; "),
                    s.checked,
                    s.repaired,
                    s.held,
                    s.remote,
                );
            }
            Err(e) => {
                eprintln!(
                    "FAIL seed {seed} after {:.1} s: {e}\nreplay it: {}",
                    began.elapsed().as_secs_f64(),
                    replay(seed, steps)
                );
                failed.push(seed);
                if failed.len() >= MAX_FAILURES {
                    eprintln!("{MAX_FAILURES} schedules failed: not starting more");
                    break;
                }
            }
        }
    }
    eprintln!(
        "chaos: {passed} of {count} schedules passed in {:.1} s ({faults} faults, {checked} \
         page loads checked)",
        started.elapsed().as_secs_f64()
    );
    assert!(
        failed.is_empty(),
        "chaos schedules failed, seeds {failed:?}; replay one with:\n{}",
        failed
            .iter()
            .map(|&s| replay(s, steps))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
